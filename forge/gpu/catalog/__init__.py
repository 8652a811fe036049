"""Data catalogs shipped with forge (GPUs). Loaded lazily, once."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from ruamel.yaml import YAML

__all__ = ["Gpu", "gpus", "gpu", "product_labels"]


@dataclass(frozen=True)
class Gpu:
    name: str
    vendor: str
    memory_gib: float
    bandwidth_gbs: float
    compute_capability: tuple[int, int] | None
    fp8: bool
    price_per_hour: float
    smi: tuple[str, ...] = ()                  # names nvidia-smi reports for it
    trtllm_cluster_keys: tuple[str, ...] = ()  # TensorRT-LLM build_config.auto_parallel_config.cluster_key
    gfd_products: tuple[str, ...] = ()         # Kubernetes GFD nvidia.com/gpu.product values (smi, spaces as '-')
    cpu_isa: str | None = None                 # CPU targets: the least x86 instruction set it runs on (avx2 | avx512)

    @property
    def is_cpu(self) -> bool:
        return self.vendor == "none"


def _cc(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    major, minor = str(value).split(".")
    return int(major), int(minor)


@cache
def gpus() -> dict[str, Gpu]:
    text = resources.files(__package__).joinpath("gpus.yaml").read_text()
    doc = YAML(typ="safe").load(text)
    raw, products = doc["gpus"], doc.get("gfd_products") or {}
    return {
        name: Gpu(name=name, vendor=e["vendor"], memory_gib=float(e["memory_gib"]),
                  bandwidth_gbs=float(e["bandwidth_gbs"]), compute_capability=_cc(e["compute_capability"]),
                  fp8=bool(e["fp8"]), price_per_hour=float(e["price_per_hour"]), smi=tuple(e.get("smi", ())),
                  trtllm_cluster_keys=tuple(e.get("trtllm_cluster_keys", ())), cpu_isa=e.get("cpu_isa"),
                  gfd_products=tuple(products.get(name, ())))
        for name, e in raw.items()
    }


def gpu(name: str) -> Gpu:
    return gpus()[name]


def product_labels() -> dict[str, Gpu]:
    """Every GFD ``nvidia.com/gpu.product`` value in the catalog → its GPU (the plain label: no -SHARED/-MIG-…)."""
    return {label: g for g in gpus().values() for label in g.gfd_products}
