"""Autoscaling on the engine's queue (KEDA ScaledObject, or an HPA on a Pods metric) and the ServiceMonitor.

A GPU replica saturates on sequences, not on CPU: the signal is requests waiting in the engine's queue,
summed over the workload's pods, against a per-replica threshold from forge fit's concurrency. Engines
with no queue metric are refused (exit 2) rather than scaled on something that does not track load.
"""
from __future__ import annotations

from forge.deploy.engines import Serving
from forge.deploy.gather import Artifact
from forge.deploy.labels import Names, meta
from forge.deploy.sizing import Sizing
from forge.deploy.workload import PORT_NAME
from forge.core.errors import UsageError

AUTOSCALERS = ("auto", "keda", "hpa", "none")
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"   # the Prometheus Operator's default Service
KV_CACHE_TARGET = 0.85        # average KV-cache use per replica above which KEDA adds replicas
SCALE_DOWN_WINDOW_S = 300     # a replica took minutes to load its weights: do not drop it on a lull

__all__ = ["AUTOSCALERS", "choose", "scaled_object", "hpa", "service_monitor"]


def choose(wanted: str, srv: Serving) -> str:
    if wanted not in AUTOSCALERS:
        raise UsageError(f"--autoscale {wanted!r} is not one of {', '.join(AUTOSCALERS)}")
    if wanted == "auto":
        return "keda" if srv.queue else "none"
    if wanted != "none" and srv.queue is None:
        raise UsageError(f"--autoscale {wanted}: the {srv.engine} engine ({srv.version}) exposes no queue metric to "
                         "scale on", hint="Use --autoscale none and set --replicas, or serve with vllm or tgi.")
    return wanted


def _query(srv: Serving, art: Artifact, n: Names, namespace: str | None, series: str, agg: str = "sum") -> str:
    selectors = []
    if namespace:
        selectors.append(f'namespace="{namespace}"')
    # the label that selects this model's server (vLLM's model_name = the served name the image's command gives),
    # as the smoke test checked it in the running image; else the Service's label Prometheus adds
    labels = dict(srv.scaled_on(_served_name(art))).get(series)
    selectors += [f'{k}="{v}"' for k, v in labels] if labels else [f'service="{n.name}"']
    return f"{agg}({series}{{{','.join(selectors)}}})"


def _served_name(art: Artifact) -> str:
    run = [*art.command, *art.args]
    for i, a in enumerate(run[:-1]):
        if a == "--served-model-name":
            return run[i + 1]
    return art.record.name


def scaled_object(art: Artifact, srv: Serving, sz: Sizing, n: Names, replicas: int, max_replicas: int,
                  namespace: str | None, prometheus: str = PROMETHEUS) -> dict:
    triggers = [{"type": "prometheus", "name": "queue", "metricType": "AverageValue",
                 "metadata": {"serverAddress": prometheus, "query": _query(srv, art, n, namespace, srv.queue.name),
                              "threshold": str(sz.queue_threshold)}}]
    if srv.kv_cache_usage:   # a full KV cache preempts sequences before the queue shows it
        triggers.append({"type": "prometheus", "name": "kv-cache", "metricType": "Value",
                         "metadata": {"serverAddress": prometheus, "threshold": str(KV_CACHE_TARGET),
                                      "query": _query(srv, art, n, namespace, srv.kv_cache_usage, "avg")}})
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": meta(n, namespace, **{"dev.forge/queue-threshold": f"{sz.queue_threshold} waiting requests per "
                                                                         f"replica = half of {sz.concurrency} concurrent sequences"}),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": n.name},
            "minReplicaCount": replicas, "maxReplicaCount": max_replicas,
            "pollingInterval": 15, "cooldownPeriod": SCALE_DOWN_WINDOW_S,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}}}},
            "triggers": triggers,
        },
    }


def hpa(srv: Serving, sz: Sizing, n: Names, replicas: int, max_replicas: int, namespace: str | None) -> dict:
    # served per pod by a metrics adapter (prometheus-adapter) under the series name with ':' as '_'
    metric = srv.queue.name.replace(":", "_")
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(n, namespace),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": n.name},
            "minReplicas": replicas, "maxReplicas": max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                  "target": {"type": "AverageValue",
                                                             "averageValue": str(sz.queue_threshold)}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}},
        },
    }


def service_monitor(srv: Serving, n: Names, namespace: str | None) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta(n, namespace),
            "spec": {"selector": {"matchLabels": dict(n.selector)},
                     "endpoints": [{"port": PORT_NAME, "path": srv.metrics_path, "interval": "15s"}]}}
