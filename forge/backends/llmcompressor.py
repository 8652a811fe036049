"""Quantization through llm-compressor, written as compressed-tensors (what vLLM loads natively).

AutoAWQ and AutoGPTQ are archived; llm-compressor is where AWQ and GPTQ are maintained. Schemes:

    awq   AWQModifier (smoothing) + QuantizationModifier   W4A16, group, (a)symmetric
    gptq  GPTQModifier                                      W4A16 / W8A16, group, activation order
    fp8   QuantizationModifier FP8_DYNAMIC (data-free) or FP8 (static per-tensor, calibrated)
    int8  SmoothQuantModifier + GPTQModifier W8A8 (per-channel weights, dynamic per-token activations)

Data-free schemes (``STREAMED``: FP8 dynamic) are quantized shard by shard with ``model_free_ptq``, without
building the model: the same modifier's resolved config, the same layers (the model's Linear modules that
oneshot targets, found on a meta-device model), the same tensors byte for byte, the same config.json and
recipe.yaml as oneshot + save_pretrained (tests/test_streaming.py).
"""
from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from forge.backends.base import Quantized, architecture_problems
from forge.backends.tensors import CompressedWeights, Fp8Weights, TensorReader, cast_float32, fp8_to_float, one_torch_thread
from forge.gpu.methods import METHODS, written_as
from forge.model import layerwise
from forge.model.shape import DECODERS, ignored
from forge.backends import cpu_quantize
from forge.core import host, options as env

if TYPE_CHECKING:
    import torch

# Architectures with AWQ smoothing mappings in llm-compressor 0.14 (AWQ_MAPPING_REGISTRY).
AWQ_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "CohereForCausalLM",
    "Cohere2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo3ForCausalLM", "BloomForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Exaone4ForCausalLM", "Glm4MoeForCausalLM",
})
CALIBRATED = {n for n in written_as("compressed-tensors") if METHODS[n].calibrates != "nothing"}
STREAMED = {"fp8": "FP8_DYNAMIC"}   # data-free schemes quantized shard by shard (llm-compressor's model_free_ptq)
PACKED = ("gptq", "awq")            # weight-only int schemes (pack-quantized): verified on their decompressed weights


def needs_calibration(q) -> bool:
    return q.method in CALIBRATED or (q.method == "fp8" and q.fp8_scheme == "static") or q.kv_cache == "fp8"


def _weights(q) -> dict:
    bits = 4 if q.method == "awq" else (q.bits or 4)
    return {"num_bits": bits, "type": "int", "symmetric": q.symmetric, "strategy": "group",
            "group_size": q.group_size or 128, "actorder": ("weight" if q.actorder else None)}


def build_recipe(q) -> list:
    """llm-compressor modifiers for a recipe's quantize section."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(q.ignore)
    kv = ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
          if q.kv_cache == "fp8" else None)
    if q.method == "fp8":
        return [QuantizationModifier(targets=["Linear"], ignore=ignore, kv_cache_scheme=kv,
                                     scheme="FP8_DYNAMIC" if q.fp8_scheme == "dynamic" else "FP8")]
    if q.method == "gptq":
        w = _weights(q)
        return [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": w}}, ignore=ignore,
                             kv_cache_scheme=kv, batched_quantization=None)]
    if q.method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        w = {k: v for k, v in _weights(q).items() if k != "actorder"}
        return [AWQModifier(), QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": w}},
                                                    ignore=ignore, kv_cache_scheme=kv)]
    if q.method == "int8":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=ignore, kv_cache_scheme=kv,
                             batched_quantization=None)]
    raise ValueError(f"llm-compressor backend has no method {q.method!r}")


# ------------------------------------------------------------------ CPU shim


@contextmanager
def cpu_pin_memory_shim() -> Iterator[None]:
    """Without an accelerator, make IntermediatesCache.pin_memory a no-op.

    llm-compressor's AWQ pins cached activations before its grid search so that later host-to-device
    copies can be asynchronous. Pinning needs an accelerator runtime; on a CPU-only torch it raises
    ("Cannot access accelerator device when none is available") and AWQ crashes. With no device to
    copy to, pinning has no purpose, so skipping it changes nothing but the crash. Narrow on purpose:
    only this method, only without an accelerator, only for the duration of a quantize run. The test
    tests/test_quantize.py::test_pin_memory_shim_still_needed pins the upstream function it replaces.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


# ------------------------------------------------------------------ per-layer report


@dataclass
class LayerLog:
    """Per-layer facts llm-compressor reports through loguru while it runs."""

    report: Callable
    total: int
    rows: dict[str, dict] = field(default_factory=dict)          # Linear name -> GPTQ error, seconds
    mappings: dict[str, dict] = field(default_factory=dict)      # AWQ smooth layer -> loss before/after
    _pending: list[str] = field(default_factory=list)
    _metric: list[tuple[str, float]] = field(default_factory=list)
    _last: float = field(default_factory=time.monotonic)

    _QUANTIZING = re.compile(r"Quantizing \d+ module\(s\): \[(.*)\]")
    _AWQ = re.compile(r"AWQ grid search for (\S+): initial error = ([\d.e+-]+), best error = ([\d.e+-]+)")

    def sink(self, message) -> None:
        rec = message.record
        text = rec["message"]
        if m := self._QUANTIZING.search(text):
            self._pending = [n.strip().strip("'\"") for n in m.group(1).split(",")]
            self._metric = []
            self.report(f"GPTQ {self._pending[0]}", completed=len(self.rows), total=self.total)
        elif rec["level"].name == "METRIC" and self._pending:
            kind, _, value = text.partition(" ")
            self._metric.append((kind, float(value.rstrip("s"))))
            per = 2  # time, error
            if len(self._metric) == per * len(self._pending):
                # ExitStack closes the per-module loggers last-in first-out
                for i, name in enumerate(reversed(self._pending)):
                    vals = dict(self._metric[i * per:(i + 1) * per])
                    self.rows.setdefault(name, {})["backend_error"] = vals.get("error")
                    self.rows[name]["seconds"] = vals.get("time")
                self._pending = []
        elif m := self._AWQ.search(text):
            now = time.monotonic()
            self.mappings[m.group(1)] = {"smooth_layer": m.group(1), "initial_loss": float(m.group(2)),
                                         "best_loss": float(m.group(3)), "seconds": round(now - self._last, 3)}
            self._last = now
            self.report(f"AWQ smoothing {m.group(1)}", completed=len(self.mappings), total=self.total)


def _oneshot(model, q, dataset, *, max_seq_len: int, report: Callable, total_layers: int) -> LayerLog:
    """Run oneshot in place on model. Returns what the backend reported per layer (GPTQ) and mapping (AWQ)."""
    from llmcompressor import oneshot
    from loguru import logger

    log = LayerLog(report=report, total=total_layers)
    sink_id = logger.add(log.sink, level="DEBUG", filter=lambda r: r["name"].startswith("llmcompressor"))
    traced = _fx_wrapped()
    before = set(traced)
    try:
        with cpu_pin_memory_shim():
            kwargs = {}
            if dataset is not None:
                kwargs = dict(dataset=dataset, max_seq_length=max_seq_len, num_calibration_samples=len(dataset),
                              shuffle_calibration_samples=False)
            oneshot(model=model, recipe=build_recipe(q), **kwargs)
    finally:
        logger.remove(sink_id)
        from llmcompressor.core import active_session

        active_session().reset()   # the session holds the model: let it go when forge frees it
        for key in set(traced) - before:
            del traced[key]   # torch.fx keeps the sequential pipeline's traced code, whose globals hold the model
    return log


def _fx_wrapped() -> dict:
    """torch.fx's module-level registry of wrapped functions. llm-compressor's sequential pipeline registers the
    code it generates from the model there, and nothing removes it: the model would stay alive after forge frees
    it, next to the checkpoint loaded to verify (tests/test_quantize.py::test_quantize_never_holds_two_models)."""
    from torch.fx import _symbolic_trace

    return getattr(_symbolic_trace, "_wrapped_fns_to_patch", {})


def _source_weights(model) -> Callable[[str], "torch.Tensor | None"]:
    """Layer name -> its weight as stored in the snapshot the model was loaded from (model.name_or_path)."""
    read = TensorReader(model.name_or_path)
    return lambda layer: read(f"{layer}.weight")


CHUNK_ELEMENTS = 1 << 19   # rows per step of the weight-error measure: ~2 MB of float32 temporaries, cache-sized


def _plain_fp8(args) -> bool:
    """FP8 weights scaled per tensor or per output channel: fake-quantized here with forge's fp8 decode."""
    return (str(getattr(args.type, "value", args.type)) == "float" and args.num_bits == 8
            and str(getattr(args.strategy, "value", args.strategy)) in ("tensor", "channel"))


def _fake_fp8(weight, scale):
    """What compressed-tensors' fake_quantize computes for plain FP8 (weight / scale, clamped to the fp8 range,
    rounded to float8_e4m3fn, times scale), with forge's fp8 decode in place of torch's scalar cast: 4x faster."""
    import torch

    bound = torch.finfo(torch.float8_e4m3fn).max
    return fp8_to_float(weight.div(scale).clamp_(-bound, bound).to(torch.float8_e4m3fn), scale=scale)


def _rel_error(weight, scale, zp, args, ref) -> float:
    """||fake_quantize(weight) - ref|| / ||ref||, a block of output rows at a time: each row's scales (channel
    and group strategies) go with it, so the figure is the whole tensor's, without whole-tensor float32 copies.
    Run on one thread per layer (``_layer_report`` runs layers side by side): on 4096 x 3072 bf16, 2.4x faster
    than one whole-tensor pass on an idle 2-core machine and 2-4x on a busy one."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    rows = weight.shape[0]
    per_row = scale is not None and scale.dim() > 0 and scale.shape[0] == rows and rows > 1
    step = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel()))
    fp8 = _plain_fp8(args)
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for i in range(0, rows, step):
        s, z = (scale[i:i + step], None if zp is None else zp[i:i + step]) if per_row else (scale, zp)
        r = ref[i:i + step].float().reshape(-1)
        w = weight[i:i + step].float()
        d = (_fake_fp8(w, s.float()) if fp8 else fake_quantize(w, s.float(), z, args)).reshape(-1).sub_(r)
        num += torch.dot(d, d)
        den += torch.dot(r, r)
    return round(float(num.sqrt() / den.sqrt()), 6)


def _layer_report(model, targets: set[str], originals, rows: dict, q, *, measure: bool = True) -> list[dict]:
    """One row per quantized layer; the weight errors (unless not ``measure``d here) are measured on as many
    threads as torch had, one layer each, every op single-threaded (torch releases the GIL in its ops)."""
    from concurrent.futures import ThreadPoolExecutor

    layers = [(n, m) for n, m in model.named_modules()
              if n in targets and getattr(m, "quantization_scheme", None) is not None
              and m.quantization_scheme.weights is not None]
    with one_torch_thread() as threads, ThreadPoolExecutor(max(1, threads), thread_name_prefix="forge-layer-error") as pool:
        errors = list(pool.map(lambda nm: _layer_error(*nm, originals, q), layers)) if measure else [None] * len(layers)
    out = []
    for (name, module), err in zip(layers, errors):
        args = module.quantization_scheme.weights
        row = rows.get(name, {})
        out.append({"layer": name, "method": q.method, "bits": args.num_bits, "type": str(getattr(args.type, "value", args.type)),
                    "strategy": str(getattr(args.strategy, "value", args.strategy)), "group_size": args.group_size,
                    "weight_rel_error": err, "backend_error": row.get("backend_error"),
                    "seconds": row.get("seconds")})
    return out


def _layer_error(name: str, module, originals, q) -> float | None:
    import torch

    args = module.quantization_scheme.weights
    g_idx = getattr(module, "weight_g_idx", None)
    if g_idx is not None and not bool((g_idx == torch.arange(g_idx.numel(), device=g_idx.device) // args.group_size).all()):
        return None  # group order permuted by actorder: fake_quantize cannot replay it, so no figure
    with torch.no_grad():
        # The weight the quantizer saw: GPTQ rewrites weights in place, so its reference is the original; AWQ and
        # FP8/RTN quantize at save time, so theirs is the current (AWQ-smoothed) weight. SmoothQuant + GPTQ (int8)
        # leaves no reference: GPTQ's own error stands alone.
        ref = None if q.method == "int8" else (originals(name) if originals else module.weight.detach())
        if ref is None:
            return None
        zp = getattr(module, "weight_zero_point", None)
        return _rel_error(module.weight.detach().cpu(), module.weight_scale.detach().cpu(),
                          None if zp is None else zp.detach().cpu(), args, ref.cpu())


class LlmCompressor:
    name = "llmcompressor"
    title = "llm-compressor"
    methods = written_as("compressed-tensors")
    tools = ("llmcompressor", "compressed-tensors", "torch", "transformers")
    loads_in_transformers = True

    def format(self, q) -> str:
        return "compressed-tensors"

    def needs_calibration(self, q) -> bool:
        return needs_calibration(q)

    def verifies(self, q) -> bool:
        return True   # every compressed-tensors checkpoint loads in transformers (FP8 also dequantizes)

    def preflight(self, loaded, shape) -> list[str]:
        supported = AWQ_ARCHITECTURES if loaded.recipe.quantize.method == "awq" else DECODERS
        return architecture_problems(loaded, shape, self.title, supported)

    def quantize(self, model, q, windows, *, report, log_dir: Path) -> Quantized:
        env.quiet_libraries()  # forge shows progress; per-layer tqdm bars and loguru chatter would interleave with it
        import llmcompressor  # noqa: F401  (configures loguru on import, removing earlier handlers: import it first)
        import torch
        from loguru import logger

        dataset = None
        if windows is not None:
            from datasets import Dataset

            dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(c) for c in windows]})
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not ignored(n, q.ignore)]
        log_id = logger.add(str(log_dir / "llmcompressor.log"), level="DEBUG")
        try:
            log = _oneshot(model, q, dataset, max_seq_len=q.calibration.max_seq_len if q.calibration else 512,
                           report=report, total_layers=len(targets))
        finally:
            logger.remove(log_id)
        # FP8 leaves the weights as they were and is verified on its written, dequantized weights, next to the
        # BF16 ones: the verification measures the error there (forge.steps.quantize), on what ships
        measure = q.method != "fp8"
        if measure:
            report("measuring per-layer weight error")
        # GPTQ rewrites weights in place: its reference is the original, read back one tensor at a time from the
        # snapshot the model was loaded from (no copy of the whole model is kept while it quantizes)
        originals = _source_weights(model) if q.method == "gptq" else None
        layers = _layer_report(model, set(targets), originals, log.rows, q, measure=measure)
        errors = [r["weight_rel_error"] for r in layers if r["weight_rel_error"] is not None]
        mean = round(sum(errors) / len(errors), 6) if errors else None
        return Quantized(layers, summary={"mean_weight_rel_error": mean},
                         sections={"awq_mappings": list(log.mappings.values())})

    def offloads(self, q) -> bool:
        """GPTQ and AWQ run through oneshot's sequential pipeline, which onloads one decoder layer at a time: the
        model may be loaded with its weights offloaded to disk (compressed-tensors' ``load_offloaded_model``), and
        their checkpoints are verified one layer at a time (``dequantized``). INT8 W8A8 and an FP8 KV cache are
        verified by transformers on the whole checkpoint: they are not offloaded."""
        return q.method in PACKED and q.kv_cache != "fp8" and needs_calibration(q)

    def streams(self, q, src: Path | None = None, dtype: str | None = None) -> bool:
        """Whether ``q`` is quantized shard by shard: a data-free scheme of the method table with no calibrated part
        (an FP8 KV cache is), over a snapshot (``src``, when known) whose float tensors are stored in the recipe's
        ``dtype`` (the in-memory path would cast them first)."""
        if q.method not in STREAMED or METHODS[q.method].calibrates != "nothing" or needs_calibration(q):
            return False
        if src is None:
            return True
        stored = TensorReader(src).dtypes
        return bool(stored) and {d for d in stored.values() if d.startswith(("F", "BF"))} <= {_SAFETENSORS[dtype]}

    def quantize_files(self, src: Path, out: Path, q, *, report, workers: int, dtype, log_dir: Path) -> Quantized:
        """Quantize ``src`` into ``out`` shard by shard (``workers`` shards at a time), as oneshot would."""
        env.quiet_libraries()
        import llmcompressor  # noqa: F401  (configures loguru on import, removing earlier handlers: import it first)
        import torch
        from compressed_tensors.quantization import preset_name_to_scheme
        from compressed_tensors.utils import match_named_modules
        from llmcompressor import model_free_ptq
        from llmcompressor.recipe import Recipe
        from loguru import logger
        from transformers.initialization import no_init_weights

        modifiers = build_recipe(q)
        model = layerwise.empty_model(src, dtype)   # names and classes only: no weight is read
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        targets = {n for n, _ in match_named_modules(model, ["Linear"], list(q.ignore))}
        del model
        config = modifiers[0].resolve_quantization_config()   # oneshot's: group_0, its observers
        for group in config.config_groups.values():
            group.format = group.format or preset_name_to_scheme(STREAMED[q.method], ["Linear"]).format
        # model_free_ptq quantizes every stored 2-D ".weight" it is not told to ignore, by name alone: ignore each one
        # that is not a Linear layer oneshot would quantize (embeddings, the head, the recipe's ignore list)
        shapes = TensorReader(src).shapes
        config.ignore = sorted({n.removesuffix(".weight") for n, s in shapes.items()
                                if n.endswith(".weight") and len(s) == 2} - targets)
        report(f"quantizing {len(targets)} layers shard by shard ({workers} at a time, {host.device()}), "
               "without building the model")
        cpu_quantize.register()
        log_id = logger.add(str(log_dir / "llmcompressor.log"), level="DEBUG")
        try:
            # model_free_ptq builds an nn.Linear for each weight and copies the weight into it: torch's random
            # init of that Linear, thrown away at once, was a third of its time on the 3B shape (no_init_weights
            # makes torch's init functions no-ops while it runs; nothing else initializes weights meanwhile)
            with no_init_weights():
                model_free_ptq(src, out, config=config, max_workers=workers, device=host.device())
        finally:
            logger.remove(log_id)
        # config.json as oneshot + save_pretrained write it: the Linear layers left unquantized as the ignore list
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"]["ignore"] = [n for n in linear if n not in targets]
        cfg["quantization_config"].setdefault("sparsity_config", {})
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        Recipe.from_modifiers(modifiers).yaml(file_path=str(out / "recipe.yaml"))
        args = config.config_groups["group_0"].weights
        rows = [{"layer": n, "method": q.method, "bits": args.num_bits, "type": str(getattr(args.type, "value", args.type)),
                 "strategy": str(getattr(args.strategy, "value", args.strategy)), "group_size": args.group_size,
                 "weight_rel_error": None, "backend_error": None, "seconds": None}
                for n in linear if n in targets and f"{n}.weight" in shapes]
        return Quantized(rows, summary={"mean_weight_rel_error": None, "streamed": True, "workers": workers})

    def export(self, model, out: Path, *, dtype, loaded, max_shard_bytes: int | None = None) -> None:
        """``max_shard_bytes``: for a model offloaded to disk, whose shards are gathered in memory as they are written
        (save_pretrained's default is 50 GB)."""
        cpu_quantize.register()   # compression rounds every weight: 35 s of the library's 50 s for a 3B FP8 checkpoint on a CPU
        model.save_pretrained(out, save_compressed=True,
                              **({"max_shard_size": max_shard_bytes} if max_shard_bytes else {}))
        cast_float32(out, dtype)   # tensors CPU calibration left in float32; quantized ints/fp8 stay

    def validate(self, out: Path, q) -> dict:
        cfg = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
        if cfg.get("quant_method") != "compressed-tensors":
            raise ValueError(f"config.json quantization_config.quant_method is {cfg.get('quant_method')!r}, "
                             "not 'compressed-tensors'")
        return {"format": cfg.get("format"), "ignore": cfg.get("ignore", [])}

    def dequantized(self, out: Path, q):
        """FP8 dequantizes exactly (fp8 x scale), fast; GPTQ and AWQ's packed int weights through the library's own
        decompression, layer by layer (what transformers computes at load). Others: None, run by transformers
        (INT8 W8A8 and an FP8 KV cache, which quantize activations too; a checkpoint of several config groups)."""
        if q.method == "fp8":
            return Fp8Weights(out)
        if q.method not in PACKED or q.kv_cache == "fp8":
            return None
        try:
            return CompressedWeights(out)
        except ValueError:
            return None


_SAFETENSORS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}   # a recipe dtype as safetensors names it
BACKEND = LlmCompressor()
