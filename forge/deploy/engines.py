"""What a cluster needs to know about a serving engine, by engine and engine version.

``serving(engine, version)`` is the one place forge/deploy asks for engine facts (health route, the
Prometheus metrics it exposes, whether the root filesystem can be read-only, how long it takes to
start). When the engine registry (forge.engines) carries these facts, this function is the seam to
repoint: everything else in forge/deploy reads them through it.

Sources, so the table can be checked:
- vLLM: ``/health`` answers 200 once the engine is up; ``/metrics`` (Prometheus) on the API port.
  ``vllm:num_requests_waiting`` (label ``model_name`` = ``--served-model-name``) is the queue.
  ``vllm:gpu_cache_usage_perc`` was deprecated for ``vllm:kv_cache_usage_perc`` in 0.9 (vLLM PR 18354)
  and removed later (PR 29330, under vLLM's deprecate / hide / remove policy).
- TGI: ``/health``; ``/metrics`` on the API port; ``tgi_queue_size`` is the queue (no model label: one
  model per server, so the query selects by namespace and service).
- TensorRT-LLM ``trtllm-serve``: ``/health``; Prometheus metrics at ``/prometheus/metrics`` from 1.1
  (TensorRT-LLM PR 5785) with request latencies only, no queue-length gauge: no queue to scale on.
- CPU (``transformers serve``): ``/health``; no Prometheus metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Serving", "serving"]


@dataclass(frozen=True)
class QueueMetric:
    name: str                       # the Prometheus series
    model_label: str | None         # label naming the served model, when the engine has one


@dataclass(frozen=True)
class Serving:
    engine: str
    version: str
    health_route: str
    metrics_path: str | None        # Prometheus text format on the container port; None: no metrics
    queue: QueueMetric | None       # requests waiting for a slot; None: cannot autoscale on a queue
    kv_cache_usage: str | None      # 0..1 gauge of KV-cache use (a second scaling signal), when exposed
    read_only_root: bool            # runs with readOnlyRootFilesystem given the writable dirs below
    writable_dirs: tuple[str, ...]  # in-memory or node-disk emptyDirs mounted there
    env: tuple[tuple[str, str], ...]   # env the Deployment adds so caches land in writable_dirs
    init_seconds: int               # start-up work besides reading the weights (compile, CUDA graphs, warm-up)


def _version(v: str | None) -> tuple[int, ...]:
    parts = []
    for p in (v or "0").removeprefix("transformers-").split("."):
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def serving(engine: str, version: str | None) -> Serving:
    """The facts for ``engine`` at ``version`` (the base image's engine version, from the record)."""
    v = _version(version)
    if engine == "vllm":
        return Serving(engine, version or "?", "/health", "/metrics",
                       QueueMetric("vllm:num_requests_waiting", "model_name"),
                       "vllm:kv_cache_usage_perc" if v >= (0, 9) else "vllm:gpu_cache_usage_perc",
                       read_only_root=True, writable_dirs=("/tmp", "/var/cache/forge"),
                       env=(("HOME", "/var/cache/forge"), ("XDG_CACHE_HOME", "/var/cache/forge")),
                       init_seconds=240)   # torch.compile + CUDA graph capture
    if engine == "tgi":
        return Serving(engine, version or "?", "/health", "/metrics", QueueMetric("tgi_queue_size", None), None,
                       read_only_root=True, writable_dirs=("/tmp", "/data"), env=(("HOME", "/tmp"),),
                       init_seconds=180)   # warm-up batches at max_batch_total_tokens
    if engine == "trtllm":
        return Serving(engine, version or "?", "/health", "/prometheus/metrics" if v >= (1, 1) else None, None, None,
                       read_only_root=False, writable_dirs=("/tmp",), env=(), init_seconds=240)
    if engine == "cpu":
        return Serving(engine, version or "?", "/health", None, None, None,
                       read_only_root=True, writable_dirs=("/tmp",), env=(), init_seconds=90)   # measured: 66 s on 2 busy cores
    from forge.errors import UsageError

    raise UsageError(f"forge deploy does not know the serving engine {engine!r}",
                     hint="Known engines: vllm, tgi, trtllm, cpu.")
