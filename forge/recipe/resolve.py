"""The resolution stage: one variant of a recipe turned into every fact a build needs, derived once.

    parse → validate → complete (``forge.recipe.load``) → resolve (here) → ``Resolved``

Resolving decides, from the recipe and the catalogs alone: the quantize backend and the checkpoint format it
writes; the serving engine and what it declares (a compile step, an artifact bound to the GPU that built it, its
own rules); the base image and its locked digest; the capability verdict of the method on the target GPU; the
model's shape from its config.json, the quantize pre-flight and the fit. (A local model directory's weight headers
are read by ``forge validate`` and by the build's resolve step when it runs, never by a no-op rebuild.)
``Resolved`` is frozen. The steps, the registry's annotations, ``select``, ``deploy``, the report and
``method: auto`` read it; none of them parses the recipe again or asks a catalog what is already decided here.

Everything a recipe gets wrong is collected and raised together as one RecipeError (exit 2), located in the file.
A recipe with variants resolves to one ``Resolved`` per variant (``resolve_all``); ``check`` keeps each variant's
problems apart for ``forge validate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge import backends, engines
from forge.core import options
from forge.core.errors import ForgeError, RecipeError, UsageError
from forge.engines.base import Engine
from forge.gpu import catalog, host_fit
from forge.gpu.host_fit import Need
from forge.gpu.capability import Verdict, check as capability_check
from forge.gpu.fit import FitReport, explain, fit, plan_from_recipe
from forge.image.bases import Base, resolve_base
from forge.model.shape import ModelShape, source_shape
from forge.recipe.load import LoadedRecipe, load_recipe, load_sections

__all__ = ["Resolved", "Checked", "resolve", "resolve_loaded", "resolve_all", "check", "variant_names", "has_variants",
           "sections"]

AUTO = "auto"


@dataclass(frozen=True)
class Resolved:
    """A recipe (one variant of it) with what it implies, decided once. Reads like the loaded recipe too
    (``recipe``, ``path``, ``digest``, ``where`` …), so a step reads ``ctx.recipe.recipe.quantize`` as before."""

    loaded: LoadedRecipe
    downloads: Path                    # where sources are fetched (the step cache's downloads/)
    backend: str | None                # the quantize backend (None for method: auto, which picks per trial)
    format: str                        # the checkpoint format written: "bf16" for method none, "" for auto
    engine: Engine
    gpu: catalog.Gpu
    base: Base | None                  # container.base from the catalog (None without a container section)
    base_digest: str | None            # its locked digest (None: built by forge, or not locked)
    capability: Verdict | None         # the method on this GPU and engine (None for method: auto)
    shape: ModelShape | None           # from config.json (None when it is not available offline)
    fit: FitReport | None              # GPU targets only
    calibrates: bool                   # the quantize step needs calibration data
    verifies: bool                     # the written checkpoint is verified against BF16's tokens (reference step)
    compiles: bool                     # a compile step builds an engine from the checkpoint (engine hook)
    gpu_bound: bool                    # the image runs only on the GPU model it was built on (engine hook)
    warnings: tuple[str, ...] = ()
    host_needs: tuple[Need, ...] = ()  # what the steps that hold the model need of this host's memory (CPU steps)
    weights: str = "baked"             # container.weights decided: "image" (model image + weights-free serving
                                       # image) or "baked" (the weights in the serving image)

    # -------------------------------------------------------------- the recipe as loaded
    @property
    def recipe(self):
        return self.loaded.recipe

    @property
    def path(self) -> Path:
        return self.loaded.path

    @property
    def digest(self) -> str:
        return self.loaded.digest

    @property
    def ci(self) -> bool:
        return self.loaded.ci

    @property
    def variant(self) -> str | None:
        return self.loaded.variant

    @property
    def overrides(self) -> dict:
        return self.loaded.overrides

    @property
    def base_dir(self) -> Path:
        return self.loaded.base_dir

    @property
    def scheme(self) -> str | None:
        """The scheme the checkpoint runs as (the capability verdict's: W4A16, FP8-W8A8, BF16); None for method auto."""
        return self.capability.scheme if self.capability is not None else None

    @property
    def cache_root(self) -> Path:
        """The step cache this resolution is for (``downloads`` lives in it): where host probes are remembered."""
        return self.downloads.parent

    def where(self, *keys: str | int) -> str:
        return self.loaded.where(*keys)

    def resolve_path(self, value: str) -> Path:
        return self.loaded.resolve_path(value)

    # -------------------------------------------------------------- derived views
    @property
    def is_auto(self) -> bool:
        return self.recipe.quantize.method == AUTO

    @property
    def on_cpu(self) -> bool:
        return self.gpu.is_cpu

    def trial(self, quantize: dict) -> "Resolved":
        """This recipe with ``quantize`` overrides on top (a ``method: auto`` trial), resolved like any recipe."""
        return resolve(self.path, downloads=self.downloads, ci=self.ci, variant=self.variant,
                       overrides={**self.overrides, "quantize": quantize})

    def request_key(self) -> tuple:
        """What tells this resolution apart from another of the same file (a variant, a trial's overrides)."""
        import json

        return self.variant, json.dumps(self.overrides, sort_keys=True, default=str)


def resolve(path: str | Path, *, downloads: Path, ci: bool = False, variant: str | None = None,
            overrides: dict | None = None, target: bool = True) -> Resolved:
    """Load the recipe (its ``variant``, ``overrides`` on top) and resolve it. RecipeError (exit 2) with every problem.
    ``target=False`` leaves out the contract with the recipe's own target.gpu (the method's legality there and whether
    the model fits it: ``capability`` and ``fit`` are None), for ``forge fit RECIPE --gpu X``, which reports on X
    instead; everything else (the model's config, the quantize pre-flight) is still checked."""
    return resolve_loaded(load_recipe(path, ci=ci, variant=variant, overrides=overrides), downloads, target=target)


def resolve_loaded(loaded: LoadedRecipe, downloads: Path, *, target: bool = True) -> Resolved:
    r = loaded.recipe
    q, t = r.quantize, r.target
    problems: list[str] = []
    warnings = list(loaded.warnings)
    engine = engines.get(t.engine)
    gpu = catalog.gpu(t.gpu)
    auto = q.method == AUTO

    backend = None if auto else backends.backend_for(q, t.engine)
    if problems := backends.problems(loaded):
        raise RecipeError(problems)
    fmt = "" if auto else ("bf16" if q.method == "none" else backends.get(backend).format(q))
    base = digest = None
    if r.container is not None:
        try:
            base, digest = resolve_base(loaded, fmt)
        except RecipeError as e:
            problems += e.problems
        else:
            if not base.built and digest is None:
                warnings.append(f"{loaded.where('container', 'base')}: base {base.name} is not locked to a digest "
                                "(an error under --ci); run `forge lock`")
    problems += [f"{loaded.where(*keys)}: {msg}" for keys, msg in engine.problems(r, base)]
    weights, why_not = weights_of(r, engine, gpu)
    if why_not:
        problems.append(f"{loaded.where('container', 'weights')}: {why_not}")
    if problems:
        raise RecipeError(problems)

    capability = shape = report = None
    if not auto and target:
        capability = capability_check(gpu, t.engine, q.method, q.bits)
        if not capability.ok:
            raise RecipeError([f"{loaded.where('quantize', 'method')}: {q.method} is not legal for target "
                               f"{gpu.name}/{t.engine}: {capability.message}"],
                              hint="Pick a method the GPU supports (forge fit --list shows capabilities) or another "
                                   "target.gpu.")
        if capability.message:
            warnings.append(f"{loaded.where('quantize', 'method')}: {capability.message}")
    if not auto:
        shape, report, more = _shape_and_fit(loaded, gpu, backend, downloads, target=target)
        warnings += more
    calibrates = not auto and backends.needs_calibration(q, t.engine)
    return Resolved(
        loaded=loaded, downloads=Path(downloads), backend=backend, format=fmt, engine=engine, gpu=gpu, base=base,
        base_digest=digest, capability=capability, shape=shape, fit=report,
        host_needs=host_fit.needs(shape, q.method, calibrates=calibrates, evaluates=r.eval is not None,
                                  recipe_dtype=r.model.dtype, streams=not auto and backends.streams(q, t.engine),
                                  offloads=not auto and backends.offloads(q, t.engine),
                                  calibration=(q.calibration.samples, q.calibration.max_seq_len) if q.calibration
                                  else (128, 512),
                                  whole_reference=not auto and not options.current().streaming
                                  and backends.verifies(q, t.engine)),
        calibrates=calibrates,
        verifies=not auto and backends.verifies(q, t.engine),
        compiles=engine.compiles(r), gpu_bound=engine.gpu_bound(r), warnings=tuple(dict.fromkeys(warnings)),
        weights=weights)


def weights_of(r, engine: Engine, gpu) -> tuple[str, str | None]:
    """container.weights decided: (baked | image, why the recipe's explicit choice cannot be, or None). Default:
    image on a GPU target, baked on a CPU target (the demo) and for a compiled engine (bound to its model)."""
    c = r.container
    if c is None:
        return "baked", None
    if c.weights is None:
        return ("baked" if gpu.is_cpu or engine.compiles(r) else "image"), None
    if c.weights == "image" and engine.compiles(r):
        return "baked", ("image: a compiled TensorRT-LLM engine (trtllm.mode: engine) is bound to its model and GPU "
                         "and ships inside the serving image; use container.weights: baked, or trtllm.mode: pytorch")
    if c.weights == "image" and c.weights_compression != "none":
        return "baked", (f"image with weights_compression: {c.weights_compression}: a model image's layers are "
                         "uncompressed (one per shard, shared by digest); remove container.weights_compression, or "
                         "use container.weights: baked")
    return c.weights, None


def _shape_and_fit(loaded: LoadedRecipe, gpu, backend: str | None, downloads: Path, *,
                   target: bool = True) -> tuple[ModelShape | None, FitReport | None, list[str]]:
    """The model's shape from config alone, the quantize pre-flight on it, and (GPU targets) the fit."""
    r = loaded.recipe
    if gpu.is_cpu and r.quantize.method == "none" and not engines.get(r.target.engine).cpu_kernels:
        return None, None, []   # (an engine's own CPU build plans its KV cache from the shape)
    try:
        shape = source_shape(r.model.source, loaded.base_dir, downloads)
    except (ValueError, OSError) as e:
        raise RecipeError([f"{loaded.where('model', 'source')}: {e}"]) from None
    if shape is None:
        return None, None, [f"{loaded.where('model', 'source')}: config.json not available offline; capacity and "
                            "quantize pre-flight not checked"]
    if problems := backends.preflight(loaded, shape, backend):
        raise RecipeError(problems)
    if gpu.is_cpu or not target:
        return shape, None, []
    report = fit(shape, gpu, plan_from_recipe(r))
    if not report.fits:
        raise RecipeError([f"{loaded.where('target', 'gpu')}: the model does not fit {gpu.name}: {explain(report)}"],
                          hint="Quantize further, lower target.max_model_len or max_num_seqs, use kv_cache: fp8, "
                               "raise target.tensor_parallel, or pick a larger GPU (forge fit shows the numbers).")
    return shape, report, []


# ---------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Checked:
    """One variant checked against the GPU it names: resolved (with its warnings), or its error."""
    name: str
    resolved: Resolved | None = None
    error: ForgeError | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.resolved.warnings if self.resolved else ()

    @property
    def fit(self) -> Any:
        return self.resolved.fit if self.resolved else None


def variant_names(path: str | Path, *, ci: bool = False, selected: list[str] | None = None) -> list[str]:
    """The recipe's variant names (``selected`` ones, in the recipe's order); unknown names are exit 2."""
    names = [v.name for v in load_recipe(path, ci=ci).recipe.variants]
    if unknown := [n for n in dict.fromkeys(selected or ()) if n not in names]:
        listed = f"its variants: {', '.join(names)}" if names else "the recipe declares no variants"
        raise UsageError(f"{path}: no variant named {', '.join(map(repr, unknown))}; {listed}",
                         hint="Pass one of the recipe's variant names to --variant, or leave --variant out to "
                              "build them all.")
    return [n for n in names if not selected or n in selected]


def has_variants(path: str | Path, *, ci: bool = False) -> bool:
    return bool(load_recipe(path, ci=ci).recipe.variants)


def sections(path: str | Path, raw: bytes | None = None, *, variant: str | None = None):
    """The recipe's sections (``forge.recipe.schema.Recipe``, the variant merged in) as they were built, not
    resolved against or checked on this machine: ``forge deploy`` reads what a build elsewhere decided. ``raw``:
    the recipe's bytes when they come from elsewhere (a record's recipe evidence); ``path`` then only names it."""
    return load_sections(path, Path(path).read_bytes() if raw is None else raw, variant=variant)


def fits_here(resolved: Resolved) -> None:
    """RecipeError (exit 2) naming each step that cannot fit this host's memory, with the numbers and what to do
    (``forge validate``; a build refuses the step itself, exit 5, when it is about to run)."""
    if short := host_fit.shortfalls(resolved.host_needs):
        raise RecipeError([f"{resolved.where('quantize', 'method')}: {msg}" for _, msg in short],
                          hint=" ".join(dict.fromkeys(n.advice for n, _ in short)))


def check(path: str | Path, downloads: Path, *, ci: bool = False, selected: list[str] | None = None,
          here: bool = False) -> list[Checked]:
    """Resolve every (selected) variant (``here``: and check it fits this host's memory); problems are kept per
    variant, not raised."""
    out = []
    for name in variant_names(path, ci=ci, selected=selected):
        try:
            resolved = resolve(path, downloads=downloads, ci=ci, variant=name)
            if here:
                fits_here(resolved)
            if resolved.is_auto:
                raise RecipeError([f"{resolved.where('quantize', 'method')}: method: auto cannot be used in a recipe "
                                   f"with variants yet (in variant {name!r})"],
                                  hint="Run the auto walk on a recipe without variants, then write the winning "
                                       "scheme into the variant (its decision report names it).")
        except ForgeError as e:
            out.append(Checked(name, error=e))
            continue
        out.append(Checked(name, resolved))
    return out


def resolve_all(path: str | Path, downloads: Path, *, ci: bool = False,
                selected: list[str] | None = None) -> list[Resolved]:
    """Every variant a build of this recipe builds (``selected`` ones), or the recipe itself when it has none.
    One RecipeError (exit 2) with every variant's problems when any variant is invalid."""
    if not selected and not has_variants(path, ci=ci):
        return [resolve(path, downloads=downloads, ci=ci)]
    checked = check(path, downloads, ci=ci, selected=selected)
    if bad := [c for c in checked if c.error is not None]:
        problems = [p for c in bad for p in _problems(c)]
        raise RecipeError(problems, hint=bad[0].error.hint or "Fix the variant, or leave it out with --variant.")
    return [c.resolved for c in checked]


def _problems(c: Checked) -> list[str]:
    if isinstance(c.error, RecipeError):
        return [p if "(in variant" in p else f"{p} (in variant {c.name!r})" for p in c.error.problems]
    return [f"variant {c.name!r}: {c.error.message}"]
