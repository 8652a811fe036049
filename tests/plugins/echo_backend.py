"""A throwaway quantization backend, registered only by tests (FORGE_PLUGINS=backend:echo=echo_backend:BACKEND).

It offers gptq and rounds every targeted Linear weight to a symmetric grid of 2^(bits-1)-1 levels per group
of ``group_size`` input features (round-to-nearest, in pure torch, no calibration) and writes a plain
(fake-quantized) BF16 checkpoint that transformers loads. Everything else (tokenizer, windows, verification,
reports, manifest) is the quantize step's skeleton, as for forge's own backends.
"""
from __future__ import annotations

import json
from pathlib import Path

from forge.backends import Quantized
from forge.model.shape import ignored


class Echo:
    name = "echo"
    title = "echo (test backend)"
    methods = ("none", "gptq")
    tools = ("torch",)
    loads_in_transformers = True

    def format(self, q) -> str:
        return "bf16"

    def needs_calibration(self, q) -> bool:
        return False

    def verifies(self, q) -> bool:
        return True   # a plain BF16 checkpoint: the quantize step loads it with transformers

    def preflight(self, loaded, shape) -> list[str]:
        return []

    def quantize(self, model, q, windows, *, report, log_dir: Path) -> Quantized:
        import torch

        levels, group = 2 ** ((q.bits or 4) - 1) - 1, q.group_size or 128
        rows = []
        with torch.no_grad():
            for name, m in model.named_modules():
                if not isinstance(m, torch.nn.Linear) or ignored(name, q.ignore):
                    continue
                w = m.weight
                g = w.reshape(w.shape[0], -1, group)
                scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / levels
                rounded = (torch.round(g / scale) * scale).reshape(w.shape)
                err = (torch.linalg.norm(rounded - w) / torch.linalg.norm(w)).item()
                w.copy_(rounded)
                rows.append({"layer": name, "levels": 2 * levels + 1, "group_size": group,
                             "weight_rel_error": round(err, 6)})
                report(f"rounding {name}", completed=len(rows))
        return Quantized(rows, summary={"grid_levels": 2 * levels + 1})

    def export(self, model, out: Path, *, dtype, loaded) -> None:
        model.to(dtype).save_pretrained(out)

    def validate(self, out: Path, q) -> dict:
        cfg = json.loads((out / "config.json").read_text())
        if "quantization_config" in cfg:
            raise ValueError("a fake-quantized checkpoint has no quantization_config")
        return {"dtype": cfg.get("dtype")}

    def dequantized(self, out: Path, q) -> dict | None:
        return None


BACKEND = Echo()
