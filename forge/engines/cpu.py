"""CPU serving with `transformers serve` in forge's own Debian base: BF16 and compressed-tensors
checkpoints (decompressed to BF16 at load). The one engine whose image is smoke-tested here.

`transformers serve` answers GET /v1/models by scanning the HF hub cache (HF_HUB_CACHE), and a model id it
lists is one it loads (offline) from that cache. The image carries a cache whose one entry is the model,
models--<id>/snapshots/<rev> being a relative link to the model directory: the weights stay at their fixed
path, and the id clients list is the id they chat with.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from forge.engines.base import EvalApi, GpuEngine, ServeAt, Serving

HUB_DIR = "/opt/forge/hub"
HUB_REVISION = "0" * 40
MODEL_DIR = "/opt/forge/model"
RUNTIME_HUB_DIR = "/tmp/forge/hub"   # container.weights: image: the entry is made at start (/tmp is writable in a pod)


class Cpu(GpuEngine):
    name = "cpu"
    formats = ("bf16", "compressed-tensors")
    kernels: dict = {}
    cpu = True
    python = "/opt/venv/bin/python3"
    smoke_test = True
    # transformers serve's /v1/completions takes a raw prompt and generates; it accepts echo and logprobs but ignores
    # them (transformers/cli/serving/completion.py: UNUSED_LEGACY_COMPLETION_FIELDS), so no prompt logprobs
    eval_api = EvalApi("local-completions", "/v1/completions", frozenset({"generate_until"}), numerics="transformers",
                       refuses="transformers serve returns no prompt logprobs (its /v1/completions ignores echo and "
                               "logprobs), so loglikelihood tasks (multiple choice, perplexity) cannot be scored "
                               "through its image")

    def serve_command(self, recipe, fmt: str, at: ServeAt) -> tuple[str, ...]:
        return ("/opt/venv/bin/transformers", "serve", at.served_name, "--host", "0.0.0.0", "--port", str(at.port),
                "--device", "cpu", "--dtype", "auto")

    def served_name(self, name: str) -> str:
        """The recipe name made a valid HF repo id (no '--' or '..', at most 96 characters, ending in a letter
        or digit): transformers serve resolves the id through the hub cache."""
        return re.sub(r"([-.])[-.]+", r"\1", name)[:96].rstrip("-.").removesuffix(".git") or "model"

    def image_env(self) -> tuple[tuple[str, str], ...]:
        return (("HF_HUB_CACHE", HUB_DIR),)

    def context_dirs(self, context: Path, served: str) -> tuple[tuple[str, str], ...]:
        write_hub_entry(context, served)
        return (("hub", HUB_DIR),)

    def runtime_files(self, served: str, model_dir: str) -> tuple[dict, dict, dict]:
        """container.weights: image: the same hub-cache entry, laid down at start in a writable directory (the
        served id is the model's, and the serving image is shared by every model on its base)."""
        repo = f"{RUNTIME_HUB_DIR}/models--{served}"
        return ({"HF_HUB_CACHE": RUNTIME_HUB_DIR}, {f"{repo}/refs/main": HUB_REVISION},
                {f"{repo}/snapshots/{HUB_REVISION}": model_dir})

    def serving(self, version: str | None) -> Serving:
        # transformers serve: /health, no Prometheus metrics, so no queue to scale on
        return Serving(self.name, version or "?", self.health_route, None, None, None, read_only_root=True,
                       writable_dirs=("/tmp",), env=(), init_seconds=90)   # measured: 66 s on 2 busy cores


def write_hub_entry(context: Path, model_id: str) -> None:
    """The cache entry naming the model, in the build context's hub/ (copied to HUB_DIR)."""
    repo = context / "hub" / f"models--{model_id}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_REVISION)    # no newline: the scanner reads the hash verbatim
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / HUB_REVISION).symlink_to(os.path.relpath(MODEL_DIR, f"{HUB_DIR}/models--{model_id}/snapshots"))


ENGINE = Cpu()
