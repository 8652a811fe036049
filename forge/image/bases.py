"""The base-image catalog and its lock file.

The catalog (``containers/bases.yaml``) is found by walking up from the recipe, so a platform team keeps its own
next to its recipes; forge's own is the fallback. ``bases.lock.json`` beside it pins each published base to a
digest (``forge lock``). The resolution stage (forge.recipe.resolve) picks a recipe's base here, once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from forge.core.errors import RecipeError, ToolError, UsageError

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
    pip_remove: tuple[str, ...] = ()  # distributions uninstalled after pip (what a dependency drags in and breaks)
    versions: tuple[tuple[str, str], ...] = ()   # distribution -> version pip must have installed (checked, labelled)
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

    def version(self, dist: str) -> str | None:
        """The version of ``dist`` the base declares (``versions``), None when it declares none."""
        return dict(self.versions).get(dist)


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
        e = {k: (tuple(v) if isinstance(v, list) else tuple(sorted((str(a), str(b)) for a, b in v.items()))
                 if isinstance(v, dict) else v) for k, v in e.items()}
        out[name] = Base(name=name, catalog=path, **e)
    return out


def load_lock(catalog: Path) -> dict[str, str]:
    lock = catalog.with_name(LOCK)
    return json.loads(lock.read_text()) if lock.is_file() else {}


def resolve_base(loaded, fmt: str) -> tuple[Base, str | None]:
    """The recipe's base and its locked digest (None when unlocked or built by forge), checked against the engine
    and the checkpoint format ``fmt`` the recipe's quantize step writes. Called by the resolution stage only."""
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


# ---------------------------------------------------------------------- forge lock (base tags -> digests)


def lock_bases(catalog: Path, names: list[str] | None = None, *, plain_http=lambda host: False,
               on_locked=lambda name, image, digest: None) -> Path:
    """Resolve the published bases' tags (all, or ``names``) to digests with skopeo; write the lock file
    beside the catalog atomically. Returns its path. Bases forge builds itself are never locked.
    ``plain_http(host)``: reach that registry without TLS (the registry client's policy, passed in)."""
    import shutil
    import subprocess

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
