"""Benchmark: forge at real model sizes, next to the raw library and hashlib, measured in one run.

Each measurement runs in its own child process, so its peak RSS (ru_maxrss from wait4) is its own:
  hashlib      SHA-256 over the checkpoint's files (Python hashlib, 16 MiB reads): the I/O baseline
  raw_fp8      llm-compressor alone: load bf16 (for GPTQ: the dtype forge loads in here), oneshot(QuantizationModifier FP8_DYNAMIC, ignore lm_head),
               save_pretrained(save_compressed=True)
  forge_fp8    `forge build` of a recipe {model.source: DIR, quantize: {method: fp8}} in a fresh cache
               (resolve, reference, quantize; load-and-verify included); per-step seconds and bytes written from
               the manifests. The build process's peak RSS is the quantize step's (resolve links files and reads
               config.json; reference holds the BF16 model alone, and its greedy tokens are recorded once per
               snapshot for every variant: its time is reported beside the quantize step's, and with it).
               Then, in a child process of its own (wall time, peak RSS), the quantized checkpoint is packaged
               and published with forge's own code: its weights layer appended to an image in an OCI layout
               inside the step cache (forge/image/weights_layer.py, as the package step does) and that image's blobs
               put into a LocalRegistry's blob store (as publish does).
  disk         the whole build's disk growth per GB of checkpoint, each copy named: bytes of inodes new to
               the step cache (per step), the image store and the registry, hard links counted once, files
               linked from the source model not counted. Not in it: the base image (shared by every build,
               and not buildable on a machine without it) and the buildah build of the Containerfile.
  raw_gptq / forge_gptq   the same for GPTQ W4 group 64 on the demo's calibration settings (--method gptq; slow)
  --streaming  forge's FP8 build streamed (FORGE_STREAMING=1: model_free_ptq shard by shard, reference and verification
               one decoder layer at a time) and in memory (FORGE_STREAMING=0: the path before streaming; a model
               larger than the machine is refused there, which is recorded), one after the other in this run, with their verification (matching prefix, agreement), and llm-compressor's
               model_free_ptq alone (raw_model_free_fp8, as many shards at once as forge runs): the ratios
               streamed / in memory and streamed / model_free_ptq (quantize-step time, peak RSS)
Prints JSON with every figure, the ratios forge/raw (the quantize step's and the whole process's time, peak
RSS) and the load average before and after each measurement (the machine may be shared; --concurrent runs
the raw baseline and forge at the same time, so that both see the same contention).

    .venv/bin/python bench/scale.py [--model DIR | --shape llama-3.2-3b] [--method fp8 --method gptq]
                                    [--streaming] [--concurrent] [--keep] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"
GPTQ = {"method": "gptq", "bits": 4, "group_size": 64,
        "calibration": {"data": str(CALIB), "samples": 20, "max_seq_len": 512}}


def measure(argv: list[str], env: dict | None = None) -> dict:
    """Run a child process; its wall time and its own peak RSS."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode:
        sys.stderr.write(out.decode(errors="replace")[-4000:])
        raise SystemExit(f"{argv[:4]} failed with exit {proc.returncode}")
    return {"seconds": round(seconds, 1), "output": out.decode(errors="replace")}


def child_rss(argv: list[str], env: dict | None = None) -> dict:
    """Like measure, with the child's peak RSS: the child reports it itself through the wrapper below."""
    wrapped = [sys.executable, __file__, "--_rss", "--", *argv]
    result = measure(wrapped, env)
    last = [line for line in result["output"].splitlines() if line.startswith("FORGE_BENCH_RSS ")]
    result["peak_rss_gb"] = round(int(last[-1].split()[1]) * 1024 / 1e9, 2) if last else None
    result["output"] = result["output"][-2000:]
    return result


def _rss_wrapper(argv: list[str]) -> None:
    """Run argv and print its own peak RSS (KiB, from wait4), so the parent never mixes children."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    print(f"FORGE_BENCH_RSS {usage.ru_maxrss} {time.monotonic() - t0:.1f}", flush=True)
    sys.exit(os.waitstatus_to_exitcode(status))


def hashlib_rate(model: Path) -> dict:
    files = sorted(p for p in model.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    t0 = time.monotonic()
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    seconds = time.monotonic() - t0
    return {"bytes": size, "seconds": round(seconds, 2), "mb_s": round(size / seconds / 1e6, 1)}


RAW = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
src, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, sys.argv[5]))
tok = AutoTokenizer.from_pretrained(src)
if method == "fp8":
    from llmcompressor.modifiers.quantization import QuantizationModifier
    oneshot(model=model, recipe=[QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=["lm_head"])])
else:
    import json
    from datasets import Dataset
    from llmcompressor.modifiers.quantization import GPTQModifier
    texts = [json.loads(l)["text"] for l in open(sys.argv[4])]
    ids = tok("\\n\\n".join(texts))["input_ids"]
    chunks = [ids[i * 512:(i + 1) * 512] for i in range(20)]
    ds = Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * len(c) for c in chunks]})
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    oneshot(model=model, dataset=ds, max_seq_length=512, num_calibration_samples=len(ds),
            recipe=[GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": w}}, ignore=["lm_head"])])
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""
RAW_MODEL_FREE = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme="FP8_DYNAMIC", ignore=["lm_head", "model.embed_tokens"],
               max_workers=int(sys.argv[3]), device="cpu")
"""


def forge_dtype(model: Path, method: str) -> str:
    """The dtype forge's quantize step loads this model in on this machine (forge.steps.quantize's CPU policy):
    the raw library is run in it too, so both quantize the same numbers (GPTQ on a CPU without native bf16: float32
    when it fits half of memory, 4.5x faster than emulated bf16)."""
    sys.path.insert(0, str(REPO))
    from forge.core import host
    from forge.steps.quantize import calibration_dtype

    if method == "fp8" or host.device() == "cuda" or host.cpu_has_native_bf16():
        return "bfloat16"
    if forced := os.environ.get("FORGE_CPU_CALIBRATION_DTYPE"):
        return forced
    return calibration_dtype(f"float32-if-fits:{host.memory_bytes() >> 30}GiB", model, "bfloat16")


def raw(model: Path, work: Path, method: str) -> dict:
    out = work / f"raw-{method}"
    dtype = forge_dtype(model, method)
    result = child_rss([sys.executable, "-c", RAW, str(model), str(out), method, str(CALIB), dtype],
                       {"TQDM_DISABLE": "1", "LLM_COMPRESSOR_LOG_LEVEL": ""})
    result["dtype"] = dtype
    result["bytes_written"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return result


def raw_model_free(model: Path, work: Path) -> dict:
    """llm-compressor's model_free_ptq alone (FP8 dynamic), on as many shards at once as forge's streamed step runs."""
    sys.path.insert(0, str(REPO))
    from forge.gpu.host_fit import streaming_workers

    out, workers = work / "raw-model-free", streaming_workers(model)
    result = child_rss([sys.executable, "-c", RAW_MODEL_FREE, str(model), str(out), str(workers)],
                       {"TQDM_DISABLE": "1", "LLM_COMPRESSOR_LOG_LEVEL": ""})
    result["workers"] = workers
    result["bytes_written"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return result


def forge(model: Path, work: Path, name: str, quantize: dict, env: dict | None = None) -> dict:
    cache = work / f"cache-{name}"
    recipe = work / f"{name}.yaml"
    recipe.write_text(json.dumps({"apiVersion": "forge/v1", "name": f"bench-{name}", "model": {"source": str(model)},
                                  "target": {"gpu": "CPU", "engine": "cpu"}, "quantize": quantize}))
    result = child_rss([sys.executable, "-m", "forge", "build", str(recipe), "--cache-dir", str(cache)],
                       {"FORGE_REGISTRY_DIR": str(work / f"registry-{name}"), **(env or {})})
    result["env"] = env or {}
    steps, outs = {}, {}
    for manifest in sorted(cache.glob("steps/*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("step") in steps or "output" not in m:
            continue
        steps[m["step"]] = {"seconds": m.get("seconds"),
                            "bytes": sum(f["size"] for f in m["output"]["files"].values())}
        outs[m["step"]] = manifest.parent
        if m["step"] == "quantize":
            facts = m.get("facts", {})
            verify = facts.get("verify") or {}
            result["quantize"] = {"streamed": facts.get("streamed"), "seconds": facts.get("seconds"),
                                  "export_seconds": facts.get("export_seconds"),
                                  "workers": (facts.get("backend_facts") or {}).get("workers"),
                                  "verify": {k: verify.get(k) for k in ("matching_prefix", "agreement", "how",
                                                                         "resident", "quantized_text")}}
    result["steps"] = steps
    result["quantize_peak_rss_gb"] = result["peak_rss_gb"]
    layout, registry = cache / "bench-image", work / f"registry-{name}"
    result["package_publish"] = child_rss([sys.executable, __file__, "--_publish", str(outs["quantize"] / "out"),
                                           str(layout), str(registry)])
    result["package_publish"].pop("output", None)
    result["disk"] = disk_growth(model, {**{f"step cache: {s}": d for s, d in outs.items()},
                                         "image store (OCI layout, weights layer)": layout,
                                         "registry blob store": registry})
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(registry, ignore_errors=True)
    return result


def _publish(checkpoint: Path, layout: Path, registry: Path) -> None:
    """Package and publish a checkpoint with forge's code: the weights layer appended to an image in an OCI layout,
    then the image's blobs put into a LocalRegistry's blob store (linked where they share a filesystem)."""
    sys.path.insert(0, str(REPO))
    from package import empty_image

    from forge.oci.layout import Layout
    from forge.registry.local import LocalRegistry
    from forge.image.weights_layer import append_weights_layer

    empty_image(layout)
    layer = append_weights_layer(layout, "bench", checkpoint, "/opt/forge/model", uid=10001)
    src, reg = Layout(layout), LocalRegistry(registry)
    for digest, _ in src.image_blobs(layer["manifest_digest"]):
        reg.blobs.put_file(src.blob_path(digest), digest)


def disk_growth(model: Path, copies: dict[str, Path]) -> dict:
    """Bytes on disk each named copy adds, in order: an inode already counted (the source model's, or an
    earlier copy's) adds nothing, as `du` counts hard links once. Per GB of the source checkpoint."""
    seen = {(st.st_dev, st.st_ino) for st in (p.lstat() for p in model.rglob("*") if p.is_file())}
    source = _disk_usage(model, set())
    added = {name: _disk_usage(path, seen) for name, path in copies.items()}
    total = sum(added.values())
    return {"source_bytes": source, "added_bytes": added, "total_added_bytes": total,
            "gb_per_checkpoint_gb": round(total / source, 3)}


def _disk_usage(path: Path, seen: set) -> int:
    """Bytes on disk of the files under path whose inodes are not in seen (which it extends)."""
    total = 0
    for p in path.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def compare_streaming(report: dict, model: Path, work: Path, *, skip_raw: bool, save) -> None:
    """forge's FP8 build streamed and in memory, one after the other, and model_free_ptq alone; the ratios."""
    for label, streaming in (("forge_fp8_streamed", "1"), ("forge_fp8_in_memory", "0")):
        try:
            report[label] = forge(model, work, label.removeprefix("forge_"), {"method": "fp8"},
                                  {"FORGE_STREAMING": streaming})
        except SystemExit as e:
            if streaming == "1":
                raise
            # in memory, a model larger than the machine is refused by the pre-flight (exit 5): recorded, no ratio
            report[label] = {"failed": str(e)}
        report[label].pop("output", None)
        report["load_avg_1_5_15"][f"after {label}"] = _load()
        save()
    if not skip_raw:
        report["raw_model_free_fp8"] = raw_model_free(model, work)
        report["raw_model_free_fp8"].pop("output", None)
        report["load_avg_1_5_15"]["after raw_model_free_fp8"] = _load()
    s, m = report["forge_fp8_streamed"], report["forge_fp8_in_memory"]
    if "failed" not in m:
        report["ratio_streamed_to_in_memory"] = {
            "quantize_step_time": round(s["steps"]["quantize"]["seconds"] / m["steps"]["quantize"]["seconds"], 3),
            "reference_step_time": round(s["steps"]["reference"]["seconds"] / m["steps"]["reference"]["seconds"], 3),
            "whole_process_time": round(s["seconds"] / m["seconds"], 3),
            "peak_rss": round(s["peak_rss_gb"] / m["peak_rss_gb"], 3),
            "same_verification": {k: s["quantize"]["verify"][k] == m["quantize"]["verify"][k]
                                  for k in ("matching_prefix", "agreement", "quantized_text")}}
    if not skip_raw:
        r = report["raw_model_free_fp8"]
        report["ratio_streamed_to_model_free"] = {
            "quantize_step_time": round(s["steps"]["quantize"]["seconds"] / r["seconds"], 3),
            "quantize_step_without_verification_time": round(s["quantize"]["seconds"] / r["seconds"], 3),
            "peak_rss": round(s["peak_rss_gb"] / r["peak_rss_gb"], 3)}
    save()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_rss":
        _rss_wrapper(sys.argv[3:])
    if len(sys.argv) == 5 and sys.argv[1] == "--_publish":
        _publish(*map(Path, sys.argv[2:]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="an existing checkpoint directory (default: generate one)")
    ap.add_argument("--shape", default="llama-3.2-3b", help="shape to generate (scripts/make_random_checkpoint.py)")
    ap.add_argument("--method", action="append", choices=("fp8", "gptq"),
                    help="methods to measure (repeatable; default fp8). gptq: W4 g64, 20 x 512 calibration tokens, slow")
    ap.add_argument("--gptq", action="store_true", help="same as --method fp8 --method gptq")
    ap.add_argument("--skip-raw", action="store_true", help="skip the raw-library baselines")
    ap.add_argument("--streaming", action="store_true",
                    help="FP8 only: forge streamed vs in memory, and model_free_ptq alone (see the docstring)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the raw baseline and forge at the same time (a shared machine: same contention for both)")
    ap.add_argument("--out", type=Path, help="also write the JSON here (e.g. bench/results/scale-3b.json)")
    args = ap.parse_args()
    methods = args.method or (["fp8", "gptq"] if args.gptq else ["fp8"])
    work = Path(tempfile.mkdtemp(prefix="forge-bench-scale-", dir=os.environ.get("TMPDIR")))
    model = args.model
    report: dict = {"benchmark": "scale", "cpus": os.cpu_count(), "concurrent": args.concurrent, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "load_avg_1_5_15": {"start": _load()}}
    if model is None:
        model = work / "model"
        gen = measure([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), str(model),
                       "--shape", args.shape])
        report["generate_s"] = gen["seconds"]
    report["model"] = {"dir": str(model), "shape": args.shape if args.model is None else None,
                       "config": {k: v for k, v in json.loads((model / "config.json").read_text()).items()
                                  if k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size")},
                       "shards": len(list(model.glob("*.safetensors"))),
                       "largest_shard_bytes": max((p.stat().st_size for p in model.glob("*.safetensors")), default=0)}
    report["hashlib"] = hashlib_rate(model)

    def save() -> None:
        """Write what is measured so far (a long GPTQ pair keeps its raw figures if forge's run is stopped)."""
        if args.out:
            args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    if args.streaming:
        compare_streaming(report, model, work, skip_raw=args.skip_raw, save=save)
        methods = []
    for name in methods:
        q = {"fp8": {"method": "fp8"}, "gptq": GPTQ}[name]
        if args.concurrent and not args.skip_raw:
            # both at once: on a shared machine they then see the same contention (each child's own peak RSS)
            with ThreadPoolExecutor(2) as pool:
                raw_run, forge_run = pool.submit(raw, model, work, name), pool.submit(forge, model, work, name, q)
                report[f"raw_{name}"], report[f"forge_{name}"] = raw_run.result(), forge_run.result()
        elif not args.skip_raw:
            report[f"raw_{name}"] = raw(model, work, name)
            report["load_avg_1_5_15"][f"after raw_{name}"] = _load()
            report[f"raw_{name}"].pop("output", None)
            save()
        if f"forge_{name}" not in report:
            report[f"forge_{name}"] = forge(model, work, name, q)
        report["load_avg_1_5_15"][f"after forge_{name}"] = _load()
        if not args.skip_raw:
            r, f = report[f"raw_{name}"], report[f"forge_{name}"]
            reference_s = f["steps"].get("reference", {}).get("seconds") or 0.0   # once per snapshot, all variants
            report[f"ratio_{name}"] = {"quantize_step_time": round(f["steps"]["quantize"]["seconds"] / r["seconds"], 3),
                                       "quantize_and_reference_time": round(
                                           (f["steps"]["quantize"]["seconds"] + reference_s) / r["seconds"], 3),
                                       "whole_process_time": round(f["seconds"] / r["seconds"], 3),
                                       "peak_rss": round(f["peak_rss_gb"] / r["peak_rss_gb"], 3)}
        save()
    for value in report.values():
        if isinstance(value, dict):
            value.pop("output", None)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
