"""Base-image catalog, lock file, and the generated Containerfile.

The catalog (``containers/bases.yaml``) is found by walking up from the recipe, so a platform team
keeps its own next to its recipes; forge's own is the fallback. The Containerfile is assembled from
small pure functions, one fragment each, in an order chosen for layer reuse: the base, then the
weights (the one big layer, which depends on nothing but the weights), then metadata and the
engine command (config only, no layers), so changing an engine flag never rebuilds the weights layer.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from forge.errors import RecipeError

MODEL_DIR = "/opt/forge/model"
ENGINE_DIR = "/opt/forge/engine"      # a TensorRT-LLM engine (legacy engine mode), its own layer
PORT = 8000
UID = 10001
CATALOG, LOCK = "bases.yaml", "bases.lock.json"


@dataclass(frozen=True)
class Base:
    name: str
    engine: str
    engine_version: str
    image: str | None = None          # a published image (GPU bases)
    build: str | None = None          # "debian": built by forge
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    torch_index: str | None = None
    cuda: str | None = None
    min_driver: str | None = None
    compat_driver_floor: str | None = None
    gpu_arch: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    catalog: Path = field(default=Path("."), compare=False)

    @property
    def built(self) -> bool:
        return self.build is not None


def find_catalog(start: Path) -> Path:
    here = start.resolve()
    for d in (here, *here.parents):
        if (d / "containers" / CATALOG).is_file():
            return d / "containers" / CATALOG
    return Path(__file__).resolve().parents[1] / "containers" / CATALOG


def load_catalog(path: Path) -> dict[str, Base]:
    st = path.stat()
    return _load_catalog(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load_catalog(path_str: str, _mtime_ns: int, _size: int) -> dict[str, Base]:
    from ruamel.yaml import YAML

    path = Path(path_str)
    raw = YAML(typ="safe").load(path.read_text())["bases"]
    out = {}
    for name, e in raw.items():
        e = {k: (tuple(v) if isinstance(v, list) else v) for k, v in e.items()}
        out[name] = Base(name=name, catalog=path, **e)
    return out


def load_lock(catalog: Path) -> dict[str, str]:
    lock = catalog.with_name(LOCK)
    return json.loads(lock.read_text()) if lock.is_file() else {}


def resolve_base(loaded) -> tuple[Base, str | None]:
    """The recipe's base and its locked digest (None when unlocked or built by forge)."""
    c = loaded.recipe.container
    catalog = find_catalog(loaded.base_dir)
    bases = load_catalog(catalog)
    if c.base not in bases:
        import difflib

        guess = difflib.get_close_matches(c.base, list(bases), n=1)
        raise RecipeError([f"{loaded.where('container', 'base')}: unknown base {c.base!r}"
                           + (f"; did you mean {guess[0]!r}?" if guess else "") + f" Bases in {catalog}: {', '.join(bases)}"])
    base = bases[c.base]
    digest = None if base.built else load_lock(catalog).get(c.base)
    problems = []
    if base.engine != loaded.recipe.target.engine:
        problems.append(f"{loaded.where('container', 'base')}: base {base.name} serves with {base.engine}, but "
                        f"target.engine is {loaded.recipe.target.engine}")
    if base.built and c.builder not in ("auto", "buildah"):
        problems.append(f"{loaded.where('container', 'builder')}: base {base.name} is built by forge with buildah; "
                        f"builder {c.builder} cannot use it. Set builder: auto or buildah")
    if not base.built and digest is None and loaded.ci:
        problems.append(f"{loaded.where('container', 'base')}: base {base.name} ({base.image}) is not locked to a "
                        f"digest; run `forge lock` where the registry is reachable and commit {catalog.with_name(LOCK)}")
    if problems:
        raise RecipeError(problems)
    return base, digest


# ------------------------------------------------------------------ the Containerfile


@dataclass(frozen=True)
class ImageSpec:
    """Everything the Containerfile says, fixed before it is written."""

    base_ref: str
    base: Base
    served_name: str
    engine_args: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    engine_dir: bool = False          # the build context holds engine/ (TensorRT-LLM engine mode)


def require_cuda(base: Base) -> str | None:
    """NVIDIA_REQUIRE_CUDA for a GPU base: the NVIDIA runtime refuses to start the container on a
    driver that cannot run this CUDA version (NGC bases ship `cuda>=9.0`, which enforces nothing)."""
    return f"cuda>={base.cuda}" if base.cuda else None


def engine_command(loaded, base: Base, served_name: str) -> tuple[str, ...]:
    t, q = loaded.recipe.target, loaded.recipe.quantize
    if base.engine == "vllm":
        cmd = ["vllm", "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT), "--served-model-name", served_name,
               "--max-model-len", str(t.max_model_len), "--max-num-seqs", str(t.max_num_seqs),
               "--gpu-memory-utilization", str(t.gpu_memory_utilization), "--tensor-parallel-size", str(t.tensor_parallel)]
        if q.method != "none":
            cmd += ["--quantization", "compressed-tensors"]
        if q.kv_cache == "fp8":
            cmd += ["--kv-cache-dtype", "fp8"]
        return tuple(cmd)
    if base.engine == "tgi":
        cmd = ["text-generation-launcher", "--model-id", MODEL_DIR, "--hostname", "0.0.0.0", "--port", str(PORT),
               "--max-total-tokens", str(t.max_model_len), "--max-input-tokens", str(max(1, t.max_model_len - 1)),
               "--max-concurrent-requests", str(t.max_num_seqs), "--cuda-memory-fraction", str(t.gpu_memory_utilization),
               "--num-shard", str(t.tensor_parallel)]
        if q.method != "none":
            cmd += ["--quantize", "compressed-tensors"]
        return tuple(cmd)
    if base.engine == "trtllm":
        from forge.trtllm import mode, serve_command

        # trtllm-serve names the model after its path; 1.0 has no --served_model_name
        return serve_command(loaded, MODEL_DIR, PORT, engine_dir=ENGINE_DIR if mode(loaded) == "engine" else None)
    return ("/opt/venv/bin/transformers", "serve", served_name, "--host", "0.0.0.0", "--port", str(PORT),
            "--device", "cpu", "--dtype", "auto")


# ------------------------------------------------------------------ cpu engine: the model as an HF cache entry
# `transformers serve` answers GET /v1/models by scanning the HF hub cache (HF_HUB_CACHE), and a model id it
# lists is one it loads (offline) from that cache. The image carries a cache whose one entry is the model,
# models--<id>/snapshots/<rev> being a relative link to MODEL_DIR: the weights stay at their fixed path, and the
# id clients list is the id they chat with. (A few hundred bytes in the weights layer, named after the model.)
HUB_DIR = "/opt/forge/hub"
HUB_REVISION = "0" * 40


def served_model_id(base: Base, name: str) -> str:
    """The model id the image serves: the recipe name, made a valid HF repo id for the cpu engine
    (no '--' or '..', at most 96 characters, ending in a letter or digit)."""
    if base.engine != "cpu":
        return name
    import re

    return re.sub(r"([-.])[-.]+", r"\1", name)[:96].rstrip("-.").removesuffix(".git") or "model"


def engine_env(base: Base) -> tuple[tuple[str, str], ...]:
    return (("HF_HUB_CACHE", HUB_DIR),) if base.engine == "cpu" else ()


def write_hub_entry(context: Path, model_id: str) -> None:
    """The cache entry naming the model, in the build context's hub/ (copied to HUB_DIR)."""
    import os

    repo = context / "hub" / f"models--{model_id}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_REVISION)    # no newline: the scanner reads the hash verbatim
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / HUB_REVISION).symlink_to(os.path.relpath(MODEL_DIR, f"{HUB_DIR}/models--{model_id}/snapshots"))


def _from(spec: ImageSpec) -> list[str]:
    return [f"FROM {spec.base_ref}"]


def _weights(spec: ImageSpec) -> list[str]:
    # The only big layer(s): they depend on the weights alone, so they come right after the base.
    lines = [f"COPY --chown={UID}:{UID} model/ {MODEL_DIR}/"]
    if spec.engine_dir:
        lines.append(f"COPY --chown={UID}:{UID} engine/ {ENGINE_DIR}/")
    if spec.base.engine == "cpu":
        lines.append(f"COPY --chown={UID}:{UID} hub/ {HUB_DIR}/")
    return lines


def _env(spec: ImageSpec) -> list[str]:
    return [f"ENV {k}={json.dumps(v)}" for k, v in spec.env]


def _labels(spec: ImageSpec) -> list[str]:
    return ["LABEL " + " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in spec.labels)] if spec.labels else []


def _runtime(spec: ImageSpec) -> list[str]:
    health = ("python3 -c \"import urllib.request,sys; "
              f"sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{PORT}/health', timeout=5).status == 200 else 1)\"")
    if spec.base.engine == "cpu":
        health = health.replace("python3", "/opt/venv/bin/python3", 1)
    return [f"USER {UID}:{UID}", f"WORKDIR {MODEL_DIR}", f"EXPOSE {PORT}",
            f"HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD {health}",
            f"ENTRYPOINT {json.dumps(list(spec.engine_args))}"]


FRAGMENTS = (_from, _weights, _env, _labels, _runtime)


def containerfile(spec: ImageSpec) -> str:
    head = ["# Generated by forge. Build context: this directory, with the model files in model/.",
            f"# Serve: {shlex.join(spec.engine_args)}"]
    body = [line for fragment in FRAGMENTS for line in fragment(spec)]
    return "\n".join(head + body) + "\n"
