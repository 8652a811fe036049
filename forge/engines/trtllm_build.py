"""TensorRT-LLM: the trtllm-build and trtllm-serve command lines, where an engine may be built, and
what an engine directory says about itself.

A serialized engine is bound to the GPU model and the TensorRT-LLM version that built it. Its
config.json records both (``version``; ``build_config.auto_parallel_config.cluster_key``, e.g.
"H100-SXM"), plus ``pretrained_config.quantization`` and ``build_config`` limits and plugins.
``check_engine`` compares all of that with the recipe and the base image and names both sides of
every mismatch; the compile step runs it on what it built and the package step runs it again on
what it packages.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forge.core.errors import ToolError
from forge.recipe.schema import Recipe, TrtLLM
from forge.core.host import local_gpus, trtllm_version
from forge.gpu.catalog import gpu
from forge.gpu.methods import KV_CACHE_ALGO as KV_ALGO, METHODS

if TYPE_CHECKING:
    from forge.core.host import LocalGpu

ENGINE_CONFIG = "config.json"
TRTLLM_CKPT = "trtllm-checkpoint"       # quantize output subdir: ModelOpt's TensorRT-LLM checkpoint (engine mode)
LEGACY_MAX = (1, 1)                      # the trtllm-build engine flow was removed after TensorRT-LLM 1.1
DECODER = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen",
           "Qwen3ForCausalLM": "qwen", "Gemma2ForCausalLM": "gemma2", "Phi3ForCausalLM": "phi3"}


# ---------------------------------------------------------------------- the recipe's build settings

@dataclass(frozen=True)
class BuildSettings:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    gemm_plugin: str
    gpt_attention_plugin: str
    use_paged_context_fmha: bool
    use_fp8_context_fmha: bool

    @classmethod
    def from_recipe(cls, r: Recipe) -> "BuildSettings":
        t = r.trtllm or TrtLLM()
        seq = t.max_seq_len or r.target.max_model_len
        return cls(max_batch_size=t.max_batch_size or r.target.max_num_seqs, max_input_len=t.max_input_len or max(1, seq - 1),
                   max_seq_len=seq, max_num_tokens=t.max_num_tokens, gemm_plugin=t.gemm_plugin,
                   gpt_attention_plugin=t.gpt_attention_plugin, use_paged_context_fmha=t.use_paged_context_fmha,
                   use_fp8_context_fmha=t.use_fp8_context_fmha)


def mode(recipe: Recipe) -> str:
    return recipe.trtllm.mode if recipe.trtllm else "pytorch"


def build_command(settings: BuildSettings, checkpoint_dir: str, output_dir: str, workers: int = 1) -> list[str]:
    """trtllm-build's documented flags, from the recipe."""
    on = {True: "enable", False: "disable"}
    return ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir,
            "--max_batch_size", str(settings.max_batch_size), "--max_input_len", str(settings.max_input_len),
            "--max_seq_len", str(settings.max_seq_len), "--max_num_tokens", str(settings.max_num_tokens),
            "--gemm_plugin", settings.gemm_plugin, "--gpt_attention_plugin", settings.gpt_attention_plugin,
            "--use_paged_context_fmha", on[settings.use_paged_context_fmha],
            "--use_fp8_context_fmha", on[settings.use_fp8_context_fmha],
            "--remove_input_padding", "enable", "--kv_cache_type", "paged", "--workers", str(workers)]


def serve_command(recipe: Recipe, model_dir: str, port: int, *, engine_dir: str | None = None) -> tuple[str, ...]:
    """trtllm-serve for the image: the PyTorch backend on the checkpoint, or the TensorRT backend on an engine."""
    t = recipe.target
    s = BuildSettings.from_recipe(recipe)
    head = (["trtllm-serve", engine_dir, "--backend", "tensorrt", "--tokenizer", model_dir] if engine_dir
            else ["trtllm-serve", model_dir, "--backend", "pytorch"])
    return tuple(head + ["--host", "0.0.0.0", "--port", str(port), "--max_batch_size", str(s.max_batch_size),
                         "--max_num_tokens", str(s.max_num_tokens), "--max_seq_len", str(s.max_seq_len),
                         "--tp_size", str(t.tensor_parallel),
                         "--kv_cache_free_gpu_memory_fraction", str(t.gpu_memory_utilization)])


def engine_mode_problems(recipe: Recipe, base) -> list[tuple[tuple[str, ...], str]]:
    """What engine mode needs: a TensorRT-LLM base image (it builds the engine it serves) at a release that still has
    the trtllm-build flow (<= 1.1). (recipe key path, message) pairs."""
    if mode(recipe) != "engine":
        return []
    if base is None:
        return [(("trtllm", "mode"), "mode engine needs container.base: the TensorRT-LLM release image that builds "
                                     "the engine is the one that serves it")]
    if base.engine != "trtllm":
        return [(("container", "base"), f"base {base.name} runs {base.engine}, not trtllm")]
    if not engine_mode_allowed(base.engine_version):
        return [(("trtllm", "mode"), f"the trtllm-build engine flow was removed after TensorRT-LLM 1.1 (1.2 serves "
                                     f"HF checkpoints with the PyTorch backend only); base {base.name} is "
                                     f"{base.engine_version}. Use mode: pytorch, or a base with TensorRT-LLM <= 1.1")]
    return []


# ---------------------------------------------------------------------- engines

@dataclass(frozen=True)
class EngineFacts:
    version: str
    cluster_key: str | None
    architecture: str | None
    dtype: str | None
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp_size: int
    build: dict

    @classmethod
    def read(cls, engine_dir: Path) -> "EngineFacts":
        path = Path(engine_dir) / ENGINE_CONFIG
        try:
            cfg = json.loads(path.read_text())
            pre, build = cfg["pretrained_config"], cfg["build_config"]
            q = pre.get("quantization") or {}
            return cls(version=str(cfg["version"]),
                       cluster_key=(build.get("auto_parallel_config") or {}).get("cluster_key"),
                       architecture=pre.get("architecture"), dtype=pre.get("dtype"),
                       quant_algo=q.get("quant_algo"), kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
                       tp_size=int((pre.get("mapping") or {}).get("tp_size", 1)), build=build)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a TensorRT-LLM engine config ({type(e).__name__}: {e})") from None


def check_engine(facts: EngineFacts, r: Recipe, base) -> list[str]:
    """Every way the engine disagrees with the recipe or the base image; each names both sides."""
    g = gpu(r.target.gpu)
    problems = []
    if facts.cluster_key not in g.trtllm_cluster_keys:
        problems.append(f"engine built for GPU {facts.cluster_key!r} (build_config.auto_parallel_config.cluster_key); "
                        f"the recipe targets {g.name} ({', '.join(g.trtllm_cluster_keys) or 'no TensorRT-LLM key'})")
    if _release(facts.version) != _release(base.engine_version):
        problems.append(f"engine built with TensorRT-LLM {facts.version}; the base image {base.name} runs "
                        f"TensorRT-LLM {base.engine_version}")
    want_q = METHODS[r.quantize.method].quant_algo
    if facts.quant_algo != want_q:
        problems.append(f"engine quantization {facts.quant_algo!r}; the recipe's quantize.method {r.quantize.method} "
                        f"means {want_q!r}")
    if facts.kv_cache_quant_algo != KV_ALGO[r.quantize.kv_cache]:
        problems.append(f"engine KV cache {facts.kv_cache_quant_algo!r}; the recipe's quantize.kv_cache "
                        f"{r.quantize.kv_cache} means {KV_ALGO[r.quantize.kv_cache]!r}")
    if facts.dtype and facts.dtype != r.model.dtype:
        problems.append(f"engine dtype {facts.dtype}; the recipe's model.dtype is {r.model.dtype}")
    if facts.tp_size != r.target.tensor_parallel:
        problems.append(f"engine tp_size {facts.tp_size}; the recipe's target.tensor_parallel is {r.target.tensor_parallel}")
    s = BuildSettings.from_recipe(r)
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
        if key in facts.build and int(facts.build[key]) != getattr(s, key):
            problems.append(f"engine {key} {facts.build[key]}; the recipe asks {getattr(s, key)}")
    return problems


def _release(version: str | None) -> tuple[int, ...]:
    nums = re.findall(r"\d+", version or "")
    return tuple(int(n) for n in nums[:3])


def engine_mode_allowed(engine_version: str) -> bool:
    return _release(engine_version)[:2] <= LEGACY_MAX


# ---------------------------------------------------------------------- where the build can run

@dataclass(frozen=True)
class Runner:
    kind: str                 # "local" | "docker" | "podman"
    gpu: "LocalGpu"
    trtllm_version: str
    image: str | None = None

    def command(self, argv: list[str], mounts: dict[Path, str]) -> list[str]:
        if self.kind == "local":
            return argv
        vols = [a for src, dst in mounts.items() for a in ("-v", f"{src}:{dst}")]
        return [self.kind, "run", "--rm", "--gpus", "all", "--ipc", "host", *vols, self.image, *argv]


def find_runner(recipe: Recipe, base, image_ref: str) -> Runner:
    """Where trtllm-build may run for this recipe: on this machine's matching GPU, locally or in the pinned
    image. Refuses (exit 5) when no GPU here is the recipe's: an engine is bound to the GPU that built it."""
    g = gpu(recipe.target.gpu)
    found = local_gpus()
    match = next((x for x in found if x.name in g.smi), None)
    if match is None:
        here = ", ".join(x.name for x in found) or "no NVIDIA GPU (nvidia-smi not found or reports none)"
        raise ToolError(f"the engine must be built on a {g.name}; this machine has {here}",
                        hint=f"Run `forge build` on a machine with a {g.name} (the engine is bound to the GPU that "
                             "builds it), or use trtllm.mode: pytorch, which needs no build step.")
    exe = shutil.which("trtllm-build")
    if exe is not None:
        return Runner("local", match, trtllm_version())
    for engine in ("docker", "podman"):
        if shutil.which(engine):
            return Runner(engine, match, base.engine_version, image_ref)
    raise ToolError(f"a {g.name} is here but neither trtllm-build nor docker/podman is on PATH",
                    hint=f"Install TensorRT-LLM {base.engine_version}, or docker/podman with the NVIDIA container toolkit.")
