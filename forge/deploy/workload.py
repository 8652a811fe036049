"""The workload: Deployment, Service, PodDisruptionBudget. Pure functions of (artifact, facts, sizing, names)."""
from __future__ import annotations

from functools import cache
from importlib import resources

from forge.deploy.engines import Serving
from forge.deploy.gather import Artifact
from forge.deploy.labels import Names, meta
from forge.deploy.model_mount import ModelMount
from forge.deploy.sizing import ENDPOINT_DELAY, PROBE_PERIOD, Sizing
from forge.core.errors import UsageError

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"      # GPU Feature Discovery's node label
PORT_NAME = "http"
SHM = "/dev/shm"

__all__ = ["deployment", "service", "pod_disruption_budget", "gpu_products", "GPU_RESOURCE", "PORT_NAME"]


@cache
def _products() -> dict[str, tuple[str, ...]]:
    from ruamel.yaml import YAML

    raw = YAML(typ="safe").load(resources.files("forge.gpu.catalog").joinpath("gpus.yaml").read_text())
    return {k: tuple(v) for k, v in (raw.get("gfd_products") or {}).items()}


def gpu_products(gpu: str) -> tuple[str, ...]:
    """The nvidia.com/gpu.product values of a catalog GPU; a GPU without them cannot be pinned."""
    products = _products().get(gpu)
    if not products:
        raise UsageError(f"the GPU catalog has no GPU Feature Discovery product names for {gpu}",
                         hint="Add them under gfd_products in forge/gpu/catalog/gpus.yaml (nvidia-smi's name, spaces as '-').")
    return products


def _probe(path: str, port: int, **timing: int) -> dict:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "timeoutSeconds": 5, **timing}


def _container(art: Artifact, srv: Serving, sz: Sizing, prestop_sleep: bool, model: ModelMount | None) -> dict:
    uid, gid = art.user
    resources_ = {"requests": {"cpu": sz.cpu, "memory": sz.memory}, "limits": {"memory": sz.memory}}
    if sz.gpus:
        resources_["requests"][GPU_RESOURCE] = resources_["limits"][GPU_RESOURCE] = sz.gpus
    if model is not None and model.ephemeral_storage:   # the copy's emptyDir: schedule where the node disk has room
        resources_["requests"]["ephemeral-storage"] = model.ephemeral_storage
    mounts = [{"name": "dshm", "mountPath": SHM}] + [
        {"name": _volume_name(d), "mountPath": d} for d in srv.writable_dirs]
    if model is not None:
        mounts.append(dict(model.server_mount))
    c = {
        "name": "server",
        "image": art.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(art.command),
        "ports": [{"name": PORT_NAME, "containerPort": art.port, "protocol": "TCP"}],
        "resources": resources_,
        # started: the weights are loaded; then readiness gates traffic and liveness restarts a hung server
        "startupProbe": _probe(srv.health_route, art.port, periodSeconds=PROBE_PERIOD,
                               failureThreshold=sz.startup_failure_threshold),
        "readinessProbe": _probe(srv.health_route, art.port, periodSeconds=5, failureThreshold=3),
        "livenessProbe": _probe(srv.health_route, art.port, periodSeconds=15, failureThreshold=4),
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": srv.read_only_root,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    if prestop_sleep:   # keep serving while the endpoint's removal reaches every proxy (sleep action: Kubernetes 1.30+)
        c["lifecycle"] = {"preStop": {"sleep": {"seconds": ENDPOINT_DELAY}}}
    if art.args:
        c["args"] = list(art.args)
    if srv.env:
        c["env"] = [{"name": k, "value": v} for k, v in srv.env]
    return c


def _volume_name(path: str) -> str:
    return "w-" + (path.strip("/").replace("/", "-").replace(".", "-") or "root")


def _affinity(gpu: str) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": GPU_PRODUCT, "operator": "In", "values": list(gpu_products(gpu))}]}]}}}


def deployment(art: Artifact, srv: Serving, sz: Sizing, n: Names, replicas: int, namespace: str | None,
               prestop_sleep: bool = True, model: ModelMount | None = None) -> dict:
    """``model``: how the model image reaches /models (forge.deploy.model_mount), for a record whose weights are
    their own image; None: the weights are in the serving image."""
    annotations = {f"dev.forge/{k}": v for k, v in sz.why}
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]   # engines use /dev/shm beyond tensor parallelism
    volumes += [{"name": _volume_name(d), "emptyDir": {}} for d in srv.writable_dirs]
    pod = {
        "terminationGracePeriodSeconds": sz.grace_s,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                            "fsGroup": art.user[1]},
        "containers": [_container(art, srv, sz, prestop_sleep, model)],
        "volumes": volumes,
    }
    if model is not None:   # its init containers before the server, in the order they run
        annotations["dev.forge/model-mount"] = model.how
        items = list(pod.items())
        at = [k for k, _ in items].index("containers")
        pod = dict(items[:at] + [("initContainers", [dict(c) for c in model.init_containers])] + items[at:])
        volumes += [dict(v) for v in model.volumes]
    if sz.gpus:
        pod["affinity"] = _affinity(art.record.target_gpu)
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    spec = {
        "replicas": replicas,
        "revisionHistoryLimit": 3,
        "selector": {"matchLabels": dict(n.selector)},
        # a GPU replica is expensive: bring the new one up before the old one goes, one at a time
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": dict(n.labels), "annotations": dict(n.annotations)}, "spec": pod},
    }
    if sz.progress_deadline_s is not None:
        spec["progressDeadlineSeconds"] = sz.progress_deadline_s
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(n, namespace, **annotations), "spec": spec}


def service(art: Artifact, n: Names, namespace: str | None) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(n, namespace),
            "spec": {"type": "ClusterIP", "selector": dict(n.selector),
                     "ports": [{"name": PORT_NAME, "port": art.port, "targetPort": PORT_NAME, "protocol": "TCP"}]}}


def pod_disruption_budget(n: Names, namespace: str | None) -> dict:
    # maxUnavailable 1: a voluntary eviction (node drain, upgrade) takes one replica at a time, and a
    # single-replica Deployment can still be drained (minAvailable 1 would block the drain forever)
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(n, namespace),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(n.selector)}}}
