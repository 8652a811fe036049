"""quantize: resolved BF16 snapshot -> quantized checkpoint, through any backend (forge.backends).

Pre-flight checks (``preflight``) read config.json only and run at validate time, before any weight
is loaded: group size divides every targeted layer, the backend supports the architecture, calibration is
declared and large enough. The run is one skeleton for every backend: seed, calibration windows (tokenizer
only), the model in the calibration dtype, the backend's quantize / export / validate, then a verification
(the written checkpoint, or its dequantized weights, teacher-forced over BF16's greedy tokens, which the
reference step records: one forward pass),
the reports and a manifest with the same keys whatever the backend.

Streaming (FORGE_STREAMING, on by default): a data-free scheme the backend quantizes shard by shard
(``Backend.streams``: llm-compressor's FP8 dynamic) is written without building the model, one shard at a time on a
CPU, on a GPU as many as there are cores and memory for (``host_fit.streaming_workers``); the checkpoint is the in-memory path's,
tensor for tensor. The verification then checks the written tensors against the model from their headers and runs
the dequantized weights one decoder layer at a time (forge.steps.verify): no step holds the model.

Offloaded calibration (past RAM): a method whose backend ``offloads`` it (llm-compressor's GPTQ and AWQ) and whose
whole model does not fit in memory while the offloaded run does (``host_fit.offload_budget``) is loaded with its
weights left in the safetensors files and calibrated one decoder layer at a time; the checkpoint is the in-memory
one, tensor for tensor (tests/test_offload.py), and its verification streams.

CPU policy: without an accelerator the model is calibrated in float32 unless the CPU has native bf16
(AVX512-BF16/AMX): emulated bf16 matmuls are ~4.5x slower. The backend writes tensors in the recipe dtype.
"""
from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from forge.core import options as env, host
from forge.core.digests import list_files, sha256_file
from forge.core.linking import place_tree
from forge.gpu import host_fit
from forge.gpu.methods import GROUPED, scheme
from forge.steps import StepContext, StepSpec, reference
from forge.steps.verify import (check_loads, check_tensors, verify_dequantized, verify_dequantized_in_memory,
                                verify_generation)
from forge.backends import get
from forge.core.errors import ResourceError, StepError
from forge.core.jsonsafe import dumps
from forge.engines.trtllm_build import TRTLLM_CKPT
from forge.model.calibration import calibration_texts, parse_hf_dataset, windows

REPORT_JSON, REPORT_MD, QUANT_MANIFEST = "quantize-report.json", "quantize-report.md", "forge-quantization.json"
REPORTS = (REPORT_JSON, REPORT_MD)  # build evidence beside the checkpoint; not shipped in the image
MANIFEST_KEYS = ("method", "backend", "format", "scheme", "device", "calibration_dtype", "calibration_sha256", "tools")
_device = host.device   # kept for callers of the old private name (steps/evaluate.py)


def _config(loaded) -> dict:
    cfg = {**loaded.recipe.quantize.model_dump(mode="json"), "backend": loaded.backend}
    if loaded.compiles:
        cfg["trtllm_checkpoint"] = {"tp": loaded.recipe.target.tensor_parallel}  # also written for trtllm-build
    return cfg


def _data(loaded) -> dict[str, Path]:
    cal = loaded.recipe.quantize.calibration
    if cal is None or parse_hf_dataset(cal.data) is not None:
        return {}  # an hf:// dataset is identified by its pinned commit, already in the config
    return {"calibration": loaded.resolve_path(cal.data)}


def calibration_policy(loaded) -> str:
    """How the model's load dtype is chosen (part of the key; the dtype itself is a fact of the run):

    - on a GPU, for methods that calibrate nothing (FP8 dynamic, data-free), and on a CPU with native bf16
      (AVX512-BF16/AMX): the recipe's dtype, as the raw library loads it;
    - on a CPU that emulates bf16, for calibrated methods: float32 (emulated bf16 made GPTQ 4.5x slower:
      687 s vs 152 s) when the float32 model fits in half of this machine's memory, else the recipe's dtype
      (a 3B model in float32 plus its calibration state does not fit 24 GiB). The choice depends on the
      snapshot (upstream digest) and this machine's memory, both in the key.
    ``FORGE_CPU_CALIBRATION_DTYPE`` fixes the CPU choice."""
    recipe_dtype = loaded.recipe.model.dtype
    if host.device() == "cuda":
        return recipe_dtype
    if forced := env.current().cpu_calibration_dtype:
        return forced
    if not loaded.calibrates:
        return recipe_dtype
    if recipe_dtype == "bfloat16" and host.cpu_has_native_bf16():
        return recipe_dtype
    return f"float32-if-fits:{host.memory_bytes() >> 30}GiB"


def calibration_dtype(policy: str, snapshot: Path, recipe_dtype: str) -> str:
    """The dtype a policy (``calibration_policy``) picks for this snapshot."""
    if not policy.startswith("float32-if-fits:"):
        return policy
    memory = int(policy.split(":", 1)[1].removesuffix("GiB")) << 30
    stored = sum(f.stat().st_size for f in snapshot.glob("*.safetensors"))
    float32_bytes = stored * (2 if recipe_dtype in ("bfloat16", "float16") else 1)
    return "float32" if host_fit.float32_fits(float32_bytes, memory) else recipe_dtype


def _identity(loaded) -> dict:
    # the device, the load dtype policy and the backend's libraries change the numbers written: part of the key
    if loaded.recipe.quantize.method == "none":
        return {}
    return {"device": host.device(), "calibration_dtype": calibration_policy(loaded),
            "backend_tools": host.tool_versions(get(loaded.backend).tools), "streaming": env.current().streaming}


SPEC = StepSpec(
    name="quantize",
    summary="quantize through a backend (llm-compressor → compressed-tensors, ModelOpt → unified HF checkpoint), verify it",
    depends=("resolve", "reference"),
    # forge's own backends' libraries, in every quantize key and so in every record's provenance (a plugin
    # backend's enter the key through _identity)
    tools=("llmcompressor", "compressed-tensors", "nvidia-modelopt", "torch", "transformers"),
    version=4,
    config=_config,
    data=_data,
    identity=_identity,
    run="forge.steps.quantize:run",
    volatile=REPORTS,
    gpu=True,
)


# ------------------------------------------------------------------ the step


def run(ctx: StepContext) -> dict:
    q = ctx.recipe.recipe.quantize
    src = ctx.inputs["resolve"]
    if q.method == "none":
        ctx.report("BF16 pass-through (method: none)")
        place_tree(src, ctx.out, list_files(src))  # bytes that do not change are linked, never copied
        return {"method": "none", "bytes": _size(ctx.out), "bf16_bytes": _size(src)}

    import torch
    from transformers import AutoTokenizer

    loaded = ctx.recipe
    name = loaded.backend
    backend = get(name)
    fmt = loaded.format
    torch.manual_seed(q.calibration.seed if q.calibration else 0)
    recipe_dtype = getattr(torch, loaded.recipe.model.dtype)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)  # saved into tokenizer_config: not HF_HUB_OFFLINE's
    streaming = env.current().streaming
    streams = streaming and getattr(backend, "streams", None) is not None and backend.streams(q, src, loaded.recipe.model.dtype)
    # BF16's greedy tokens, recorded by the reference step from the snapshot alone (once for every variant on it)
    reference = _reference(ctx) if loaded.verifies else None
    if streams:
        workers = host_fit.streaming_workers(src)
        t0 = time.monotonic()
        result = backend.quantize_files(src, ctx.out, q, report=ctx.report, workers=workers, dtype=recipe_dtype,
                                        log_dir=ctx.out.parent)
        seconds, export_s, dtype, windows = time.monotonic() - t0, 0.0, recipe_dtype, None
    else:
        result, seconds, export_s, dtype, windows = _in_memory(ctx, backend, src, recipe_dtype, tokenizer)
    tokenizer.save_pretrained(ctx.out)
    _copy_extras(src, ctx.out)
    ctx.report("validating the checkpoint against the recipe")
    try:
        checkpoint = backend.validate(ctx.out, q)
    except ValueError as e:
        raise StepError(f"{backend.title} wrote a checkpoint that does not match the recipe: {e}") from None
    measured: dict[str, float] = {}
    verify = _verify(backend, src, ctx.out, q, tokenizer, ctx.report, reference, recipe_dtype, measured,
                     streaming=streaming or "offloaded" in result.summary)   # offloaded: the model does not fit
    _merge_errors(result, measured)
    device = host.device()
    facts = {
        "method": q.method, "backend": name, "format": fmt, "scheme": _scheme(q), "seconds": round(seconds, 1),
        "export_seconds": round(export_s, 1), "calibration_dtype": str(dtype).removeprefix("torch."),
        "device": device, "calibration_windows": len(windows) if windows is not None else 0,
        "streamed": streams, "bytes": _size(ctx.out), "bf16_bytes": _size(src), "verify": verify,
        "checkpoint": checkpoint, "layers": len(result.layers), "backend_facts": result.summary,
        "tools": host.tool_versions(backend.tools),
        "calibration_sha256": _calibration_sha256(loaded),
    }
    facts["size_ratio"] = round(facts["bytes"] / facts["bf16_bytes"], 4)
    _write_reports(ctx.out, facts, result, backend.title)
    return facts


def _in_memory(ctx: StepContext, backend, src: Path, recipe_dtype, tokenizer):
    """Load the model, quantize it in place, export it: (result, quantize s, export s, load dtype, windows)."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded, q = ctx.recipe, ctx.recipe.recipe.quantize
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, calibration_dtype(calibration_policy(loaded), src, loaded.recipe.model.dtype))
    windows = _calibration_windows(ctx, tokenizer) if loaded.calibrates else None
    budget = None if cuda else host_fit.offload_budget(getattr(loaded, "host_needs", ()))
    offload = ctx.out.parent / "offload"    # the disk offload's files: links to the snapshot's shards, and the
    try:                                    # layers the calibration rewrote; gone with the step
        if budget is None:
            ctx.report(f"loading the model ({'cuda' if cuda else 'cpu'}, {str(dtype).removeprefix('torch.')})")
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="cuda" if cuda else None)
        else:
            model = _offloaded_model(ctx, src, dtype, budget, offload)
        t0 = time.monotonic()
        result = backend.quantize(model, q, windows, report=ctx.report, log_dir=ctx.out.parent)
        seconds = time.monotonic() - t0
        ctx.report(f"writing the {loaded.format} checkpoint ({backend.title})")
        t0 = time.monotonic()
        # offloaded: shards of at most the budget (at least 64 MB), each gathered in memory as it is written
        backend.export(model, ctx.out, dtype=recipe_dtype, loaded=loaded,
                       **({} if budget is None else {"max_shard_bytes": max(int(budget), 1 << 26)}))
        export_s = time.monotonic() - t0
        del model
        gc.collect()
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    if budget is not None:
        result.summary["offloaded"] = {"cpu_budget_bytes": int(budget)}
    return result, seconds, export_s, dtype, windows


def _offloaded_model(ctx: StepContext, src: Path, dtype, budget: float, folder: Path):
    """The model with at most ``budget`` bytes of weights on the CPU and the rest left in the safetensors files
    (compressed-tensors' disk offload), for a calibration that onloads one decoder layer at a time: the
    pre-flight found the whole model does not fit in memory and this does (forge.gpu.host_fit.offloaded_need)."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    # the calibration rewrites every quantized layer into the offload folder, in the calibration dtype: up to the
    # snapshot's size again (float32: twice), on the disk of the step cache, until the step ends
    stored = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    need = stored * (2 if str(dtype) == "torch.float32" else 1)
    folder.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(folder).free) < need:
        raise ResourceError(f"quantize: calibrating offloaded to disk writes up to {need / host_fit.GB:.1f} GB of "
                            f"rewritten layers under {folder.parent}; {free / host_fit.GB:.1f} GB free there",
                            hint="Free disk space there, or put the step cache on a larger disk (FORGE_CACHE_DIR).")
    ctx.report(f"loading the model offloaded to disk ({str(dtype).removeprefix('torch.')}, at most "
               f"{budget / host_fit.GB:.2f} GB of weights resident): the whole model does not fit in memory")
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="auto_offload",
                                                    max_memory={"cpu": int(budget)}, offload_folder=str(folder))


def _reference(ctx: StepContext) -> list[int]:
    return reference.Output.read(ctx.upstream["reference"]).tokens


def _merge_errors(result, measured: dict[str, float]) -> None:
    """Weight errors the verification measured on the written weights fill the layer rows the backend left empty."""
    for row in result.layers:
        if row.get("weight_rel_error") is None and row.get("layer") in measured:
            row["weight_rel_error"] = measured[row["layer"]]
    errors = [r["weight_rel_error"] for r in result.layers if r.get("weight_rel_error") is not None]
    if measured and errors and result.summary.get("mean_weight_rel_error") is None:
        result.summary["mean_weight_rel_error"] = round(sum(errors) / len(errors), 6)


def _verify(backend, src: Path, out: Path, q, tokenizer, report, reference, dtype, errors: dict, *,
            streaming: bool = True) -> dict | None:
    """BF16's greedy tokens against the predictions of the written checkpoint, teacher-forced over them: its
    dequantized weights in the BF16 model where the backend dequantizes it (FP8: exact, and 4x faster than the
    library's decompression on a CPU), one decoder layer at a time (``streaming``; else the whole model), after
    its tensors were checked against the model (streaming: from the files' headers; else loaded with
    transformers); else the checkpoint as transformers runs it."""
    if reference is None:
        return None   # a packed format transformers cannot run on this machine (no reference step in the graph)
    weights = backend.dequantized(out, q)
    if backend.loads_in_transformers and weights is None:
        report("verifying: load the written checkpoint with transformers, one forward pass over BF16's tokens")
        return verify_generation(reference, out, tokenizer, dtype)
    if weights is None:
        return None   # a backend that says it verifies, yet neither loads in transformers nor dequantizes
    what = f"the dequantized weights of the quantized checkpoint at {out}"
    if not streaming:
        if backend.loads_in_transformers:
            report("verifying: the written checkpoint loads with transformers")
            check_loads(out, dtype)
        report("verifying: its dequantized weights in the BF16 model (and their error), one forward pass over BF16's tokens")
        return verify_dequantized_in_memory(src, weights, tokenizer, dtype, reference=reference, errors=errors, what=what)
    if backend.loads_in_transformers:
        report("verifying: the written tensors against the model (names, shapes, from the files' headers)")
        check_tensors(out, dtype)
    report("verifying: its dequantized weights in the BF16 model (and their error), one forward pass over BF16's "
           "tokens, one decoder layer resident at a time")
    return verify_dequantized(src, weights, tokenizer, dtype, reference=reference, errors=errors, what=what,
                              device=host.device())


def _calibration_windows(ctx: StepContext, tokenizer) -> list[list[int]]:
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
    data = _data(loaded)
    return sha256_file(data["calibration"]) if data else None


def _scheme(q) -> str:
    return scheme(q.method, q.bits) + (f" g{q.group_size or 128}" if q.method in GROUPED else "")


def _write_reports(out: Path, facts: dict, result, title: str) -> None:
    (out / REPORT_JSON).write_text(dumps({"summary": facts, "layers": result.layers, **result.sections},
                                              indent=2) + "\n")
    v = facts["verify"]
    lines = [f"# quantize report: {facts['scheme']} ({title} → {facts['format']})", "",
             f"size {facts['bytes'] / 1e6:.1f} MB vs BF16 {facts['bf16_bytes'] / 1e6:.1f} MB ({facts['size_ratio']:.2f}×) · "
             f"{facts['seconds']} s quantize + {facts['export_seconds']} s export on {facts['device']} "
             f"({facts['calibration_dtype']}) · {facts['layers']} quantized layers"
             + (f" · next-token agreement with BF16's greedy tokens {v['agreement']:.0%} (first {v['matching_prefix']} greedy tokens identical)"
                if v else " · not verified by generation here"), ""]
    if result.layers:
        cols = list(result.layers[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in result.layers]
    for section, rows in result.sections.items():
        if rows:
            cols = list(rows[0])
            lines += ["", f"**{section}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    (out / REPORT_MD).write_text("\n".join(lines) + "\n")
    (out / QUANT_MANIFEST).write_text(json.dumps({k: facts[k] for k in MANIFEST_KEYS}, indent=2) + "\n")


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
        return self.dir / TRTLLM_CKPT if (self.dir / TRTLLM_CKPT).exists() else None

    @property
    def modelopt_checkpoint(self) -> bool:
        """A ModelOpt unified checkpoint (hf_quant_config.json): transformers' hf loader cannot read it."""
        return (self.dir / "hf_quant_config.json").exists()

    def model_entries(self) -> list[Path]:
        """The top-level files and dirs of the servable checkpoint: no reports, no TensorRT-LLM checkpoint."""
        skip = {p.name for p in self.reports} | ({self.trtllm_checkpoint.name} if self.trtllm_checkpoint else set())
        return [p for p in sorted(self.dir.iterdir()) if p.name not in skip]
