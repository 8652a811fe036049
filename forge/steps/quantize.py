"""quantize: resolved BF16 snapshot -> quantized checkpoint (compressed-tensors, loaded natively by vLLM).

Pre-flight checks (``preflight``) read config.json only and run at validate time, before any weight
is loaded: group size divides every targeted layer, the architecture is one the method supports,
calibration is declared and large enough. The run itself: calibration windows (tokenizer only),
then the model, then llm-compressor, then a verification that the written checkpoint loads with
transformers and generates, compared token by token with the BF16 snapshot.

CPU policy: without an accelerator the model is calibrated in float32 unless the CPU has native bf16
(AVX512-BF16/AMX): emulated bf16 matmuls are ~4.5x slower. Tensors left in float32 are cast back to the
recipe dtype when written.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from forge.digests import list_files
from forge.steps import StepContext, StepSpec

AVAILABLE_METHODS = ("none", "awq", "gptq", "fp8", "int8", "w4a8_awq", "nvfp4")
VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 16
REPORT_JSON, REPORT_MD, QUANT_MANIFEST = "quantize-report.json", "quantize-report.md", "forge-quantization.json"
REPORTS = (REPORT_JSON, REPORT_MD)  # build evidence beside the checkpoint; not shipped in the image

# Architectures with AWQ smoothing mappings in llm-compressor 0.14 (AWQ_MAPPING_REGISTRY).
AWQ_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "CohereForCausalLM",
    "Cohere2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo3ForCausalLM", "BloomForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Exaone4ForCausalLM", "Glm4MoeForCausalLM",
})
# Decoder-only families whose Linear layers llm-compressor's GPTQ/RTN paths handle (sequential pipeline).
LINEAR_ARCHITECTURES = AWQ_ARCHITECTURES | {"Gemma3ForConditionalGeneration", "MixtralForCausalLM", "PhiForCausalLM",
                                            "StableLmForCausalLM", "Starcoder2ForCausalLM", "SmolLM3ForCausalLM"}


_BACKEND_NAMES = {"llmcompressor": "llm-compressor", "modelopt": "ModelOpt"}


def _backend(loaded) -> str:
    from forge.backends import backend_for

    return backend_for(loaded.recipe.quantize, loaded.recipe.target.engine)


def _config(loaded) -> dict:
    from forge.trtllm import mode

    cfg = {**loaded.recipe.quantize.model_dump(mode="json"), "backend": _backend(loaded)}
    if loaded.recipe.target.engine == "trtllm" and mode(loaded) == "engine":
        cfg["trtllm_checkpoint"] = {"tp": loaded.recipe.target.tensor_parallel}  # also written for trtllm-build
    return cfg


def _data(loaded) -> dict[str, Path]:
    from forge.calibration import parse_hf_dataset

    cal = loaded.recipe.quantize.calibration
    if cal is None or parse_hf_dataset(cal.data) is not None:
        return {}  # an hf:// dataset is identified by its pinned commit, already in the config
    return {"calibration": loaded.resolve_path(cal.data)}


def _device() -> str:
    from forge.steps import device

    return device()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls run in hardware; without them PyTorch emulates bf16 on CPU."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def calibration_dtype(loaded) -> str:
    """The dtype the model is calibrated in: the recipe's on a GPU; on a CPU the recipe's only when it runs
    bf16 natively and the method calibrates, else float32 (emulated bf16 made GPTQ 4.5x slower: 687 s vs 152 s
    on a CPU without AVX512-BF16). ``FORGE_CPU_CALIBRATION_DTYPE`` overrides the CPU choice."""
    from forge.backends import needs_calibration

    if _device() == "cuda":
        return loaded.recipe.model.dtype
    from forge import env

    if forced := env.get("FORGE_CPU_CALIBRATION_DTYPE"):
        return forced
    native = loaded.recipe.model.dtype == "bfloat16" and cpu_has_native_bf16()
    return "bfloat16" if native and needs_calibration(loaded.recipe.quantize, loaded.recipe.target.engine) else "float32"


def _identity(loaded) -> dict:
    # the device and the calibration dtype change the numbers written, so they are part of the key
    if loaded.recipe.quantize.method == "none":
        return {}
    ident = {"device": _device(), "calibration_dtype": calibration_dtype(loaded)}
    if _backend(loaded) == "modelopt":
        from forge.steps import tool_versions

        ident["modelopt"] = tool_versions(("nvidia-modelopt",))["nvidia-modelopt"]
    return ident


SPEC = StepSpec(
    name="quantize",
    summary="quantize (llm-compressor → compressed-tensors, or ModelOpt → unified HF checkpoint), verify it",
    depends=("resolve",),
    tools=("llmcompressor", "compressed-tensors", "torch", "transformers"),
    version=2,
    config=_config,
    data=_data,
    identity=_identity,
    run="forge.steps.quantize:run",
    volatile=REPORTS,
)


# ------------------------------------------------------------------ pre-flight (config.json only)


def targeted_layers(shape, ignore: tuple[str, ...]) -> list[tuple[str, int]]:
    """(qualified name, in_features) of every Linear the quantizer will touch."""
    out = []
    for suffix, fan_in, _, _ in shape.linear_layers():
        for layer in range(shape.num_layers):
            name = f"model.layers.{layer}.{suffix}"
            if not _ignored(name, ignore):
                out.append((name, fan_in))
    return out


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            import re

            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def preflight(loaded, shape) -> list[str]:
    """Problems with the quantize section found from config.json alone (empty when fine)."""
    q = loaded.recipe.quantize
    problems: list[str] = []
    if q.method == "none":
        return problems
    arch = shape.architecture
    supported = AWQ_ARCHITECTURES if q.method == "awq" and _backend(loaded) == "llmcompressor" else LINEAR_ARCHITECTURES
    if arch not in supported and not arch.islower():  # lower-case: a GGUF arch name (llama, qwen2, ...)
        problems.append(f"{loaded.where('quantize', 'method')}: {q.method} through {_BACKEND_NAMES[_backend(loaded)]} does not support "
                        f"architecture {arch}; supported: {', '.join(sorted(supported))}")
    if q.method in ("awq", "gptq", "w4a8_awq"):
        group = q.group_size or 128
        bad = [(n, f) for n, f in targeted_layers(shape, q.ignore) if f % group]
        if bad:
            fans = sorted({f for _, f in bad})
            all_fans = sorted({f for _, f in targeted_layers(shape, q.ignore)})
            fits = [g for g in (256, 128, 64, 32, 16) if g < group and all(f % g == 0 for f in all_fans)]
            kinds = sorted({n.split(".", 3)[3] for n, _ in bad})
            problems.append(
                f"{loaded.where('quantize', 'group_size')}: group_size {group} does not divide the input features "
                f"({', '.join(map(str, fans))}) of {len(bad)} targeted layers: {', '.join(kinds)} "
                f"(e.g. {bad[0][0]}). Use group_size: {fits[0] if fits else 'a divisor of ' + str(fans[0])}"
                f" or add those layers to quantize.ignore")
    from forge.backends import needs_calibration

    calibrates = needs_calibration(q, loaded.recipe.target.engine)
    if calibrates and q.calibration is None:
        problems.append(f"{loaded.where('quantize')}: method {q.method} needs calibration data; add "
                        "`calibration: {data: evals/data/calib-pydoc.jsonl, samples: 128, max_seq_len: 512}` "
                        "(path relative to the recipe)")
    elif calibrates and q.calibration is not None:
        from forge.calibration import check_size
        from forge.errors import RecipeError

        path = loaded.resolve_path(q.calibration.data)
        from forge.calibration import parse_hf_dataset

        if parse_hf_dataset(q.calibration.data) is None and path.is_file():
            try:
                check_size(path, samples=q.calibration.samples, max_seq_len=q.calibration.max_seq_len,
                           where=loaded.where("quantize", "calibration"))
            except RecipeError as e:
                problems.extend(e.problems)
    return problems


# ------------------------------------------------------------------ the step


def run(ctx: StepContext) -> dict:
    q = ctx.recipe.recipe.quantize
    src = ctx.inputs["resolve"]
    if q.method == "none":
        ctx.report("BF16 pass-through (method: none)")
        _link_tree(src, ctx.out)
        return {"method": "none", "bytes": _size(ctx.out), "bf16_bytes": _size(src)}
    if _backend(ctx.recipe) == "modelopt":
        return run_modelopt(ctx)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.backends import llmcompressor as backend

    from forge import env

    env.quiet_libraries()  # forge shows progress; per-layer tqdm bars and loguru chatter would interleave with it
    import llmcompressor  # noqa: F401  (configures loguru on import, removing earlier handlers: import it first)
    torch.manual_seed(q.calibration.seed if q.calibration else 0)
    cuda = torch.cuda.is_available()
    recipe_dtype = getattr(torch, ctx.recipe.recipe.model.dtype)
    dtype = getattr(torch, calibration_dtype(ctx.recipe))

    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)  # saved into tokenizer_config: not HF_HUB_OFFLINE's
    dataset = None
    if backend.needs_calibration(q):
        from datasets import Dataset

        chunks = _calibration_windows(ctx, tokenizer)
        dataset = Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * len(c) for c in chunks]})

    ctx.report(f"loading the model ({'cuda' if cuda else 'cpu'}, {str(dtype).removeprefix('torch.')})")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="cuda" if cuda else None)
    linears = {n: m.weight.detach().to("cpu", copy=True) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not _ignored(n, q.ignore)}

    from loguru import logger

    log_id = logger.add(str(ctx.out.parent / "llmcompressor.log"), level="DEBUG")
    t0 = time.monotonic()
    try:
        log = backend.quantize(model, q, dataset, max_seq_len=q.calibration.max_seq_len if q.calibration else 512,
                                report=ctx.report, total_layers=len(linears))
    finally:
        logger.remove(log_id)
    seconds = time.monotonic() - t0

    ctx.report("measuring per-layer weight error")
    layers = _layer_report(model, linears, log.rows, q)
    ctx.report("writing compressed-tensors checkpoint")
    model.save_pretrained(ctx.out, save_compressed=True)
    tokenizer.save_pretrained(ctx.out)
    _copy_extras(src, ctx.out)
    del model
    if dtype != recipe_dtype:
        _cast_float32(ctx.out, recipe_dtype)

    ctx.report("verifying: load with transformers and generate")
    verify = verify_generation(src, ctx.out, tokenizer)
    facts = {
        "method": q.method, "scheme": _scheme(q), "seconds": round(seconds, 1),
        "calibration_dtype": str(dtype).removeprefix("torch."), "device": "cuda" if cuda else "cpu",
        "calibration_windows": len(dataset) if dataset is not None else 0,
        "bytes": _size(ctx.out), "bf16_bytes": _size(src), "verify": verify,
        "layers": len(layers),
        "mean_weight_rel_error": _mean([r["weight_rel_error"] for r in layers if r["weight_rel_error"] is not None]),
    }
    facts["size_ratio"] = round(facts["bytes"] / facts["bf16_bytes"], 4)
    from forge.steps import tool_versions

    facts["tools"] = tool_versions(SPEC.tools)
    facts["calibration_sha256"] = _calibration_sha256(ctx.recipe)
    _write_reports(ctx.out, layers, list(log.mappings.values()), facts)
    return facts


def _calibration_windows(ctx: StepContext, tokenizer) -> list[list[int]]:
    from forge.calibration import calibration_texts, windows

    cal = ctx.recipe.recipe.quantize.calibration
    ctx.report("tokenizing calibration data")
    return windows(calibration_texts(ctx.recipe, cal), tokenizer, samples=cal.samples, max_seq_len=cal.max_seq_len,
                   seed=cal.seed, where=ctx.recipe.where("quantize", "calibration"), source=cal.data)


def _copy_extras(src: Path, out: Path) -> None:
    """The snapshot's generation config and chat template, which save_pretrained/export may not write."""
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (src / extra).exists() and not (out / extra).exists():
            shutil.copyfile(src / extra, out / extra)


def _calibration_sha256(loaded) -> str | None:
    """The local calibration file's digest (an hf:// dataset is named by its pinned commit instead)."""
    from forge.digests import sha256_file

    data = _data(loaded)
    return sha256_file(data["calibration"]) if data else None


def run_modelopt(ctx: StepContext) -> dict:
    """ModelOpt: calibrate, quantize, export the unified HF checkpoint, validate it against the recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.backends import modelopt
    from forge.errors import StepError

    q, src = ctx.recipe.recipe.quantize, ctx.inputs["resolve"]
    torch.manual_seed(q.calibration.seed)
    cuda = torch.cuda.is_available()
    recipe_dtype = getattr(torch, ctx.recipe.recipe.model.dtype)
    dtype = getattr(torch, calibration_dtype(ctx.recipe))
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)  # saved into tokenizer_config: not HF_HUB_OFFLINE's
    batches = _calibration_windows(ctx, tokenizer)
    ctx.report(f"loading the model ({'cuda' if cuda else 'cpu'}, {str(dtype).removeprefix('torch.')})")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="cuda" if cuda else None)
    result = modelopt.quantize(model, q, batches, ctx.report)
    t0 = time.monotonic()
    if "trtllm_checkpoint" in _config(ctx.recipe):
        from forge.trtllm import TRTLLM_CKPT

        ctx.report("exporting the TensorRT-LLM checkpoint (for trtllm-build)")
        modelopt.export_trtllm(model, ctx.out / TRTLLM_CKPT, recipe_dtype, ctx.recipe.recipe.target.tensor_parallel)
    ctx.report("exporting the unified HF checkpoint (hf_quant_config.json)")
    modelopt.export(model, ctx.out, recipe_dtype)
    export_s = time.monotonic() - t0
    del model
    tokenizer.save_pretrained(ctx.out)
    _copy_extras(src, ctx.out)
    ctx.report("validating the checkpoint against the recipe")
    try:
        checkpoint = modelopt.validate_checkpoint(ctx.out, q)
    except ValueError as e:
        raise StepError(f"ModelOpt wrote a checkpoint that does not match the recipe: {e}") from None
    verify = None
    if q.method == "fp8":  # FP8 dequantizes exactly (fp8 × scale): generate with it and compare with BF16
        ctx.report("verifying: dequantized FP8 weights generate like BF16")
        verify = verify_dequantized(src, modelopt.dequantized_state(ctx.out), tokenizer)
    facts = {
        "method": q.method, "backend": "modelopt", "scheme": _scheme(q), "seconds": round(result["seconds"], 1),
        "export_seconds": round(export_s, 1), "calibration_dtype": str(dtype).removeprefix("torch."),
        "device": "cuda" if cuda else "cpu", "calibration_windows": len(batches),
        "bytes": _size(ctx.out), "bf16_bytes": _size(src), "verify": verify, "checkpoint": checkpoint,
        "layers": len(result["layers"]),
    }
    facts["size_ratio"] = round(facts["bytes"] / facts["bf16_bytes"], 4)
    from forge.steps import tool_versions

    facts["tools"] = tool_versions(("nvidia-modelopt", "torch", "transformers"))
    facts["calibration_sha256"] = _calibration_sha256(ctx.recipe)
    (ctx.out / REPORT_JSON).write_text(json.dumps({"summary": facts, "layers": result["layers"]}, indent=2) + "\n")
    lines = [f"# quantize report: {facts['scheme']} (ModelOpt {facts['tools']['nvidia-modelopt']})", "",
             f"size {facts['bytes'] / 1e6:.1f} MB vs BF16 {facts['bf16_bytes'] / 1e6:.1f} MB ({facts['size_ratio']:.2f}×) · "
             f"{facts['seconds']} s calibration + {facts['export_seconds']} s export on {facts['device']} · "
             f"{checkpoint['quantized_layers']} quantized layers, quant_algo {checkpoint['quant_algo']}"
             + (f" · greedy agreement with BF16 {verify['agreement']:.0%}" if verify else ""), "",
             "| layer | bits | group | weight amax |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['bits']} | {r['group_size'] or '-'} | {r['weight_amax']} |" for r in result["layers"]]
    (ctx.out / REPORT_MD).write_text("\n".join(lines) + "\n")
    (ctx.out / QUANT_MANIFEST).write_text(json.dumps({k: facts[k] for k in (
        "method", "backend", "scheme", "device", "calibration_dtype", "calibration_sha256", "tools")}, indent=2) + "\n")
    return facts


def verify_dequantized(bf16_dir: Path, weights: dict, tokenizer) -> dict:
    """Greedy tokens of the BF16 model, then of the same model with the dequantized weights swapped in."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32, device_map=None)
    ids = tokenizer(VERIFY_PROMPT, return_tensors="pt")
    tokens = {}
    for label in ("bf16", "quantized"):
        if label == "quantized":
            missing = set(weights) - set(model.state_dict())
            if missing:
                from forge.errors import StepError

                raise StepError(f"quantized tensors with no counterpart in the model: {sorted(missing)[:3]}")
            model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=VERIFY_TOKENS, do_sample=False)
        tokens[label] = out[0, ids["input_ids"].shape[1]:].tolist()
    return {**_agreement(tokens["bf16"], tokens["quantized"], tokenizer), "how": "dequantized fp8 × weight_scale"}


def _agreement(a: list[int], b: list[int], tokenizer) -> dict:
    """How far the quantized model's greedy tokens follow BF16's."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS, "matching_prefix": prefix,
            "agreement": round(sum(x == y for x, y in zip(a, b)) / max(1, len(a)), 4),
            "bf16_text": tokenizer.decode(a, skip_special_tokens=True),
            "quantized_text": tokenizer.decode(b, skip_special_tokens=True)}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _scheme(q) -> str:
    from forge.capability import scheme_of

    return scheme_of(q.method, q.bits) + (f" g{q.group_size or 128}" if q.method in ("awq", "gptq", "w4a8_awq") else "")


def _layer_report(model, originals: dict, rows: dict, q) -> list[dict]:
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if name not in originals or scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        err = None
        g_idx = getattr(module, "weight_g_idx", None)
        if g_idx is None or bool((g_idx == torch.arange(g_idx.numel(), device=g_idx.device) // args.group_size).all()):
            with torch.no_grad():  # group order permuted by actorder: fake_quantize cannot replay it, so no figure
                zp = getattr(module, "weight_zero_point", None)
                # The weight the quantizer saw: GPTQ rewrites weights in place, so its reference is the
                # original; AWQ and FP8/RTN quantize at save time, so theirs is the current (AWQ-smoothed)
                # weight. SmoothQuant + GPTQ (int8) leaves no reference: GPTQ's own error stands alone.
                if q.method == "int8":
                    ref = None
                else:
                    ref = (originals[name] if q.method == "gptq" else module.weight.detach()).float().cpu()
                qw = fake_quantize(module.weight.detach().float(), module.weight_scale.float(), zp, args)
                if ref is not None:
                    err = round((torch.linalg.norm(qw.cpu() - ref) / torch.linalg.norm(ref)).item(), 6)
        row = rows.get(name, {})
        out.append({"layer": name, "method": q.method, "bits": args.num_bits, "type": str(getattr(args.type, "value", args.type)),
                    "strategy": str(getattr(args.strategy, "value", args.strategy)), "group_size": args.group_size,
                    "weight_rel_error": err, "backend_error": row.get("backend_error"),
                    "seconds": row.get("seconds")})
    return out


def verify_generation(bf16_dir: Path, quant_dir: Path, tokenizer) -> dict:
    """Load the written checkpoint with transformers (CPU) and compare greedy tokens with BF16's."""
    import torch
    from transformers import AutoModelForCausalLM

    from forge.errors import StepError

    ids = tokenizer(VERIFY_PROMPT, return_tensors="pt")
    tokens = {}
    for label, path in (("bf16", bf16_dir), ("quantized", quant_dir)):
        try:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=None)
        except Exception as e:
            raise StepError(f"the {label} checkpoint at {path} does not load with transformers: {type(e).__name__}: {e}") from None
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=VERIFY_TOKENS, do_sample=False)
        tokens[label] = out[0, ids["input_ids"].shape[1]:].tolist()
        del m
    result = _agreement(tokens["bf16"], tokens["quantized"], tokenizer)
    if not result["quantized_text"].strip():
        raise StepError(f"the quantized checkpoint generated nothing for {VERIFY_PROMPT!r}")
    return result


def _cast_float32(out: Path, dtype) -> None:
    """Cast float32 tensors (left by CPU calibration) to the recipe dtype; quantized ints/fp8 stay as they are."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        if any(t.dtype == torch.float32 for t in tensors.values()):
            save_file({k: (t.to(dtype) if t.dtype == torch.float32 else t) for k, t in tensors.items()}, f,
                      metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_reports(out: Path, layers: list[dict], awq: list[dict], facts: dict) -> None:
    (out / REPORT_JSON).write_text(json.dumps({"summary": facts, "layers": layers, "awq_mappings": awq}, indent=2) + "\n")
    lines = [f"# quantize report: {facts['scheme']}", "",
             f"size {facts['bytes'] / 1e6:.1f} MB vs BF16 {facts['bf16_bytes'] / 1e6:.1f} MB "
             f"({facts['size_ratio']:.2f}×) · {facts['seconds']} s on {facts['device']} "
             f"({facts['calibration_dtype']}) · greedy agreement with BF16 {facts['verify']['agreement']:.0%} "
             f"(first {facts['verify']['matching_prefix']} tokens identical)", "",
             "| layer | bits | group | weight rel. error | backend error | seconds |", "|---|---|---|---|---|---|"]
    for r in layers:
        be = "-" if r["backend_error"] is None else f"{r['backend_error']:.4g}"
        we = "-" if r["weight_rel_error"] is None else f"{r['weight_rel_error']:.4f}"
        lines.append(f"| {r['layer']} | {r['bits']} | {r['group_size'] or r['strategy']} | {we} | "
                     f"{be} | {r['seconds'] if r['seconds'] is not None else '-'} |")
    if awq:
        lines += ["", "| AWQ smooth layer | loss before | loss after | seconds |", "|---|---|---|---|"]
        lines += [f"| {m['smooth_layer']} | {m['initial_loss']:.4g} | {m['best_loss']:.4g} | {m['seconds']} |" for m in awq]
    (out / REPORT_MD).write_text("\n".join(lines) + "\n")
    (out / QUANT_MANIFEST).write_text(json.dumps({k: facts[k] for k in ("method", "scheme", "device", "calibration_dtype",
                                                                        "calibration_sha256", "tools")},
                                                 indent=2) + "\n")


def _link_tree(src: Path, dst: Path) -> None:
    for rel in list_files(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst / rel)  # both sides are immutable store entries: sharing inodes is safe
        except OSError:
            shutil.copyfile(src / rel, dst / rel)


def _size(path: Path) -> int:
    return sum((path / rel).stat().st_size for rel in list_files(path) if rel.endswith(".safetensors"))


# ------------------------------------------------------------------ reader (what downstream steps read)


@dataclass(frozen=True)
class Output:
    """The quantize step's checkpoint as downstream steps read it (no one else names its files)."""
    dir: Path                          # the HF-format checkpoint (config, weights, tokenizer) + build reports
    facts: dict                        # method, bytes, tools, … (the step manifest's facts)

    @classmethod
    def read(cls, entry) -> "Output":
        return cls(entry.out, entry.manifest.get("facts", {}))

    @property
    def reports(self) -> tuple[Path, ...]:
        """Build evidence written beside the checkpoint (carries timings: never shipped in an image)."""
        return tuple(self.dir / r for r in REPORTS if (self.dir / r).exists())

    @property
    def trtllm_checkpoint(self) -> Path | None:
        """ModelOpt's TensorRT-LLM checkpoint (engine mode), when the backend wrote one."""
        from forge.trtllm import TRTLLM_CKPT

        return self.dir / TRTLLM_CKPT if (self.dir / TRTLLM_CKPT).exists() else None

    @property
    def modelopt_checkpoint(self) -> bool:
        """A ModelOpt unified checkpoint (hf_quant_config.json): transformers' hf loader cannot read it."""
        return (self.dir / "hf_quant_config.json").exists()

    def model_entries(self) -> list[Path]:
        """The top-level files and dirs of the servable checkpoint: no reports, no TensorRT-LLM checkpoint."""
        skip = {p.name for p in self.reports} | ({self.trtllm_checkpoint.name} if self.trtllm_checkpoint else set())
        return [p for p in sorted(self.dir.iterdir()) if p.name not in skip]
