"""reference: the BF16 model's greedy tokens for the verification prompt, recorded once per snapshot, dtype and device.

The quantize step verifies what it wrote against these tokens (forge.steps.quantize): one forward pass of the
quantized weights, teacher-forced over them. Recording them here, from the snapshot alone, means no quantize run
generates with the source model before quantizing it (16 cached forward steps, 9 s of a 3B model on a 2-core CPU),
and every variant built on the same snapshot shares one recording: the key holds the snapshot, the dtype, the
prompt and the device, nothing of the quantize section. Not part of a graph whose checkpoint cannot be run here
(ModelOpt's packed 4-bit formats: forge.backends.Backend.verifies).
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from forge.core import host
from forge.backends import verifies
from forge.steps import StepContext, StepSpec

VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 16
REFERENCE_JSON = "reference.json"

SPEC = StepSpec(
    name="reference",
    summary="record the BF16 model's greedy tokens for the verification (shared by every recipe on the snapshot)",
    depends=("resolve",),
    tools=("torch", "transformers"),
    version=1,
    config=lambda loaded: {"dtype": loaded.recipe.model.dtype, "prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS},
    identity=lambda loaded, store=None: {"device": host.device()},
    enabled=lambda loaded: verifies(loaded.recipe.quantize, loaded.recipe.target.engine),
    run="forge.steps.reference:run",
    gpu=True,
)


def run(ctx: StepContext) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dtype = ctx.inputs["resolve"], ctx.recipe.recipe.model.dtype
    cuda = torch.cuda.is_available()
    ctx.report(f"loading the model ({'cuda' if cuda else 'cpu'}, {dtype})")
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), device_map="cuda" if cuda else None)
    ctx.report(f"greedy decoding {VERIFY_TOKENS} tokens after {VERIFY_PROMPT!r}")
    tokens = greedy_tokens(model, tokenizer)
    del model
    gc.collect()
    facts = {"prompt": VERIFY_PROMPT, "tokens": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True),
             "dtype": dtype, "device": "cuda" if cuda else "cpu"}
    (ctx.out / REFERENCE_JSON).write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def prompt_ids(model, tokenizer):
    return tokenizer(VERIFY_PROMPT, return_tensors="pt")["input_ids"].to(model.device)


def greedy_tokens(model, tokenizer) -> list[int]:
    """The model's greedy (argmax, no logits processors, no stop at EOS) continuation of VERIFY_PROMPT:
    VERIFY_TOKENS tokens, one cached forward step each."""
    import torch

    ids, past, tokens = prompt_ids(model, tokenizer), None, []
    with torch.no_grad():
        for _ in range(VERIFY_TOKENS):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ids = out.logits[:, -1:].argmax(-1)
            tokens.append(int(ids))
    return tokens


@dataclass(frozen=True)
class Output:
    """The recorded reference, as the quantize step reads it."""
    tokens: list[int]
    text: str

    @classmethod
    def read(cls, entry) -> "Output":
        facts = json.loads((Path(entry.out) / REFERENCE_JSON).read_text())
        return cls(list(facts["tokens"]), facts["text"])
