"""Names, labels and annotations: how every object points at its workload and back at the registry record."""
from __future__ import annotations

import re
from dataclasses import dataclass

from forge.deploy.gather import Artifact

PREFIX = "dev.forge"
RECORD = f"{PREFIX}/record"                 # label: the record id's first 12 hex (label values are <= 63 chars)
ANN = {"record-id": f"{PREFIX}/record-id", "image-digest": f"{PREFIX}/image-digest",
       "recipe-digest": f"{PREFIX}/recipe-digest", "eval-verdict-digest": f"{PREFIX}/eval-verdict-digest",
       "scan-verdict-digest": f"{PREFIX}/scan-verdict-digest", "model-digest": f"{PREFIX}/model-digest",
       "status": f"{PREFIX}/status", "gpu": f"{PREFIX}/gpu", "engine": f"{PREFIX}/engine",
       "model-image-digest": f"{PREFIX}/model-image-digest", "modelpack-digest": f"{PREFIX}/modelpack-digest"}

__all__ = ["Names", "names", "dns_label"]


def dns_label(text: str, limit: int = 63) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "forge"


@dataclass(frozen=True)
class Names:
    name: str                        # every object of this workload is called this
    selector: dict[str, str]         # Deployment selector = Service/PDB/ServiceMonitor selector (immutable: no record id)
    labels: dict[str, str]           # on every object and the pod template
    annotations: dict[str, str]      # on every object and the pod template: the way back to the record


def names(art: Artifact, variant: bool) -> Names:
    rec = art.record
    name = dns_label(f"{rec.name}-{rec.target_gpu}" if variant else rec.name, 53)   # room for generated suffixes
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name}
    labels = {**selector, "app.kubernetes.io/component": "llm-server", "app.kubernetes.io/managed-by": "forge",
              "app.kubernetes.io/version": rec.id[:12], RECORD: rec.id[:12]}
    annotations = {ANN["record-id"]: rec.id, ANN["image-digest"]: rec.image_digest,
                   ANN["recipe-digest"]: rec.recipe_digest, ANN["eval-verdict-digest"]: rec.eval_digest or "none",
                   ANN["scan-verdict-digest"]: rec.scan_digest or "none", ANN["model-digest"]: rec.model_digest or "none",
                   ANN["status"]: rec.status, ANN["gpu"]: rec.target_gpu,
                   ANN["engine"]: f"{rec.engine} {rec.engine_version or '?'}"}
    if rec.weights == "image":   # the weights are their own image (a record with baked weights keeps its annotations)
        annotations[ANN["model-image-digest"]] = rec.model_image_digest or "none"
        annotations[ANN["modelpack-digest"]] = rec.modelpack_digest or "none"
    return Names(name, selector, labels, annotations)


def meta(n: Names, namespace: str | None, **extra_annotations: str) -> dict:
    m = {"name": n.name, "labels": dict(n.labels), "annotations": {**n.annotations, **extra_annotations}}
    if namespace:
        m["namespace"] = namespace
    return m
