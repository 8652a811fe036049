"""The quantize step's verification refuses a checkpoint that cannot serve (forge/steps/verify.py), on every backend
path: the written checkpoint as transformers runs it (``verify_generation``) and its dequantized weights in the BF16
model (``verify_dequantized``, the FP8 path). Broken checkpoints are made here from the tiny model: NaN weights
(non-finite logits), all weights zero (it predicts only the <unk> special token), the output head negated (it
predicts BF16's least likely token: no agreement)."""
from __future__ import annotations

import shutil

import pytest

from forge.core.errors import StepError
from forge.steps.verify import MIN_AGREEING_TOKENS, MIN_CONTENT_TOKENS, verify_dequantized, verify_generation

BROKEN = [
    ("nan", r"compute non-finite logits \(NaN or inf: \d+ of \d+, over 16 positions\)"),
    ("zero", rf"predicts nothing but special tokens .*: 0 of 16 predictions are text \(at least {MIN_CONTENT_TOKENS} "),
    ("negated", rf"agrees with BF16's greedy tokens at 0 of 16 positions \(at least {MIN_AGREEING_TOKENS} needed\)"),
]


@pytest.fixture(scope="module")
def bf16(tiny_llama):
    """(tokenizer, BF16's 16 greedy tokens, the BF16 weights)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.steps.reference import greedy_tokens

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    return tok, greedy_tokens(model, tok), load_file(tiny_llama / "model.safetensors")


def _broken(weights: dict, how: str) -> dict:
    import torch

    if how == "nan":
        return {k: torch.full_like(v, float("nan")) if k.endswith("mlp.down_proj.weight") else v for k, v in weights.items()}
    if how == "zero":
        return {k: torch.zeros_like(v) for k, v in weights.items()}
    return {k: -v if k == "lm_head.weight" else v for k, v in weights.items()}   # negated


@pytest.mark.parametrize("how,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_dequantized_weights_path_refuses_a_broken_checkpoint(tiny_llama, bf16, how, message):
    import torch

    tok, reference, weights = bf16
    with pytest.raises(StepError, match=message) as e:
        verify_dequantized(tiny_llama, _broken(weights, how), tok, torch.bfloat16, reference=reference,
                           what="the dequantized weights of the test checkpoint")
    assert "the dequantized weights of the test checkpoint" in e.value.message


@pytest.mark.parametrize("how,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_transformers_path_refuses_a_broken_checkpoint(tmp_path, tiny_llama, bf16, how, message):
    import torch
    from safetensors.torch import save_file

    tok, reference, weights = bf16
    checkpoint = tmp_path / "broken"
    shutil.copytree(tiny_llama, checkpoint)
    save_file(_broken(weights, how), checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StepError, match=message) as e:
        verify_generation(reference, checkpoint, tok, torch.bfloat16)
    assert f"the quantized checkpoint at {checkpoint}" in e.value.message


def test_a_sound_checkpoint_passes_both_paths(tiny_llama, bf16):
    import torch

    tok, reference, weights = bf16
    assert verify_generation(reference, tiny_llama, tok, torch.bfloat16)["agreement"] == 1.0
    result = verify_dequantized(tiny_llama, weights, tok, torch.bfloat16, reference=reference)
    assert result["agreement"] == 1.0 and result["matching_prefix"] == 16 and result["how"] == "dequantized weights"
