"""The quantize step's verification: the written checkpoint's next-token predictions, teacher-forced over BF16's
greedy tokens (recorded by the reference step), in one forward pass, and what refuses a checkpoint that cannot
serve.

Every backend path ends in ``refuse_unservable`` (through ``verify_generation``: the checkpoint as transformers
runs it; ``verify_dequantized``: its dequantized weights in the BF16 model, run one decoder layer at a time from
the files, so no model is ever held; ``verify_dequantized_in_memory``: the same with the whole BF16 model loaded,
the path before streaming, kept for FORGE_STREAMING=0). A checkpoint is refused (StepError,
with the numbers) when its logits are not finite (NaN or inf), when fewer than ``MIN_CONTENT_TOKENS`` of its
predictions are anything but special tokens, or when fewer than ``MIN_AGREEING_TOKENS`` of them agree with
BF16's reference tokens. Those are floors for a checkpoint that is broken, not a quality bar: quality is the
eval gate's to judge.
"""
from __future__ import annotations

import gc
from pathlib import Path

from forge.steps.reference import VERIFY_PROMPT, VERIFY_TOKENS, prompt_ids
from forge.backends import TensorReader
from forge.core.errors import StepError
from forge.model import layerwise

__all__ = ["MIN_AGREEING_TOKENS", "MIN_CONTENT_TOKENS", "check_loads", "check_tensors", "verify_generation",
           "verify_dequantized", "verify_dequantized_in_memory", "teacher_forced_tokens", "refuse_unservable",
           "relative_error"]
# what a quantized Linear (or an attention module's KV cache) stores beside or instead of its weight
QUANTIZATION_PARAMS = frozenset({"weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale",
                                 "weight_packed", "weight_shape", "input_scale", "input_zero_point",
                                 "input_global_scale", "output_scale", "k_scale", "v_scale"})

MIN_AGREEING_TOKENS = 1   # of BF16's VERIFY_TOKENS greedy tokens the checkpoint must predict: none is refused
MIN_CONTENT_TOKENS = 1    # of its VERIFY_TOKENS predictions that are not special tokens: only special ones is refused


def check_loads(quant_dir: Path, dtype) -> None:
    """transformers loads the checkpoint with no missing, unexpected or mis-shaped tensor (it is then freed)."""
    m, info = _load_checkpoint(quant_dir, dtype, output_loading_info=True)
    del m
    gc.collect()
    wrong = {k: list(v)[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if wrong:
        raise StepError(f"the quantized checkpoint at {quant_dir} does not match its model in transformers: "
                        + "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v))}" for k, v in wrong.items()))


def _load_checkpoint(quant_dir: Path, dtype, **kwargs):
    """The written checkpoint loaded with transformers on the CPU, or a StepError saying why it does not load."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(quant_dir, dtype=dtype, device_map=None, **kwargs)
    except Exception as e:
        raise StepError(f"the quantized checkpoint at {quant_dir} does not load with transformers: {type(e).__name__}: {e}") from None


def check_tensors(quant_dir: Path, dtype) -> None:
    """The written checkpoint's tensors against the model its config.json builds, from the files' headers alone
    (what transformers' load checks, without loading a weight): every parameter is stored (a tied one under
    either name), with the model's shape; every stored tensor is a parameter or a quantization parameter
    (scale, zero point, ...) of one of the model's modules."""
    model = layerwise.empty_model(quant_dir, dtype)
    aliases = layerwise.parameter_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    stored = TensorReader(quant_dir).shapes
    missing = sorted({names[0] for name, names in aliases.items() if not any(n in stored for n in names)
                      and not (name.endswith(".weight") and name + "_packed" in stored)})
    mismatched = [f"{n} {stored[n]} (the model's {tuple(params[n].shape)})" for n in sorted(stored)
                  if n in params and stored[n] != tuple(params[n].shape)]
    unexpected = [n for n in sorted(stored) if n not in params
                  and not (n.rpartition(".")[2] in QUANTIZATION_PARAMS and n.rpartition(".")[0] in modules)]
    wrong = {k: v[:5] for k, v in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                   ("mis-shaped tensors", mismatched)) if v}
    del model, params, modules
    if wrong:
        raise StepError(f"the quantized checkpoint at {quant_dir} does not match its model: "
                        + "; ".join(f"{k}: {', '.join(v)}" for k, v in wrong.items()))


def verify_dequantized(bf16_dir: Path, weights, tokenizer, dtype, reference: list[int],
                       what: str = "the dequantized weights", errors: dict | None = None, device: str = "cpu") -> dict:
    """The BF16 model with the dequantized weights in place of the quantized ones, teacher-forced over BF16's
    greedy tokens (``reference``), one decoder layer resident at a time: each block's weights are read as it
    runs, the dequantized ones from ``weights`` (a dict, or a callable name -> tensor or None with ``names``:
    ``forge.backends.Fp8Weights``, ``CompressedWeights``), every other one from the checkpoint where ``weights``
    has ``unquantized`` and holds it (AWQ's smoothed norms), else from the BF16 snapshot, and released when it returns. No
    model is ever held. ``errors``, when given, receives each layer's relative weight error
    ||dequantized - BF16|| / ||BF16|| (layer name -> figure), measured as the weight is read."""
    names = tuple(weights) if isinstance(weights, dict) else tuple(weights.names)
    original = TensorReader(bf16_dir)
    dequantized = _dequantizer(weights, original, dtype, errors)
    # the checkpoint's own unquantized tensors where it changed them (AWQ smooths the norms before its layers)
    written = getattr(weights, "unquantized", None)
    used: set[str] = set()

    def source(name: str):
        tensor = dequantized(name)
        if tensor is None:
            tensor = written(name) if written is not None else None
            return original(name) if tensor is None else tensor
        used.add(name)
        return tensor

    model = layerwise.empty_model(bf16_dir, dtype)
    if unknown := [n for n in names if n not in layerwise.parameter_names(model)]:
        raise StepError(f"quantized tensor {unknown[0]} has no counterpart in the model")
    with layerwise.streamed(model, source, dtype=dtype, device=device, what=what) as m:
        tokens = teacher_forced_tokens(m, tokenizer, reference, what=what, device=device)
    del model
    gc.collect()
    if unread := [n for n in names if n not in used]:
        raise StepError(f"{what}: quantized tensor {unread[0]} was never read into the model ({len(unread)} in all)")
    return {**refuse_unservable(reference, tokens, tokenizer, what=what), "how": "dequantized weights",
            "resident": "one decoder layer"}


def _dequantizer(weights, original: TensorReader, dtype, errors: dict | None):
    """name -> the dequantized weight (None for one not quantized), its relative error against ``original`` put
    in ``errors`` on the way: in one fused pass where ``weights`` can (``Fp8Weights.dequantize``), else from the
    float weights it gives."""
    quantized = set(weights) if isinstance(weights, dict) else set(weights.names)
    fused = getattr(weights, "dequantize", None)
    read = weights.get if isinstance(weights, dict) else weights

    def dequantized(name: str):
        if name not in quantized:
            return None
        before = original(name) if errors is not None and name.endswith(".weight") else None
        if fused is not None:
            tensor, error = fused(name, dtype, before)
        else:
            tensor = read(name)
            error = relative_error(tensor, before) if before is not None else None
        if error is not None:
            errors[name.removesuffix(".weight")] = error
        return tensor

    return dequantized


def verify_dequantized_in_memory(bf16_dir: Path, weights, tokenizer, dtype, reference: list[int],
                                 what: str = "the dequantized weights", errors: dict | None = None) -> dict:
    """``verify_dequantized`` with the whole BF16 model loaded (FORGE_STREAMING=0: the path before streaming). Each
    weight goes into a new tensor that replaces the parameter's: the loaded ones map the snapshot's files, and
    writing into them would copy every page first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=dtype, device_map=None)
    params = dict(model.named_parameters())
    # the BF16 weights, read as copies: the model's own map the snapshot, and reading every one of them would
    # leave the whole snapshot resident beside the dequantized weights (peak RSS 1.5x the library's on 3B)
    dequantized = _dequantizer(weights, TensorReader(bf16_dir), dtype, errors)
    with torch.no_grad():
        for name in (tuple(weights) if isinstance(weights, dict) else weights.names):
            if name not in params:
                raise StepError(f"quantized tensor {name} has no counterpart in the model")
            params[name].data = torch.empty_like(params[name]).copy_(dequantized(name))   # one pass, converting the dtype
    tokens = teacher_forced_tokens(model, tokenizer, reference, what=what)
    del model, params
    gc.collect()
    return {**refuse_unservable(reference, tokens, tokenizer, what=what), "how": "dequantized weights",
            "resident": "the whole model"}


def relative_error(new, old, block: int = 1 << 20) -> float:
    """||new - old|| / ||old|| in float32 blocks of ``block`` elements, accumulated in float64."""
    import torch

    a, b = new.reshape(-1), old.reshape(-1)
    num = den = 0.0
    for i in range(0, a.numel(), block):
        ref = b[i:i + block].float()
        diff = torch.sub(a[i:i + block].float(), ref)   # new may be a float32 buffer its producer reuses: not in place
        num += float(torch.dot(diff, diff))
        den += float(torch.dot(ref, ref))
    return round((num / den) ** 0.5, 6) if den else 0.0


def _agreement(a: list[int], b: list[int], tokenizer) -> dict:
    """How far the quantized model's next-token predictions along BF16's greedy tokens follow them. Up to the
    first mismatch they are the tokens its own greedy decoding writes: the matching prefix is the greedy one."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS, "matching_prefix": prefix,
            "agreement": round(sum(x == y for x, y in zip(a, b)) / max(1, len(a)), 4),
            "bf16_text": tokenizer.decode(a, skip_special_tokens=True),
            "quantized_text": tokenizer.decode(b, skip_special_tokens=True), "how": "teacher-forced"}


def teacher_forced_tokens(model, tokenizer, reference: list[int], *, what: str, device=None) -> list[int]:
    """The model's argmax next token at each position of VERIFY_PROMPT + ``reference``, in one forward pass:
    prediction i is what it writes after the prompt and the reference's first i tokens (``device``: where the
    inputs go, the model's own by default)."""
    import torch

    prompt = prompt_ids(tokenizer, device or model.device)
    ids = torch.cat([prompt, torch.tensor([reference[:-1]], dtype=prompt.dtype, device=prompt.device)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, prompt.shape[1] - 1:]
    if bad := int((~torch.isfinite(logits)).sum()):
        raise StepError(f"{what} compute non-finite logits (NaN or inf: {bad} of {logits.numel()}, over "
                        f"{logits.shape[0]} positions) for {VERIFY_PROMPT!r}: the quantized weights or scales are broken")
    return logits.argmax(-1).tolist()


def verify_generation(reference: list[int], quant_dir: Path, tokenizer, dtype) -> dict:
    """Load the written checkpoint with transformers (the only model in memory: the source model was freed and
    its greedy tokens recorded before quantizing) and compare its predictions along them, in one forward pass."""
    what = f"the quantized checkpoint at {quant_dir}"
    m = _load_checkpoint(quant_dir, dtype)
    tokens = teacher_forced_tokens(m, tokenizer, reference, what=what)
    del m
    gc.collect()
    return refuse_unservable(reference, tokens, tokenizer, what=what)


def refuse_unservable(reference: list[int], tokens: list[int], tokenizer, *, what: str) -> dict:
    """The agreement of ``tokens`` (the checkpoint's teacher-forced predictions) with BF16's ``reference``, or a
    StepError when the checkpoint cannot serve: fewer than MIN_CONTENT_TOKENS predictions that are not special
    tokens, or fewer than MIN_AGREEING_TOKENS that agree with the reference (non-finite logits were refused
    before, in ``teacher_forced_tokens``)."""
    result = _agreement(reference, tokens, tokenizer)
    special = set(tokenizer.all_special_ids)
    content = sum(t not in special for t in tokens)
    agreeing = sum(x == y for x, y in zip(reference, tokens))
    said = f"BF16 writes {result['bf16_text']!r}, it predicts {tokenizer.decode(tokens)!r}"
    if content < MIN_CONTENT_TOKENS:
        raise StepError(f"{what} predicts nothing but special tokens for {VERIFY_PROMPT!r}: {content} of {len(tokens)} "
                        f"predictions are text (at least {MIN_CONTENT_TOKENS} needed); {said}",
                        hint="The quantized weights or scales are broken: look at the quantize report's per-layer "
                             "errors, or keep the worst layers in BF16 (quantize.ignore).")
    if agreeing < MIN_AGREEING_TOKENS:
        raise StepError(f"{what} agrees with BF16's greedy tokens at {agreeing} of {len(reference)} positions "
                        f"(at least {MIN_AGREEING_TOKENS} needed) for {VERIFY_PROMPT!r}; {said}",
                        hint="The quantized weights or scales are broken: look at the quantize report's per-layer "
                             "errors, or keep the worst layers in BF16 (quantize.ignore).")
    return result


