"""CPU serving with `transformers serve` in forge's own Debian base: BF16 and compressed-tensors
checkpoints (decompressed to BF16 at load). The one engine whose image is smoke-tested here."""
from __future__ import annotations

from forge.engines import GpuEngine, ServeAt


class Cpu(GpuEngine):
    name = "cpu"
    formats = ("bf16", "compressed-tensors")
    kernels: dict = {}
    cpu = True
    python = "/opt/venv/bin/python3"
    smoke_test = True

    def serve_command(self, loaded, fmt: str, at: ServeAt) -> tuple[str, ...]:
        return ("/opt/venv/bin/transformers", "serve", at.model_dir, "--host", "0.0.0.0", "--port", str(at.port),
                "--device", "cpu", "--dtype", "auto")


ENGINE = Cpu()
