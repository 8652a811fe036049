"""Capacity planning from config alone: does a model fit a GPU, for how many sequences, at what cost.

Memory per GPU = weights / tp + KV cache / tp + runtime overhead, against VRAM × memory utilization.
- weights: Linear layers at the method's bytes per parameter from forge.gpu.methods (e.g. AWQ 0.5 B + a BF16
  scale per group of 128; NVFP4 0.5 B + an FP8 scale per 16). Embeddings stay BF16 (quantizers target
  Linear layers); lm_head stays BF16 when the recipe ignores it.
- KV cache per token = 2 (K and V) × layers × kv_heads × head_dim × bytes (2 for BF16, 1 for FP8).
- runtime overhead: CUDA context, activations at the engine's batch size, CUDA graphs: OVERHEAD_GIB.
Decode roofline: every decode step reads all weights once (shared by the batch) plus each sequence's
KV cache, so tokens/s per sequence <= bandwidth / (weights + kv_per_token × context).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from forge.gpu.capability import Verdict, check
from forge.core import options as env
from forge.gpu.catalog import Gpu
from forge.gpu.methods import bytes_per_linear
from forge.model.shape import ModelShape, ignored
from forge import engines
from forge.core.errors import UsageError
from forge.gpu import methods

GIB = 1 << 30
OVERHEAD_GIB = 1.5          # per GPU: CUDA context + activations + CUDA graphs (vLLM-like defaults)
AVG_CONTEXT_FRACTION = 0.5  # decode roofline assumes sequences are on average half-way to max_model_len
TP_DEGREES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Plan:
    method: str = "none"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    ignore: tuple[str, ...] = ("lm_head",)
    kv_cache: str = "auto"                 # auto (= model dtype, BF16) | fp8
    engine: str = "vllm"
    max_model_len: int = 4096
    max_num_seqs: int = 32
    gpu_memory_utilization: float = 0.9
    tensor_parallel: int = 1               # GPUs per replica; the report also says the smallest that fits


def weight_bytes(shape: ModelShape, plan: Plan) -> float:
    """Checkpoint bytes of the weights: Linear layers at the method's bytes per parameter (forge.gpu.methods,
    scales and zero points included); embeddings, norms and an ignored lm_head in BF16."""
    linear = 0.0
    for suffix, fan_in, fan_out, count in shape.linear_layers():
        kept = sum(ignored(f"model.layers.{i}.{suffix}", plan.ignore) for i in range(shape.num_layers)) \
            if plan.method != "none" else 0   # layers quantize.ignore keeps in BF16 (mixed precision)
        kept = kept * count // shape.num_layers
        linear += (count - kept) * bytes_per_linear(plan.method, fan_in, fan_out, bits=plan.bits,
                                                    group_size=plan.group_size, symmetric=plan.symmetric)
        linear += kept * 2.0 * fan_in * fan_out
    head = 2.0 * shape.lm_head_params
    if plan.method != "none" and "lm_head" not in plan.ignore and shape.lm_head_params:
        head = bytes_per_linear(plan.method, shape.hidden_size, shape.vocab_size, bits=plan.bits,
                                group_size=plan.group_size, symmetric=plan.symmetric)
    return linear + 2 * shape.embedding_params + head + 2 * shape.other_params


@dataclass(frozen=True)
class FitReport:
    gpu: str
    method: str
    scheme_ok: bool
    scheme_mode: str
    scheme_message: str
    params: int
    weights_gb: float
    kv_bytes_per_token: float
    kv_cache_gb: float
    overhead_gb: float
    budget_gb: float               # per GPU: VRAM × utilization
    tensor_parallel: int
    fits: bool
    headroom_gb: float
    max_seqs_at_max_model_len: int
    max_context_at_max_num_seqs: int
    tp_needed: int | None          # smallest power-of-two TP that fits; None if even 8 does not
    decode_tok_s_per_seq: float
    decode_tok_s_aggregate: float
    price_per_hour: float
    usd_per_million_tokens: float | None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def _per_gpu(weights: float, kv: float, tp: int) -> float:
    return weights / tp + kv / tp + OVERHEAD_GIB * GIB


def price_of(gpu: Gpu, override: float | None = None) -> float:
    if override is not None:
        return override
    prices_env = env.current().gpu_prices
    if prices_env:
        try:
            prices = json.loads(prices_env)
        except json.JSONDecodeError:
            prices = {}
        if gpu.name in prices:
            return float(prices[gpu.name])
    return gpu.price_per_hour


def check_plan(plan: Plan) -> None:
    """A plan names a method and an engine forge knows (UsageError, exit 2, listing the valid ones)."""
    try:
        methods.get(plan.method)
        engines.REGISTRY.check(plan.engine)
    except ValueError as e:
        raise UsageError(str(e)) from None


def fit(shape: ModelShape, gpu: Gpu, plan: Plan, *, price: float | None = None) -> FitReport:
    check_plan(plan)
    verdict: Verdict = check(gpu, plan.engine, plan.method, plan.bits)
    w = weight_bytes(shape, plan)
    kv_tok = shape.kv_bytes_per_token(1 if plan.kv_cache == "fp8" else 2)
    kv = kv_tok * plan.max_model_len * plan.max_num_seqs
    budget = gpu.memory_gib * GIB * plan.gpu_memory_utilization
    tp_needed = next((t for t in TP_DEGREES if _per_gpu(w, kv, t) <= budget), None)
    tp = plan.tensor_parallel
    used = _per_gpu(w, kv, tp)
    free_for_kv = max(0.0, (budget - w / tp - OVERHEAD_GIB * GIB) * tp)
    notes = []
    max_ctx = int(free_for_kv // (kv_tok * plan.max_num_seqs)) if kv_tok else 0
    if shape.max_position_embeddings and max_ctx > shape.max_position_embeddings:
        notes.append(f"the model's own limit is {shape.max_position_embeddings} tokens of context")
        max_ctx = int(shape.max_position_embeddings)
    if tp > 1 and (shape.num_heads % tp or shape.num_kv_heads % tp):
        notes.append(f"tensor parallel {tp} does not divide {shape.num_heads} heads / {shape.num_kv_heads} KV heads")

    bandwidth = gpu.bandwidth_gbs * 1e9 * tp
    ctx = plan.max_model_len * AVG_CONTEXT_FRACTION
    per_seq = bandwidth / (w + kv_tok * ctx) if bandwidth else 0.0
    step_s = (w + plan.max_num_seqs * kv_tok * ctx) / bandwidth if bandwidth else float("inf")
    aggregate = plan.max_num_seqs / step_s if bandwidth else 0.0
    hourly = price_of(gpu, price) * tp
    usd = hourly / (aggregate * 3600) * 1e6 if aggregate else None
    return FitReport(
        gpu=gpu.name, method=plan.method, scheme_ok=verdict.ok, scheme_mode=verdict.mode,
        scheme_message=verdict.message, params=shape.total_params,
        weights_gb=w / 1e9, kv_bytes_per_token=kv_tok, kv_cache_gb=kv / 1e9, overhead_gb=OVERHEAD_GIB * GIB / 1e9,
        budget_gb=budget / 1e9, tensor_parallel=tp, fits=used <= budget, headroom_gb=(budget - used) / 1e9,
        max_seqs_at_max_model_len=int(free_for_kv // (kv_tok * plan.max_model_len)) if kv_tok else 0,
        max_context_at_max_num_seqs=max_ctx, tp_needed=tp_needed,
        decode_tok_s_per_seq=per_seq, decode_tok_s_aggregate=aggregate, price_per_hour=hourly,
        usd_per_million_tokens=usd, notes=tuple(notes),
    )


def plan_from_recipe(recipe) -> Plan:
    q, t = recipe.quantize, recipe.target
    return Plan(method=q.method, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, ignore=q.ignore,
                kv_cache=q.kv_cache, engine=t.engine, max_model_len=t.max_model_len, max_num_seqs=t.max_num_seqs,
                gpu_memory_utilization=t.gpu_memory_utilization, tensor_parallel=t.tensor_parallel)


def explain(r: FitReport) -> str:
    """A one-paragraph verdict with the numbers, for error messages."""
    need = f"needs tensor parallel {r.tp_needed}" if r.tp_needed else "does not fit even at tensor parallel 8"
    return (f"weights {r.weights_gb:.1f} GB + KV cache {r.kv_cache_gb:.1f} GB + overhead {r.overhead_gb:.1f} GB "
            f"per GPU budget {r.budget_gb:.1f} GB ({r.gpu} × memory utilization): over by {-r.headroom_gb:.1f} GB; "
            f"at this length it holds {r.max_seqs_at_max_model_len} sequences; {need}")


# ------------------------------------------------------------------ recipes
