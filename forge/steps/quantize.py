"""quantize: resolved BF16 snapshot -> quantized checkpoint (compressed-tensors for vLLM/TGI).

This build implements ``method: none`` (BF16 pass-through). The llm-compressor methods (awq, gptq,
fp8, int8) are refused at validate time until their backend lands, so no recipe silently ships an
unquantized model under a quantized name.
"""
from __future__ import annotations

import os
import shutil

from forge.digests import list_files
from forge.steps import StepContext, StepSpec

AVAILABLE_METHODS = ("none",)


def _config(loaded) -> dict:
    return loaded.recipe.quantize.model_dump(mode="json")


SPEC = StepSpec(
    name="quantize",
    summary="quantize the snapshot (none: BF16 pass-through)",
    depends=("resolve",),
    tools=(),
    version=1,
    config=_config,
    run="forge.steps.quantize:run",
)


def run(ctx: StepContext) -> dict:
    method = ctx.recipe.recipe.quantize.method
    src = ctx.inputs["resolve"]
    ctx.report("BF16 pass-through (method: none)")
    for rel in list_files(src):
        dst = ctx.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst)  # both sides are immutable store entries: sharing inodes is safe
        except OSError:
            shutil.copyfile(src / rel, dst)
    return {"method": method}
