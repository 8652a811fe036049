"""Numbers for the manifests, each from a stated rule (the README's "From registry to cluster" repeats them).

- weights: what the engine loads, from the served model's config.json and the recipe's method (forge
  fit's memory model); the weights layer's size when the config cannot be read.
- startup budget: weights / LOAD_RATE + the engine's own start-up work (compile, CUDA graphs, warm-up),
  times 1.5, in whole probe periods. LOAD_RATE is a conservative rate for safetensors read from a node's
  disk into (GPU) memory; faster disks just start sooner, a slower one needs a longer budget.
- concurrency per replica: ``forge fit``'s sequences at max_model_len (KV-cache bound), capped by
  max_num_seqs; the queue threshold is half of it waiting per replica.
- drain: the longest request (max_model_len tokens at fit's decode speed per sequence) plus the
  endpoint-removal delay; terminationGracePeriodSeconds covers it.
- model image (``container.weights: image``): the startup budget is the same load, from the mount (an image volume
  or the copy's emptyDir: the probe starts after both); the pull (model bytes / PULL_RATE) and, for the copy
  fallback, the copy (model bytes / COPY_RATE) happen before the server starts, so they go into the Deployment's
  progressDeadlineSeconds: 1.5 x (pull + copy) + the startup budget, at least Kubernetes' default 600 s.
- CPU and memory requests: host memory holds the checkpoint while it loads (GPU engines) or the whole
  model and KV cache (CPU engine, which decompresses to BF16); memory limit = request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from forge.deploy.engines import Serving
from forge.deploy.gather import Artifact
from forge.gpu.catalog import gpu as catalog_gpu
from forge.gpu.fit import fit, plan_from_recipe, weight_bytes
from forge.model.shape import from_config

GB = 1e9
GIB = 1 << 30
LOAD_RATE = 250e6          # bytes/s from disk into memory: conservative for network-attached node disks
PROBE_PERIOD = 10          # seconds between startup-probe attempts
ENDPOINT_DELAY = 10        # seconds for the endpoint's removal to reach every proxy (preStop sleep)
CPU_DECODE_TOK_S = 20      # CPU engine: decode tokens/s per sequence assumed for draining (no roofline on CPU)
HOST_OVERHEAD_GIB = 4      # per pod: Python, tokenizer, CUDA/driver host allocations, HTTP server
PULL_RATE = 125e6          # bytes/s from the registry to a node: 1 Gbit/s (a model image's layers come in parallel)
COPY_RATE = LOAD_RATE      # bytes/s node disk to node disk (the copy fallback's init container)
DEFAULT_PROGRESS_DEADLINE = 600   # Kubernetes' default progressDeadlineSeconds

__all__ = ["Sizing", "size", "with_model_pull"]


@dataclass(frozen=True)
class Sizing:
    gpus: int
    weights_bytes: int
    startup_budget_s: int
    startup_failure_threshold: int
    concurrency: int
    queue_threshold: int
    grace_s: int
    cpu: str
    memory: str
    why: tuple[tuple[str, str], ...]   # (annotation key suffix, the rule with its numbers)
    progress_deadline_s: int | None = None   # model image only: pull (+ copy) + startup budget


def with_model_pull(sz: Sizing, model_bytes: int, copy_bytes: int) -> Sizing:
    """``sz`` with the rollout's progress deadline budgeted for pulling the model image (and copying it)."""
    pull_s, copy_s = model_bytes / PULL_RATE, copy_bytes / COPY_RATE
    deadline = max(DEFAULT_PROGRESS_DEADLINE, math.ceil(1.5 * (pull_s + copy_s)) + sz.startup_budget_s)
    copy = f" + {copy_bytes / GB:.2f} GB copy / {COPY_RATE / 1e6:.0f} MB/s" if copy_bytes else ""
    rule = (f"{deadline}s = 1.5 x ({model_bytes / GB:.2f} GB model image pull / {PULL_RATE / 1e6:.0f} MB/s{copy}) + "
            f"{sz.startup_budget_s}s startup budget (at least {DEFAULT_PROGRESS_DEADLINE}s)")
    return replace(sz, progress_deadline_s=deadline, why=sz.why + (("progress-deadline", rule),))


def size(art: Artifact, srv: Serving) -> Sizing:
    r = art.recipe
    t = r.target
    g = catalog_gpu(art.record.target_gpu)
    plan = plan_from_recipe(r)
    shape = from_config(art.model_config) if art.model_config else None
    weights = int(weight_bytes(shape, plan)) if shape else art.weights_layer_bytes
    kv_tok = shape.kv_bytes_per_token(1 if plan.kv_cache == "fp8" else 2) if shape else 0

    load_s = weights / LOAD_RATE + srv.init_seconds
    failures = max(6, math.ceil(load_s * 1.5 / PROBE_PERIOD))
    if g.is_cpu:
        gpus, concurrency, decode = 0, t.max_num_seqs, CPU_DECODE_TOK_S
        # transformers serve decompresses to BF16 and holds the KV cache of every running sequence
        bf16 = int(weight_bytes(shape, replace(plan, method="none"))) if shape else weights
        host = bf16 + kv_tok * t.max_model_len * t.max_num_seqs + HOST_OVERHEAD_GIB * GIB
        cpu = "4"
    else:
        report = fit(shape, g, plan) if shape else None
        gpus = t.tensor_parallel
        concurrency = min(t.max_num_seqs, report.max_seqs_at_max_model_len) if report else t.max_num_seqs
        decode = report.decode_tok_s_per_seq if report else 50.0
        host = weights + HOST_OVERHEAD_GIB * GIB      # the checkpoint passes through host memory while it loads
        cpu = str(2 + 2 * gpus)
    concurrency = max(1, concurrency)
    drain_s = math.ceil(t.max_model_len / max(decode, 1.0))
    grace = max(30, ENDPOINT_DELAY + drain_s + 5)
    memory = f"{math.ceil(host / GIB)}Gi"
    why = (
        ("startup-budget", f"{failures * PROBE_PERIOD}s = 1.5 x ({weights / GB:.2f} GB weights / "
                           f"{LOAD_RATE / 1e6:.0f} MB/s + {srv.init_seconds}s {srv.engine} start-up), "
                           f"in {PROBE_PERIOD}s probe periods"),
        ("concurrency", f"{concurrency} sequences per replica: max_num_seqs" if g.is_cpu else
                        f"{concurrency} sequences per replica at max_model_len {t.max_model_len} "
                        f"(forge fit, capped by max_num_seqs {t.max_num_seqs})"),
        ("termination-grace", f"{grace}s = {ENDPOINT_DELAY}s endpoint removal + {drain_s}s to finish a "
                              f"{t.max_model_len}-token answer at {decode:.0f} tok/s + 5s"),
        ("memory", f"{memory}: " + ("BF16 weights + KV cache at max_num_seqs + " if g.is_cpu else "checkpoint + ")
                   + f"{HOST_OVERHEAD_GIB} GiB host overhead"),
    )
    return Sizing(gpus=gpus, weights_bytes=weights, startup_budget_s=failures * PROBE_PERIOD,
                  startup_failure_threshold=failures, concurrency=concurrency,
                  queue_threshold=max(1, concurrency // 2), grace_s=grace, cpu=cpu, memory=memory, why=why)
