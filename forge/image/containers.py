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

from forge.core.errors import RecipeError

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
    return Path(__file__).resolve().parents[2] / "containers" / CATALOG


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
    from forge.backends import checkpoint_format

    fmt = checkpoint_format(loaded)
    if base.formats and fmt not in (*base.formats, "bf16"):   # every engine serves an unquantized checkpoint
        problems.append(f"{loaded.where('container', 'base')}: base {base.name} loads {', '.join(base.formats)} "
                        f"checkpoints; this recipe's quantize step writes {fmt}. Pick a base that lists {fmt} "
                        f"under formats in {catalog}, or another quantize.backend")
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
    health_route: str = "/health"     # the engine's readiness route
    python: str = "python3"           # the image's Python, which runs the HEALTHCHECK
    extra_dirs: tuple[tuple[str, str], ...] = ()   # (build-context dir, image path) the engine asked for


def require_cuda(base: Base) -> str | None:
    """NVIDIA_REQUIRE_CUDA for a GPU base: the NVIDIA runtime refuses to start the container on a
    driver that cannot run this CUDA version (NGC bases ship `cuda>=9.0`, which enforces nothing)."""
    return f"cuda>={base.cuda}" if base.cuda else None


def engine_command(loaded, base: Base, served_name: str) -> tuple[str, ...]:
    """The engine's ENTRYPOINT for this recipe's checkpoint: asked of the engine module (forge.engines)."""
    from forge.backends import checkpoint_format
    from forge.engines import ServeAt, get

    return get(base.engine).serve_command(loaded, checkpoint_format(loaded),
                                          ServeAt(MODEL_DIR, PORT, served_name, engine_dir=ENGINE_DIR))


def image_spec(loaded, base: Base, *, base_ref: str, labels, env, engine_dir: bool = False,
               context: Path | None = None) -> ImageSpec:
    """The ImageSpec for a recipe on a base: the engine supplies the served model id, the command, its env,
    health route and Python, and (written into ``context``) any extra directories the image needs."""
    from forge.engines import get

    engine = get(base.engine)
    served = engine.served_name(loaded.recipe.name)
    extra = engine.context_dirs(context, served) if context is not None else ()
    return ImageSpec(base_ref=base_ref, base=base, served_name=served, engine_args=engine_command(loaded, base, served),
                     labels=tuple(labels), env=(*env, *engine.image_env()), engine_dir=engine_dir,
                     health_route=engine.health_route, python=engine.python, extra_dirs=tuple(extra))


def _from(spec: ImageSpec) -> list[str]:
    return [f"FROM {spec.base_ref}"]


def _weights(spec: ImageSpec) -> list[str]:
    # The checkpoint is not COPYed: forge appends it as the image's last layer itself (forge/image/weights_layer.py),
    # streamed into the OCI layout at hashing speed. A compiled engine and small extra dirs are COPYed here.
    lines = [f"# {MODEL_DIR}/: the checkpoint, appended by forge as the last layer (container.weights_compression)"]
    if spec.engine_dir:
        lines.append(f"COPY --chown={UID}:{UID} engine/ {ENGINE_DIR}/")
    lines += [f"COPY --chown={UID}:{UID} {src.rstrip('/')}/ {dst.rstrip('/')}/" for src, dst in spec.extra_dirs]
    return lines


def _env(spec: ImageSpec) -> list[str]:
    return [f"ENV {k}={json.dumps(v)}" for k, v in spec.env]


def _labels(spec: ImageSpec) -> list[str]:
    return ["LABEL " + " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in spec.labels)] if spec.labels else []


def _runtime(spec: ImageSpec) -> list[str]:
    health = (f"{spec.python} -c \"import urllib.request,sys; "
              f"sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:{PORT}{spec.health_route}', timeout=5).status "
              "== 200 else 1)\"")
    return [f"USER {UID}:{UID}", f"WORKDIR {MODEL_DIR}", f"EXPOSE {PORT}",
            f"HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD {health}",
            f"ENTRYPOINT {json.dumps(list(spec.engine_args))}"]


FRAGMENTS = (_from, _weights, _env, _labels, _runtime)


def containerfile(spec: ImageSpec) -> str:
    head = ["# Generated by forge. Build context: this directory; forge appends the model files (model/) as the last layer.",
            f"# Serve: {shlex.join(spec.engine_args)}"]
    body = [line for fragment in FRAGMENTS for line in fragment(spec)]
    return "\n".join(head + body) + "\n"


# ---------------------------------------------------------------------- forge lock (base tags -> digests)


def lock_bases(catalog: Path, names: list[str] | None = None, *, plain_http=lambda host: False,
               on_locked=lambda name, image, digest: None) -> Path:
    """Resolve the published bases' tags (all, or ``names``) to digests with skopeo; write the lock file
    beside the catalog atomically. Returns its path. Bases forge builds itself are never locked.
    ``plain_http(host)``: reach that registry without TLS (the registry client's policy, passed in)."""
    import shutil
    import subprocess

    from forge.core.errors import ToolError, UsageError

    bases = load_catalog(catalog)
    names = names or [n for n, b in bases.items() if not b.built]
    unknown = [n for n in names if n not in bases]
    if unknown:
        raise UsageError(f"unknown base {', '.join(unknown)}; bases in {catalog}: {', '.join(bases)}")
    if shutil.which("skopeo") is None:
        raise ToolError("skopeo is not on PATH: forge lock resolves digests with it", hint="apt-get install skopeo")
    lock_path = catalog.with_name(LOCK)
    lock = load_lock(catalog)
    for n in names:
        b = bases[n]
        if b.built:
            continue
        tls = ["--tls-verify=false"] if plain_http(b.image.split("/", 1)[0]) else []
        proc = subprocess.run(["skopeo", "inspect", "--no-tags", *tls, f"docker://{b.image}"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolError(f"skopeo could not inspect {b.image} (base {n}): {proc.stderr.strip()[-600:]}",
                            hint="Run forge lock where the registry is reachable; credentials come from the "
                                 "standard container auth files.")
        lock[n] = json.loads(proc.stdout)["Digest"]
        on_locked(n, b.image, lock[n])
    tmp = lock_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    tmp.replace(lock_path)
    return lock_path
