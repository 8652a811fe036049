"""Steps on a real Ray cluster (``--executor ray``), started by the test inside a private network namespace.

A head node (1 CPU) and a second raylet declaring one H100 (``--num-gpus 1 --resources
'{"accelerator_type:H100": 1}'``), a real Distribution registry as the remote step cache, and the forge
driver all run under ``unshare --net --pid --mount-proc`` (outside one, Ray advertises the host's external
address; tests talk to loopback only, and the PID namespace scopes ``ray stop`` to this cluster: everything
in it dies with it). Each node has its own step cache: nodes share nothing but the registry.

This file is also the script that runs in the namespace (``python tests/test_ray_executor.py CONFIG``): it
starts the cluster once, runs every scenario and writes what happened as JSON for the tests to assert.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("ray")   # one worker starts the module's cluster
REPO = Path(__file__).resolve().parents[1]
GRAPH = ["resolve", "reference", "quantize", "eval_baseline", "eval_candidate", "gate"]
# the GPU variant first: its GPU steps are built (on the H100 node); the CPU variant then reuses the shared ones
VARIANTS = {"h100": {"target": {"gpu": "H100-SXM", "engine": "vllm"}},
            "cpu": {"target": {"gpu": "CPU", "engine": "cpu"}}}
HOOK = "FORGE_TEST_STOP_BEFORE_COMMIT"


def write_workdir(work: Path, model: Path) -> dict[str, Path]:
    """A recipe directory holding everything its steps read (what the Ray executor ships): model, tasks, data."""
    shutil.copytree(model, work / "model")
    shutil.copytree(REPO / "evals", work / "evals")

    def recipe(name: str, max_rel_increase: float = 5.0, **extra) -> Path:
        doc = {"apiVersion": "forge/v1", "name": name, "model": {"source": "./model"},
               "target": {"gpu": "CPU", "engine": "cpu"}, "quantize": {"method": "fp8"},
               "eval": {"tasks": ["evals/tasks/heldout_ppl.yaml", "evals/tasks/capitals_mc.yaml"], "limit": 6,
                        "gate": [{"task": "heldout_ppl", "metric": "word_perplexity",
                                  "max_rel_increase": max_rel_increase}]},
               **extra}
        (work / f"{name}.yaml").write_text(json.dumps(doc, indent=2))
        return work / f"{name}.yaml"

    return {"variants": recipe("tiny", variants=[{"name": n, **v} for n, v in VARIANTS.items()]),
            "kill": recipe("tiny-kill", 4.0),      # another gate threshold: only its gate runs again, on the cluster
            "l4": recipe("tiny-l4", target={"gpu": "L4", "engine": "vllm"})}


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_llama):
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry is not installed: `make setup-tools` installs it (Debian package docker-registry)")
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'forge-llm[ray]'")
    work = tmp_path_factory.mktemp("ray-work")
    recipes = write_workdir(work, tiny_llama)
    config = work / "config.json"
    config.write_text(json.dumps({"work": str(work), "recipes": {k: str(v) for k, v in recipes.items()}}))
    proc = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, __file__, str(config)],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    result = work / "result.json"
    print(result.read_text() if result.exists() else "", proc.stderr[-4000:])   # shown when a test fails
    assert result.exists(), f"the cluster script wrote no result (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(result.read_text())


@pytest.mark.ray
def test_a_two_variant_recipe_builds_through_ray_with_the_local_digests(cluster_run):
    for variant in VARIANTS:
        local, ray = cluster_run["local"][variant], cluster_run["ray"][variant]
        assert ray.get("error") is None, ray.get("error")
        assert [s["step"] for s in ray["steps"]] == GRAPH
        assert [(s["step"], s["key"], s["output_digest"]) for s in ray["steps"]] == \
               [(s["step"], s["key"], s["output_digest"]) for s in local["steps"]], variant
    # the GPU variant's GPU steps ran on the node declaring the H100; its CPU steps and the CPU variant anywhere
    where = cluster_run["ray"]["h100"]["nodes"]
    for step in ("reference", "quantize", "eval_baseline", "eval_candidate"):
        assert where[step] == "gpu", (step, where)
    # one graph: the snapshot both variants share was built once, for both; each variant's GPU/CPU steps ran
    statuses = {v: {s["step"]: s["status"] for s in cluster_run["ray"][v]["steps"]} for v in VARIANTS}
    assert statuses["h100"]["resolve"] == statuses["cpu"]["resolve"] == "BUILT"
    started = cluster_run["ray"]["started"]
    assert started.count("resolve") == 1, started
    # live progress from the tasks reached the driver, for every step that ran
    assert set(started) == set(GRAPH)
    assert "hashing outputs" in cluster_run["ray"]["messages"]["quantize"]


@pytest.mark.ray
def test_a_worker_killed_mid_step_is_retried_and_the_result_is_correct(cluster_run):
    kill = cluster_run["kill"]
    assert kill.get("error") is None, kill.get("error")
    assert {s["step"]: s["status"] for s in kill["steps"]}["gate"] == "BUILT"
    assert len(kill["stopped_pids"]) == 2 and kill["stopped_pids"][0] != kill["stopped_pids"][1], kill
    assert [(s["step"], s["key"], s["output_digest"]) for s in kill["steps"]] == \
           [(s["step"], s["key"], s["output_digest"]) for s in cluster_run["local"]["kill"]["steps"]]
    # the killed attempt committed nothing: when it died, the remote had no entry for the step's key
    assert kill["remote_had_key_after_kill"] is False


@pytest.mark.ray
def test_a_gpu_type_the_cluster_lacks_fails_within_seconds_naming_it(cluster_run):
    l4 = cluster_run["l4"]
    assert l4["exit"] == 5, l4
    assert l4["seconds"] < 30, l4
    assert "accelerator type L4" in l4["stderr"] and "recipe GPU L4" in l4["stderr"] and "H100" in l4["stderr"], l4["stderr"]


def test_without_ray_installed_forge_build_exits_2_with_the_pip_command(tmp_path, tiny_llama):
    from conftest import forge_cli, write_recipe

    shim = tmp_path / "no-ray" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray (test shim)')\n")
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama))
    proc = forge_cli("build", str(recipe), "--executor", "ray", cache=tmp_path / "cache",
                     env={"PYTHONPATH": os.pathsep.join([str(shim.parent), str(REPO)])})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'forge-llm[ray]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_cluster_on_another_ray_version_is_an_error_naming_both_versions():
    """What ray.init raises on a version mismatch (ray._private.utils.check_version_info's message) becomes
    exit 5 with both versions and the pin, no traceback."""
    from forge.core.errors import ToolError
    from forge.executors import ray as ray_executor

    class Ray:                                 # the ray module as _connect uses it, connecting to an older cluster
        __version__ = "2.60.0"

        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.49.1\n    Python: 3.11.9\n"
                               "This process on node 127.0.0.1 was started with:\n    Ray: 2.60.0\n    Python: 3.11.9\n")

    with pytest.raises(ToolError) as e:
        ray_executor._connect(Ray, "127.0.0.1:6379")
    assert e.value.exit_code == 5
    assert "Ray: 2.49.1" in e.value.message and "Ray: 2.60.0" in e.value.message and "127.0.0.1:6379" in e.value.message
    assert "ray==2.60.0" in e.value.hint


# ------------------------------------------------------------------------- inside the namespace


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str) -> None:
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited")
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url}")


@contextmanager
def cluster(work: Path, *, gpu_node: bool = True):
    """docker-registry, a Ray head (1 CPU) and a raylet with 1 CPU + one declared H100, on 127.0.0.1.
    Yields (ray address, registry host:port, {node name: its own step cache})."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    reg_port, ray_port = _free_port(), _free_port()
    (work / "registry.yml").write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem:\n"
                                       f"    rootdirectory: {work / 'registry'}\n  delete: {{enabled: true}}\n"
                                       f"http:\n  addr: 127.0.0.1:{reg_port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(work / "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=open(work / "registry.log", "w"))
    temp = tempfile.mkdtemp(prefix="fr-", dir="/tmp")   # short: Ray's socket paths live under it
    ray_bin = str(Path(sys.executable).parent / "ray")
    caches = {"head": work / "node-head", "gpu": work / "node-gpu"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", temp, "--disable-usage-stats",
              "--object-store-memory", str(200 << 20)]

    def node_env(name: str) -> dict:
        return {**os.environ, "FORGE_CACHE_DIR": str(caches[name]), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                "RAY_NODE_NAME_FORGE": name}

    try:
        _wait_http(f"http://127.0.0.1:{reg_port}/v2/", registry, "docker-registry")
        subprocess.run([ray_bin, "start", "--head", "--port", str(ray_port), "--include-dashboard", "false",
                        "--num-gpus", "0", "--resources", '{"node:head": 1}', *common],
                       check=True, env=node_env("head"), capture_output=True)
        if gpu_node:
            subprocess.run([ray_bin, "start", "--address", f"127.0.0.1:{ray_port}", "--num-gpus", "1",
                            "--resources", '{"accelerator_type:H100": 1, "node:gpu": 1}', *common],
                           check=True, env=node_env("gpu"), capture_output=True)
        yield f"127.0.0.1:{ray_port}", f"127.0.0.1:{reg_port}", caches
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)   # this PID namespace's Ray only
        registry.terminate()
        registry.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def _steps(outcome) -> list[dict]:
    return [{"step": r.name, "status": r.status, "key": r.key, "output_digest": r.output_digest}
            for r in outcome.results]


def _ray_build(path: Path, store, address: str, remote: str, started: list, messages: dict) -> dict:
    """Every variant of the recipe as one graph (the one scheduler) through one RayExecutor: each variant's outcome."""
    from forge.orchestrate.build import execute
    from forge.store.remote import RemoteCache
    from forge.executors.ray import RayExecutor
    from conftest import resolved

    def on_start(label, spec, key):
        started.append(spec.name)
        return lambda message, **kw: messages.setdefault(spec.name, []).append(message)

    loaded = [resolved(path, variant=name) for name in VARIANTS]
    cache_remote = RemoteCache.parse(remote, "readwrite")
    return execute(loaded, store, executor=RayExecutor(loaded[0], store, address=address, cache_remote=cache_remote),
                   on_start=on_start, remote=cache_remote)


def _ray_build_one(loaded, store, address: str, remote: str):
    """One recipe through a RayExecutor (forge.orchestrate.build.execute)."""
    from forge.orchestrate.build import execute_one
    from forge.store.remote import RemoteCache
    from forge.executors.ray import RayExecutor

    cache_remote = RemoteCache.parse(remote, "readwrite")
    return execute_one(loaded, store, executor=RayExecutor(loaded, store, address=address, cache_remote=cache_remote),
                       remote=cache_remote)


def _nodes(caches: dict[str, Path], steps: list[dict]) -> dict[str, str]:
    """Which node's cache committed each step's key (where the step was built or first pulled)."""
    return {s["step"]: next((n for n, c in caches.items() if (c / "steps" / s["key"]).is_dir()
                             and (c / "logs").exists() and any((c / "logs").rglob(f"*{s['key'][:12]}*"))), None)
            for s in steps}


def main(config_path: str) -> int:
    import ray

    from forge.orchestrate.build import execute_one as execute
    from conftest import resolved
    from forge.store.local import Store

    cfg = json.loads(Path(config_path).read_text())
    work, recipes = Path(cfg["work"]), {k: Path(v) for k, v in cfg["recipes"].items()}
    result: dict = {"local": {}, "ray": {}, "seconds": {}}
    t0 = time.monotonic()

    def lap(what: str) -> None:
        result["seconds"][what] = round(time.monotonic() - t0 - sum(result["seconds"].values()), 1)

    try:
        local = Store(work / "local-cache")
        for variant in VARIANTS:
            result["local"][variant] = {"steps": _steps(execute(resolved(recipes["variants"], variant=variant), local))}
        result["local"]["kill"] = {"steps": _steps(execute(resolved(recipes["kill"]), local))}
        lap("local builds")
        with cluster(work) as (address, registry, caches):
            lap("cluster start")
            remote = f"oci://{registry}/forge-cache"
            driver = Store(work / "driver-cache")
            started, messages = [], {}
            try:    # both variants as one graph: the shared nodes run once
                outcomes = _ray_build(recipes["variants"], driver, address, remote, started, messages)
                for variant, out in outcomes.items():
                    steps = _steps(out)
                    result["ray"][variant] = {"steps": steps, "nodes": _nodes(caches, steps)}
            except Exception as e:  # noqa: BLE001
                result["ray"] = {v: {"error": f"{type(e).__name__}: {e}"} for v in VARIANTS}
            result["ray"]["started"], result["ray"]["messages"] = started, messages
            lap("ray build of both variants")
            result["kill"] = _kill_scenario(recipes["kill"], work, address, remote, caches)
            lap("kill scenario")
            t1 = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "forge", "build", str(recipes["l4"]), "--executor", "ray",
                                   "--ray-address", address, "--cache-dir", str(work / "l4-cache"),
                                   "--cache-remote", remote],
                                  capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
            result["l4"] = {"exit": proc.returncode, "seconds": time.monotonic() - t1, "stderr": proc.stderr + proc.stdout}
            lap("l4 fail-fast")
            ray.shutdown()
    finally:
        (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


def _kill_scenario(recipe: Path, work: Path, address: str, remote: str, caches: dict[str, Path]) -> dict:
    """SIGKILL the worker that ran the gate as it was about to commit (the runner's test hook stops it
    there); Ray runs the task again; that attempt (stopped at the same point) is let go on: the build completes."""
    import ray

    from conftest import resolved
    from forge.store.local import Store

    ray.shutdown()
    ray.init(address=address, runtime_env={"env_vars": {HOOK: "gate"}}, logging_level="ERROR",
             log_to_driver=False)
    seen: list[int] = []
    state: dict = {}

    def watch() -> None:
        while len(seen) < 2 and not state.get("done"):
            for cache in caches.values():
                marker = cache / "gate.stopped"
                if marker.exists() and marker.read_text().strip():
                    pid = int(marker.read_text())
                    marker.unlink()
                    seen.append(pid)
                    if len(seen) == 1:
                        os.kill(pid, signal.SIGKILL)
                        time.sleep(1)
                        state["remote_had_key"] = _remote_has_candidate(cache, remote)
                    else:
                        os.kill(pid, signal.SIGCONT)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out = _ray_build_one(resolved(recipe), Store(work / "kill-driver-cache"), address, remote)
        return {"steps": _steps(out), "stopped_pids": seen, "remote_had_key_after_kill": state.get("remote_had_key")}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "stopped_pids": seen}
    finally:
        state["done"] = True
        ray.shutdown()


def _remote_has_candidate(cache: Path, remote: str) -> bool | None:
    """Whether the remote step cache holds the stopped gate's key (its staging dir names the key)."""
    from forge.store.remote import RemoteCache

    staged = [p.name for p in (cache / "staging").glob("*")] if (cache / "staging").exists() else []
    keys = [n.split(".")[0] for n in staged]
    if not keys:
        return None
    rc = RemoteCache.parse(remote, "readwrite")
    return any(rc.has(k) for k in keys)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
