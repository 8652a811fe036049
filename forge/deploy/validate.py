"""Offline validation of generated (or edited) manifests: schemas, then forge's cross-object checks.

- Kubernetes kinds: kubernetes-validate's JSON schemas for KUBE_VERSION, strict (an unknown field is an
  error, as with ``kubectl apply --validate=strict``).
- ScaledObject (KEDA) and ServiceMonitor (Prometheus Operator): the cloudcoil models generated from each
  project's published CRD (``openAPIV3Schema``) at the versions in CRD_SOURCES, validated strictly, plus a
  walk that refuses any field the CRD does not declare (the models themselves would ignore it).
- A kind with no schema is a failure, never a pass.
- Cross-object checks: GPU requests equal limits, selectors match the pod labels, the PDB / Service /
  ScaledObject / HPA / ServiceMonitor point at objects and ports that exist, probe ports are container
  ports, the image is pinned by digest and its command is the image's own (looked up by the record), every
  volume mount names a volume of the pod; for a record whose weights are a model image, the server mounts /models
  from the record's model image (an image volume naming it by digest, or an emptyDir an init container from it
  fills) and forge's init containers run the images the record names.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, NamedTuple

from forge.core.errors import UsageError
from forge.image.model_image import MODELS_DIR

KUBE_VERSION = "1.33"
CRD_SOURCES = {   # kind -> (apiVersion, model, what it was generated from)
    "ScaledObject": ("keda.sh/v1alpha1", "cloudcoil.models.keda.v1alpha1:ScaledObject",
                     "KEDA v2.16.1 CRDs (keda-2.16.1-crds.yaml), via cloudcoil-models-keda 2.16.1.0"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "cloudcoil.models.prometheus_operator.v1:ServiceMonitor",
                       "Prometheus Operator v0.80.1 CRDs, via cloudcoil-models-prometheus-operator 0.80.1.0"),
}
GPU = "nvidia.com/gpu"

IMAGE_VOLUMES_FROM = 33   # image volumes: beta (behind the ImageVolume gate) from Kubernetes 1.33
SERVING_INIT = ("forge-tools", "model-check")   # forge's init containers that run the serving image
MODEL_INIT = "model-copy"                        # and the one that runs the model image


class Pinned(NamedTuple):
    """What a record says its pod runs: the serving image's digest, ENTRYPOINT and CMD, and its model image's
    digest (None: the weights are in the serving image)."""
    digest: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    model: str | None = None


# record id -> what the record pins; raises UsageError when unknown
ImageLookup = Callable[[str], Pinned]

__all__ = ["KUBE_VERSION", "CRD_SOURCES", "Pinned", "require_version", "schema_problems", "cross_problems",
           "problems"]


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
        problems.extend(_volume_problems(d, tmpl.get("spec") or {}))
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


def _volume_problems(d: dict, pod: dict) -> list[str]:
    """Mounts that name no volume, and init containers or image volumes not pinned by digest."""
    problems = []
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for kind in ("initContainers", "containers"):
        for c in pod.get(kind) or []:
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    problems.append(f"{_kn(d)}: container {c.get('name')}: volumeMount {m.get('name')!r} at "
                                    f"{m.get('mountPath')} names no volume of the pod")
    for c in pod.get("initContainers") or []:
        if "@sha256:" not in c.get("image", ""):
            problems.append(f"{_kn(d)}: init container {c.get('name')}: image {c.get('image')!r} is not pinned by "
                            "digest (repository@sha256:…)")
    for name, v in volumes.items():
        ref = (v.get("image") or {}).get("reference", "")
        if "image" in v and "@sha256:" not in ref:
            problems.append(f"{_kn(d)}: volume {name}: image {ref!r} is not pinned by digest (repository@sha256:…)")
    return problems


def _model_problems(d: dict, pinned: Pinned) -> list[str]:
    """The server reads /models from the record's model image; forge's init containers run the record's images."""
    pod = (d.get("spec") or {}).get("template", {}).get("spec") or {}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    inits = pod.get("initContainers") or []
    problems = []
    for c in inits:
        want = pinned.model if c.get("name") == MODEL_INIT else pinned.digest if c.get("name") in SERVING_INIT else None
        got = c.get("image", "").partition("@")[2]
        if want is not None and got and got != want:
            role = "model image" if c.get("name") == MODEL_INIT else "serving image"
            problems.append(f"{_kn(d)}: init container {c.get('name')}: image digest {got} is not the record's "
                            f"{role} {want}")
    if pinned.model is None:
        return problems
    server = next(iter(pod.get("containers") or []), {})
    mount = next((m for m in server.get("volumeMounts") or [] if m.get("mountPath") == MODELS_DIR), None)
    if mount is None:
        return problems + [f"{_kn(d)}: container {server.get('name')}: mounts nothing at {MODELS_DIR}: the record's "
                           f"weights are its model image {pinned.model}, which the server would never see"]
    if mount.get("readOnly") is not True:
        problems.append(f"{_kn(d)}: container {server.get('name')}: {MODELS_DIR} is not mounted readOnly")
    volume = volumes.get(mount.get("name")) or {}
    if "image" in volume:
        ref = volume["image"].get("reference", "")
        if "@sha256:" in ref and ref.partition("@")[2] != pinned.model:
            problems.append(f"{_kn(d)}: volume {mount.get('name')}: image {ref.partition('@')[2]} is not the record's "
                            f"model image {pinned.model}")
    elif "emptyDir" in volume:
        fills = [c for c in inits if c.get("image", "").partition("@")[2] == pinned.model
                 and any(m.get("name") == mount.get("name") for m in c.get("volumeMounts") or [])]
        if not fills:
            problems.append(f"{_kn(d)}: volume {mount.get('name')} at {MODELS_DIR} is an emptyDir that no init "
                            f"container from the record's model image {pinned.model} fills")
    elif volume:
        problems.append(f"{_kn(d)}: volume {mount.get('name')} at {MODELS_DIR} is neither the model image (an image "
                        "volume) nor an emptyDir copied from it")
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
        pinned = image_of(rid)
    except UsageError as e:
        return [f"{_kn(d)}: {e.message}"]
    digest, entrypoint, cmd = pinned.digest, pinned.entrypoint, pinned.cmd
    containers = (d.get("spec") or {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    problems = _model_problems(d, pinned) if c is containers[0] else []   # the pod's, once: the server is first
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
    major, _, minor = kube_version.partition(".")
    if major == "1" and int(minor.split(".")[0]) < IMAGE_VOLUMES_FROM:
        for o in objects:
            for v in ((o.get("spec") or {}).get("template", {}).get("spec") or {}).get("volumes") or []:
                if isinstance(v, dict) and "image" in v:
                    out.append(f"{_kn(o)}: volume {v.get('name')}: image volumes need Kubernetes 1.{IMAGE_VOLUMES_FROM}"
                               f" or later (here {kube_version}): deploy with --model-mount copy")
    return out + cross_problems(objects, image_of)
