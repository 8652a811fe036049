"""reference: the BF16 model's greedy tokens for the verification prompt, recorded once per snapshot, dtype and device.

The quantize step verifies what it wrote against these tokens (forge.steps.quantize): one forward pass of the
quantized weights, teacher-forced over them. Recording them here, from the snapshot alone, means no quantize run
generates with the source model before quantizing it (16 cached forward steps, 9 s of a 3B model on a 2-core CPU),
and every variant built on the same snapshot shares one recording: the key holds the snapshot, the dtype, the
prompt and the device, nothing of the quantize section. Not part of a graph whose checkpoint cannot be run here
(ModelOpt's packed 4-bit formats: forge.backends.Backend.verifies).

The model is run one decoder layer at a time (forge.model.layerwise), its weights read from the snapshot's
safetensors as each block runs: the step never holds the model, whatever its size (16 cached forward steps read
the weights 16 times, from the page cache where the snapshot fits it).
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from forge.backends.tensors import TensorReader
from forge.core import host, options
from forge.model import layerwise
from forge.steps import StepContext, StepSpec

VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 16
REFERENCE_JSON = "reference.json"

SPEC = StepSpec(
    name="reference",
    summary="record the BF16 model's greedy tokens for the verification (shared by every recipe on the snapshot)",
    depends=("resolve",),
    tools=("torch", "transformers"),
    version=2,
    config=lambda loaded: {"dtype": loaded.recipe.model.dtype, "prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS},
    identity=lambda loaded: {"device": host.device()},
    enabled=lambda resolved: resolved.verifies,
    run="forge.steps.reference:run",
    gpu=True,
)


def run(ctx: StepContext) -> dict:
    import torch
    from transformers import AutoTokenizer

    src, dtype = ctx.inputs["resolve"], ctx.recipe.recipe.model.dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    streaming = options.current().streaming
    ctx.report(f"greedy decoding {VERIFY_TOKENS} tokens after {VERIFY_PROMPT!r} ({device}, {dtype}, "
               + ("one decoder layer resident at a time)" if streaming else "the whole model)"))
    if streaming:
        tokens = streamed_greedy_tokens(src, tokenizer, getattr(torch, dtype), device)
    else:   # FORGE_STREAMING=0: the whole model, as before
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), device_map="cuda" if device == "cuda" else None)
        tokens = greedy_tokens(model, tokenizer)
        del model
        gc.collect()
    facts = {"prompt": VERIFY_PROMPT, "tokens": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True),
             "dtype": dtype, "device": device}
    (ctx.out / REFERENCE_JSON).write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def streamed_greedy_tokens(src: Path, tokenizer, dtype, device: str = "cpu") -> list[int]:
    """``greedy_tokens`` of the model in ``src``, run one decoder layer at a time from its safetensors files."""
    model = layerwise.empty_model(src, dtype)
    with layerwise.streamed(model, TensorReader(src), dtype=dtype, device=device, what=f"the model at {src}") as m:
        tokens = greedy_tokens(m, tokenizer, device=device)
    del model
    gc.collect()
    return tokens


def prompt_ids(tokenizer, device):
    return tokenizer(VERIFY_PROMPT, return_tensors="pt")["input_ids"].to(device)


def greedy_tokens(model, tokenizer, device=None) -> list[int]:
    """The model's greedy (argmax, no logits processors, no stop at EOS) continuation of VERIFY_PROMPT:
    VERIFY_TOKENS tokens, one cached forward step each (``device``: where its inputs go, the model's own by
    default; a streamed model's parameters are on the meta device)."""
    import torch

    ids, past, tokens = prompt_ids(tokenizer, device or model.device), None, []
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
