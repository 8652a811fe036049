"""Which published variant a Kubernetes node should run, from its GFD ``nvidia.com/gpu.product`` label.

The node's label is read as GFD writes it (forge/gpu/catalog/gpus.yaml documents the rule): a trailing ``-SHARED``
(time-slicing / MPS) is stripped first, then a ``-MIG-<profile>`` suffix (mig.strategy=single), whose profile
(e.g. ``1g.5gb``) gives the slice's memory; the rest must be, exactly, a product label of a catalog GPU. Each
variant in the matrix is then

- **runnable**: the node's product label is one of the variant's (exact string match; an ``NVIDIA-A10G`` node
  never matches an A100 variant) and the node has the whole GPU (time-sliced included: pods then share it);
- **runnable with less memory**: a MIG slice of the variant's GPU, or a smaller-memory part of the same
  architecture (same compute capability), where the fit model's per-GPU need recorded at publish
  (``dev.forge.fit.need-gib``) fits the node's memory at the variant's memory utilization. Never for a variant
  bound to the GPU it was built on (``dev.forge.gpu.bound``: a compiled TensorRT-LLM engine; TensorRT-LLM's pytorch
  mode serves the checkpoint and is not bound) nor for tensor parallel > 1 on a MIG slice;
- **incompatible**, with why; variants the matrix left out (rejected) are listed as such.

The choice: the first runnable variant, validated/promoted ones first, in matrix (recipe) order; else the first
runnable with less memory; else none. A variant built with ``container.weights: image`` names both digests: the
weights-free serving image and the model image to mount at /models (and its ModelPack manifest).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass

from forge.gpu.catalog import Gpu, gpus, product_labels
from forge.core.errors import UsageError
from forge.registry import annotate as ann
from forge.registry.matrix import Matrix
from forge.registry.record import PROMOTABLE

__all__ = ["Node", "Candidate", "Selection", "parse_node", "select"]

RUNNABLE, LESS_MEMORY, INCOMPATIBLE, LEFT_OUT = "runnable", "runnable with less memory", "incompatible", "not published"
SHARED = "-SHARED"
_MIG = re.compile(r"^(?P<product>.+)-MIG-(?P<profile>(?P<g>\d+)g\.(?P<gb>\d+)gb(?:\+me)?)$")


@dataclass(frozen=True)
class Node:
    label: str                 # as given
    product: str               # the plain GFD product label (suffixes stripped)
    gpu: Gpu
    mig_profile: str | None    # e.g. 1g.5gb
    shared: bool               # -SHARED: time-sliced / MPS
    memory_gib: float          # the whole GPU's, or the MIG slice's

    def describe(self) -> str:
        what = f"{self.gpu.name} ({self.product})"
        if self.mig_profile:
            what += f", MIG slice {self.mig_profile} ({self.memory_gib:.1f} GiB)"
        return what + (", time-sliced" if self.shared else "")


@dataclass(frozen=True)
class Candidate:
    variant: str
    tag: str
    digest: str
    image: str                 # the reference to deploy (by digest)
    status: str                # the record's (validated, unscanned, … or rejected for a left-out one)
    gpu: str
    verdict: str               # runnable | runnable with less memory | incompatible | not published
    why: str
    memory_gib: float | None = None   # the node's memory, when it is less than the variant's GPU's
    weights: str = "baked"            # image: ``image`` is weights-free; mount ``model_image`` at /models
    model_image_digest: str = ""      # container.weights: image: the model image (same repository, <tag>-model)
    modelpack_digest: str = ""        # and its ModelPack manifest (<tag>-modelpack)
    model_image: str = ""             # the model image's reference to mount (by digest)


@dataclass(frozen=True)
class Selection:
    node: Node
    matrix: Matrix
    chosen: Candidate | None
    candidates: tuple[Candidate, ...]

    def to_json(self) -> dict:
        node = asdict(self.node) | {"gpu": self.node.gpu.name}
        return {"gpu_product": self.node.label, "node": node, "matrix": {"name": self.matrix.name,
                "digest": self.matrix.digest, "where": self.matrix.where},
                "selected": asdict(self.chosen) if self.chosen else None,
                "variants": [asdict(c) for c in self.candidates]}


def parse_node(label: str) -> Node:
    """A GFD nvidia.com/gpu.product value → the node's GPU; UsageError (exit 2) with close matches if unknown."""
    labels = product_labels()
    rest, shared = (label[: -len(SHARED)], True) if label.endswith(SHARED) else (label, False)
    profile = None
    if m := _MIG.match(rest):
        rest, profile = m["product"], m["profile"]
    g = labels.get(rest)
    if g is None:
        close = difflib.get_close_matches(rest, list(labels), n=3, cutoff=0.5)
        raise UsageError(f"--gpu-product {label!r}: {rest!r} is not a GPU product label forge knows"
                         + (f"; did you mean {', '.join(close)}?" if close else ""),
                         hint="Give the node's nvidia.com/gpu.product label exactly (`kubectl get nodes -L "
                              "nvidia.com/gpu.product`); known: " + ", ".join(sorted(labels))
                              + " (plus GFD's -MIG-<profile> and -SHARED suffixes).")
    memory = int(m["gb"]) * 1e9 / (1 << 30) if profile else g.memory_gib   # a slice holds only its own memory
    return Node(label, rest, g, profile, shared, memory)


def select(matrix: Matrix, label: str) -> Selection:
    node = parse_node(label)
    candidates = [_judge(node, d, matrix) for d in matrix.entries]
    candidates += [Candidate(v, f"{matrix.name}:{v}", "", "", "rejected", "", LEFT_OUT, why)
                   for v, why in sorted(matrix.left_out.items())]

    def best(verdict: str) -> Candidate | None:
        pool = [c for c in candidates if c.verdict == verdict]
        return next((c for c in pool if c.status in PROMOTABLE), pool[0] if pool else None)

    return Selection(node, matrix, best(RUNNABLE) or best(LESS_MEMORY), tuple(candidates))


def _judge(node: Node, d: dict, matrix: Matrix) -> Candidate:
    a = d.get("annotations", {})
    variant = a.get(ann.VARIANT, d["digest"][7:19])
    products = [p for p in a.get(ann.PRODUCTS, "").split(",") if p]
    gpu, engine, cc = a.get(ann.GPU, "?"), a.get(ann.ENGINE, ""), a.get(ann.COMPUTE_CAPABILITY)
    memory = float(a.get(ann.MEMORY, 0) or 0)
    node_cc = "%d.%d" % node.gpu.compute_capability if node.gpu.compute_capability else None

    model = a.get(ann.MODEL_IMAGE, "")

    def out(verdict: str, why: str, less: float | None = None) -> Candidate:
        return Candidate(variant, a.get(ann.TAG, f"{matrix.name}:{variant}"), d["digest"], matrix.image(d["digest"]),
                         a.get(ann.STATUS, "?"), gpu, verdict, why, less, weights=a.get(ann.WEIGHTS, "baked"),
                         model_image_digest=model, modelpack_digest=a.get(ann.MODELPACK, ""),
                         model_image=matrix.image(model) if model else "")

    exact = node.product in products
    if exact and not node.mig_profile:
        return out(RUNNABLE, f"built for {gpu} ({node.product})"
                   + ("; time-sliced: the pods on this GPU share its memory" if node.shared else ""))
    if not products:
        return out(INCOMPATIBLE, f"a {gpu} variant: it does not run on a GPU" if gpu in gpus() and gpus()[gpu].is_cpu
                   else f"{gpu} has no GPU product label in forge's catalog")
    if not exact and cc != node_cc:
        return out(INCOMPATIBLE, f"built for {gpu} ({', '.join(products)}, compute capability {cc}); this node is "
                                 f"{node.gpu.name} (compute capability {node_cc}), another architecture")
    if not exact and node.memory_gib >= memory:
        return out(INCOMPATIBLE, f"built and validated for {gpu} ({', '.join(products)}); this node is "
                                 f"{node.gpu.name}: only the same product, or a smaller part the fit model checks, is selected")
    # the same GPU cut to a MIG slice, or a smaller part of the same architecture: the fit model decides
    where = f"a MIG slice ({node.mig_profile}) of {node.gpu.name}" if node.mig_profile else node.gpu.name
    if a.get(ann.GPU_BOUND) == "true":
        return out(INCOMPATIBLE, f"its {engine} engine is bound to the GPU it was built on ({gpu}); this node has {where}")
    if node.mig_profile and int(a.get(ann.TENSOR_PARALLEL, "1")) > 1:
        return out(INCOMPATIBLE, f"needs tensor parallel {a[ann.TENSOR_PARALLEL]}; {where} is one device without NVLink")
    if ann.NEED not in a:
        return out(INCOMPATIBLE, f"{where} has {node.memory_gib:.1f} GiB, less than {gpu}'s {memory:g} GiB, and the "
                                 "variant records no fit (dev.forge.fit.need-gib) to check it against")
    need, util = float(a[ann.NEED]), float(a.get(ann.UTILIZATION, "0.9"))
    budget = node.memory_gib * util
    if need > budget:
        return out(INCOMPATIBLE, f"needs {need:.1f} GiB per GPU; {where} offers {budget:.1f} GiB "
                                 f"({node.memory_gib:.1f} GiB × {util:g} memory utilization)")
    return out(LESS_MEMORY, f"{where}: {node.memory_gib:.1f} GiB instead of {gpu}'s {memory:g} GiB; the fit model's "
                            f"{need:.1f} GiB fits in {budget:.1f} GiB"
                            + ("; time-sliced: the pods on it share that memory" if node.shared else ""), node.memory_gib)
