"""Offline validation of generated (or edited) manifests: schemas, then forge's cross-object checks.

- Kubernetes kinds: kubernetes-validate's JSON schemas for KUBE_VERSION, strict (an unknown field is an
  error, as with ``kubectl apply --validate=strict``).
- ScaledObject (KEDA) and ServiceMonitor (Prometheus Operator): the cloudcoil models generated from each
  project's published CRD (``openAPIV3Schema``) at the versions in CRD_SOURCES, validated strictly, plus a
  walk that refuses any field the CRD does not declare (the models themselves would ignore it).
- A kind with no schema is a failure, never a pass.
- Cross-object checks: GPU requests equal limits, selectors match the pod labels, the PDB / Service /
  ScaledObject / HPA / ServiceMonitor point at objects and ports that exist, probe ports are container
  ports, the image is pinned by digest and its command is the image's own (looked up by the record).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable
from forge.core.errors import UsageError

KUBE_VERSION = "1.33"
CRD_SOURCES = {   # kind -> (apiVersion, model, what it was generated from)
    "ScaledObject": ("keda.sh/v1alpha1", "cloudcoil.models.keda.v1alpha1:ScaledObject",
                     "KEDA v2.16.1 CRDs (keda-2.16.1-crds.yaml), via cloudcoil-models-keda 2.16.1.0"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "cloudcoil.models.prometheus_operator.v1:ServiceMonitor",
                       "Prometheus Operator v0.80.1 CRDs, via cloudcoil-models-prometheus-operator 0.80.1.0"),
}
GPU = "nvidia.com/gpu"

# record id -> (image digest, ENTRYPOINT, CMD) of the image the record names; raises UsageError when unknown
ImageLookup = Callable[[str], tuple[str, tuple[str, ...], tuple[str, ...]]]

__all__ = ["KUBE_VERSION", "CRD_SOURCES", "require_version", "schema_problems", "cross_problems", "problems"]


def _kn(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def require_version(kube_version: str) -> None:
    """A usage error unless kubernetes-validate has the schemas of that Kubernetes minor version."""
    from kubernetes_validate.utils import all_versions

    known = all_versions()
    if not any(v == kube_version or v.startswith(kube_version + ".") for v in known):
        raise UsageError(f"--kube-version {kube_version}: no Kubernetes schemas for it here",
                         hint=f"One of {', '.join(v.rsplit('.', 1)[0] for v in known)}.")


def schema_problems(obj: dict, kube_version: str = KUBE_VERSION) -> list[str]:
    kind = obj.get("kind")
    if kind in CRD_SOURCES:
        return _crd_problems(obj)
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    require_version(kube_version)
    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
    except SchemaNotFoundError:
        return [f"{_kn(obj)}: no schema for {obj.get('apiVersion')} {kind} in Kubernetes {kube_version}: "
                "forge does not pass what it cannot check"]
    except ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(top)"
        return [f"{_kn(obj)}: {where}: {e.message} (Kubernetes {kube_version} schema, strict)"]
    return []


def _crd_problems(obj: dict) -> list[str]:
    import importlib

    import pydantic

    api, target, source = CRD_SOURCES[obj["kind"]]
    if obj.get("apiVersion") != api:
        return [f"{_kn(obj)}: apiVersion {obj.get('apiVersion')!r}; forge checks {obj['kind']} {api} ({source})"]
    module, _, cls = target.partition(":")
    model = getattr(importlib.import_module(module), cls)
    try:
        parsed = model.model_validate_json(json.dumps(obj), strict=True)
    except pydantic.ValidationError as e:
        return [f"{_kn(obj)}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']} ({source})" for err in e.errors()]
    return [f"{_kn(obj)}: {where}: unknown field ({source})" for where in _unknown(parsed, obj, "")]


def _unknown(model, data, path: str) -> Iterable[str]:
    """Keys of ``data`` that the model has no field for (pydantic would drop them silently)."""
    import pydantic

    if isinstance(model, pydantic.RootModel):
        model = model.root
    if isinstance(model, pydantic.BaseModel) and isinstance(data, dict):
        fields = {(f.alias or name): name for name, f in type(model).model_fields.items()}
        if type(model).model_config.get("extra") == "allow" and not fields:
            return
        for key, value in data.items():
            if key not in fields:
                yield f"{path}{key}"
            else:
                yield from _unknown(getattr(model, fields[key]), value, f"{path}{key}.")
    elif isinstance(model, list) and isinstance(data, list):
        for i, (m, d) in enumerate(zip(model, data)):
            yield from _unknown(m, d, f"{path}{i}.")
    elif isinstance(model, dict) and isinstance(data, dict):
        for k, d in data.items():
            if k in model:
                yield from _unknown(model[k], d, f"{path}{k}.")


# ---------------------------------------------------------------------- cross-object checks

def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _ns(obj: dict) -> str | None:
    return (obj.get("metadata") or {}).get("namespace")


def cross_problems(objects: list[dict], image_of: ImageLookup | None) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o.get("kind", "?"), []).append(o)
    deployments = by_kind.get("Deployment", [])
    services = by_kind.get("Service", [])
    if not deployments:
        problems.append("no Deployment: nothing serves the model")
    pods = []   # (deployment, pod template labels, {port name: number}, {port numbers})
    for d in deployments:
        spec = d.get("spec", {})
        tmpl = spec.get("template", {})
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if not _matches((spec.get("selector") or {}).get("matchLabels") or {}, labels):
            problems.append(f"{_kn(d)}: spec.selector.matchLabels does not match the pod template's labels")
        named, numbers = {}, set()
        for c in (tmpl.get("spec") or {}).get("containers") or []:
            where = f"{_kn(d)}: container {c.get('name')}"
            for p in c.get("ports") or []:
                numbers.add(p.get("containerPort"))
                if p.get("name"):
                    named[p["name"]] = p.get("containerPort")
            res = c.get("resources") or {}
            req, lim = (res.get("requests") or {}).get(GPU), (res.get("limits") or {}).get(GPU)
            if req is not None or lim is not None:
                if str(req) != str(lim):
                    problems.append(f"{where}: {GPU} request {req} != limit {lim} (extended resources cannot overcommit)")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if port is not None and port not in named and port not in numbers:
                    problems.append(f"{where}: {probe} port {port!r} is not a port of the container")
            problems.extend(_image_problems(d, c, where, image_of, UsageError))
        pods.append((d, labels, named, numbers))

    def pods_for(obj: dict, selector: dict) -> list:
        return [p for p in pods if _ns(p[0]) == _ns(obj) and _matches(selector, p[1])]

    for s in services:
        sel = (s.get("spec") or {}).get("selector") or {}
        targets = pods_for(s, sel)
        if not targets:
            problems.append(f"{_kn(s)}: spec.selector {sel} selects no Deployment's pods")
        for port in (s.get("spec") or {}).get("ports") or []:
            tp = port.get("targetPort", port.get("port"))
            for d, _, named, numbers in targets:
                if tp not in named and tp not in numbers:
                    problems.append(f"{_kn(s)}: port {port.get('name')} targets {tp!r}, not a port of {_kn(d)}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = ((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not pods_for(pdb, sel):
            problems.append(f"{_kn(pdb)}: spec.selector {sel} selects no Deployment's pods")
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for a in by_kind.get(kind, []):
            ref = (a.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("kind", "Deployment") != "Deployment" or not any(
                    d["metadata"].get("name") == ref.get("name") and _ns(d) == _ns(a) for d in deployments):
                problems.append(f"{_kn(a)}: scaleTargetRef {ref.get('kind', 'Deployment')}/{ref.get('name')} is not a "
                                "Deployment here")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        matched = [s for s in services if _ns(s) == _ns(sm) and _matches(sel, (s.get("metadata") or {}).get("labels") or {})]
        if not matched:
            problems.append(f"{_kn(sm)}: spec.selector {sel} selects no Service")
        for ep in (sm.get("spec") or {}).get("endpoints") or []:
            for s in matched:
                if ep.get("port") not in {p.get("name") for p in (s.get("spec") or {}).get("ports") or []}:
                    problems.append(f"{_kn(sm)}: endpoint port {ep.get('port')!r} is not a named port of {_kn(s)}")
    return problems


def _image_problems(d: dict, c: dict, where: str, image_of: ImageLookup | None, UsageError) -> list[str]:
    image = c.get("image", "")
    if "@sha256:" not in image:
        return [f"{where}: image {image!r} is not pinned by digest (repository@sha256:…)"]
    if image_of is None:
        return []
    rid = ((d.get("metadata") or {}).get("annotations") or {}).get("dev.forge/record-id")
    if not rid:
        return [f"{_kn(d)}: no dev.forge/record-id annotation: cannot check the image against its record"]
    try:
        digest, entrypoint, cmd = image_of(rid)
    except UsageError as e:
        return [f"{_kn(d)}: {e.message}"]
    problems = []
    if image.split("@", 1)[1] != digest:
        problems.append(f"{where}: image digest {image.split('@', 1)[1]} is not the record's {digest}")
    # Kubernetes: command replaces ENTRYPOINT, args replace CMD (and a command alone drops CMD)
    command = c.get("command")
    args = c.get("args") if ("args" in c or command is None) else []
    run = tuple(command if command is not None else entrypoint) + tuple(args if args is not None else cmd)
    if run != tuple(entrypoint) + tuple(cmd):
        problems.append(f"{where}: runs {list(run)}, not the image's command {list(entrypoint) + list(cmd)}")
    return problems


def problems(objects: list[dict], image_of: ImageLookup | None, kube_version: str = KUBE_VERSION) -> list[str]:
    require_version(kube_version)
    out = [p for o in objects for p in schema_problems(o, kube_version)]
    return out + cross_problems(objects, image_of)
