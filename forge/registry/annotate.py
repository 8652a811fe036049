"""The ``dev.forge.*`` annotations that say which GPU a published variant is for (README: "Variants").

They are computed once, at publish, from the variant's merged recipe, the GPU catalog, the engine table and
the fit model, and kept on the record and on every descriptor that points at the image: the embedded
registry's ``index.json`` entry and the variant matrix (forge/registry/matrix.py). The image manifest itself is
not rewritten: its digest is what the eval and scan evidence name. ``forge registry select`` reads only these
annotations, so a matrix pulled from any registry can be matched without the recipe.
"""
from __future__ import annotations
from forge.gpu import fit
from forge.model import shape as modelshape
from forge.steps import quantize

NS = "dev.forge."
VARIANT = NS + "variant"                       # the variant's name (also its tag: <name>:<variant>)
TAG = NS + "variant.tag"                       # <name>:<variant>
GPU = NS + "gpu"                               # catalog name (H100-SXM, L4, CPU)
PRODUCTS = NS + "gpu.products"                 # GFD nvidia.com/gpu.product values, comma-separated
COMPUTE_CAPABILITY = NS + "gpu.compute-capability"
MEMORY = NS + "gpu.memory-gib"                 # the catalog GPU's memory
MIN_DRIVER = NS + "driver.min"                 # the base image's minimum NVIDIA driver
METHOD = NS + "method"
ENGINE = NS + "engine"
KERNEL = NS + "kernel"                         # the kernel the engine is expected to run (forge.gpu.capability)
GPU_BOUND = NS + "gpu.bound"                   # "true": runs only on the GPU model it was built on (a compiled engine)
TENSOR_PARALLEL = NS + "tensor-parallel"
NEED = NS + "fit.need-gib"                     # per-GPU memory the fit model says it needs (weights, KV, overhead)
UTILIZATION = NS + "fit.memory-utilization"    # the engine's share of GPU memory it was checked at
STATUS = NS + "status"                         # the record's status when the matrix was written
RECORD = "dev.forge.record"
WEIGHTS = NS + "weights"                       # "image": the image is weights-free; the model image is mounted at /models
MODEL_IMAGE = NS + "model-image.digest"        # the model image (same repository, tag <tag>-model)
MODELPACK = NS + "modelpack.digest"            # its ModelPack manifest (tag <tag>-modelpack)

__all__ = ["for_variant", "for_model_image"]


def for_model_image(record) -> dict[str, str]:
    """The annotations that say a weights-free serving image's model image (none for baked weights)."""
    if not record.model_image_digest:
        return {}
    return {WEIGHTS: "image", MODEL_IMAGE: record.model_image_digest, MODELPACK: record.modelpack_digest or ""}


def for_variant(loaded, results: dict, engine: str | None) -> dict[str, str]:
    """The annotations of one variant's image (``loaded``: its resolved recipe); keys whose value forge cannot know
    are left out."""
    r = loaded.recipe
    g = loaded.gpu
    engine = engine or r.target.engine
    ann = {VARIANT: loaded.variant, TAG: f"{r.name}:{loaded.variant}", GPU: g.name,
           PRODUCTS: ",".join(g.gfd_products), MEMORY: _num(g.memory_gib), METHOD: r.quantize.method,
           ENGINE: engine, TENSOR_PARALLEL: str(r.target.tensor_parallel),
           UTILIZATION: _num(r.target.gpu_memory_utilization)}
    if g.compute_capability is not None:
        ann[COMPUTE_CAPABILITY] = "%d.%d" % g.compute_capability
    verdict = loaded.capability
    if verdict is not None and verdict.ok and verdict.kernel != "-":
        ann[KERNEL] = verdict.kernel
    if loaded.gpu_bound:
        ann[GPU_BOUND] = "true"
    if loaded.base is not None and loaded.base.min_driver is not None:
        ann[MIN_DRIVER] = loaded.base.min_driver
    if not g.is_cpu and (need := _need_gib(loaded, results, g)) is not None:
        ann[NEED] = _num(need)
    return ann


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _need_gib(loaded, results: dict, g) -> float | None:
    """Per-GPU GiB the fit model says the variant needs, from the quantized checkpoint's own config.json."""
    if "quantize" not in results:
        return None
    config = quantize.Output.read(results["quantize"].entry).dir / "config.json"
    if not config.is_file():
        return None
    try:
        shape = modelshape.from_config_file(config)
    except (ValueError, KeyError, OSError):
        return None
    try:
        report = fit.fit(shape, g, fit.plan_from_recipe(loaded.recipe))
    except Exception:   # the build already passed validate; a fit that cannot be redone only drops this annotation
        return None
    return (report.budget_gb - report.headroom_gb) * 1e9 / fit.GIB
