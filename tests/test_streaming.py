"""Streaming (issue 28 items 1 and 2): data-free FP8 quantized shard by shard (llm-compressor's model_free_ptq), the
BF16 reference and the FP8 verification run one decoder layer at a time from the safetensors files. Each is held
against the in-memory path it replaces (FORGE_STREAMING=0), on tiny models: Llama, Qwen2 (attention biases) and a
Llama with tied embeddings (the head read under the embeddings' name)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import resolved, write_recipe

from forge.core.errors import StepError
from forge.orchestrate.build import build
from forge.store.local import Store

MODELS = ["tiny_llama", "tiny_qwen2", "tiny_tied"]


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory, tiny_llama) -> Path:
    """tiny_llama's shape with the output head tied to the embeddings (no lm_head.weight stored), in 2 shards."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-tied")
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, path / f.name)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _build(tmp_path: Path, model: Path, monkeypatch, streaming: bool, **quantize):
    monkeypatch.setenv("FORGE_STREAMING", "1" if streaming else "0")
    name = "streamed" if streaming else "in-memory"
    recipe = write_recipe(tmp_path / f"{name}.yaml", str(model), quantize={"method": "fp8", **quantize})
    result = build(resolved(recipe), Store(tmp_path / f"cache-{name}"))[-1]
    assert result.name == "quantize"
    return result.entry.out, result.entry.manifest["facts"]


@pytest.mark.parametrize("model,ignore", [("tiny_llama", ["lm_head"]), ("tiny_qwen2", ["lm_head"]),
                                          ("tiny_tied", ["lm_head"]), ("tiny_llama", ["lm_head", "re:.*down_proj"])],
                         ids=["llama", "qwen2", "tied", "llama-ignore-regex"])
def test_streamed_fp8_checkpoint_is_the_in_memory_one_tensor_for_tensor(request, tmp_path, monkeypatch, model, ignore):
    """The same tensors (names, dtypes, shapes, bytes), the same config.json and tokenizer, and the same verification
    (matching prefix, agreement, per-layer weight errors), streamed or held in memory. What differs, on purpose: the
    shards follow the snapshot's when streamed (save_pretrained's 50 GB default in memory: the tied model here is
    three shards streamed, one in memory), with model.safetensors.index.json even for a single shard, which
    save_pretrained writes only for several (transformers and vLLM read either form); recipe.yaml (read by neither) names the modifier when
    streamed, and is empty in memory, where forge resets llm-compressor's session before save_pretrained
    serializes it."""
    import torch

    path = request.getfixturevalue(model)
    streamed, s_facts = _build(tmp_path, path, monkeypatch, True, ignore=ignore)
    in_memory, m_facts = _build(tmp_path, path, monkeypatch, False, ignore=ignore)
    assert s_facts["streamed"] is True and m_facts["streamed"] is False
    a, b = _tensors(streamed), _tensors(in_memory)
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    assert any(t.dtype == torch.float8_e4m3fn for t in a.values())
    assert json.loads((streamed / "config.json").read_text()) == json.loads((in_memory / "config.json").read_text())
    weights = ("model.safetensors.index.json",)
    files = {p.name for p in streamed.iterdir()} ^ {p.name for p in in_memory.iterdir()}
    assert {f for f in files if not f.endswith(".safetensors")} <= set(weights), files
    # the shards: the snapshot's when streamed (one output shard per input shard), save_pretrained's in memory
    assert len(list(streamed.glob("*.safetensors"))) == len(list(path.glob("*.safetensors")))
    assert "FP8_DYNAMIC" in (streamed / "recipe.yaml").read_text()
    for same in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "forge-quantization.json"):
        if (in_memory / same).exists():
            assert (streamed / same).read_bytes() == (in_memory / same).read_bytes(), same
    sv, mv = s_facts["verify"], m_facts["verify"]
    assert sv["resident"] == "one decoder layer" and mv["resident"] == "the whole model"
    assert {k: v for k, v in sv.items() if k != "resident"} == {k: v for k, v in mv.items() if k != "resident"}
    s_rows = json.loads((streamed / "quantize-report.json").read_text())["layers"]
    m_rows = json.loads((in_memory / "quantize-report.json").read_text())["layers"]
    assert s_rows == m_rows and all(r["weight_rel_error"] is not None for r in s_rows)


@pytest.mark.parametrize("model", MODELS)
def test_streamed_reference_tokens_are_the_in_memory_ones(request, model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge.steps.reference import VERIFY_TOKENS, greedy_tokens, streamed_greedy_tokens

    path = request.getfixturevalue(model)
    tok = AutoTokenizer.from_pretrained(path)
    held = greedy_tokens(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), tok)
    assert streamed_greedy_tokens(path, tok, torch.bfloat16) == held and len(held) == VERIFY_TOKENS


def test_a_streamed_model_holds_one_block_at_a_time(tiny_llama):
    """While a block runs only its own parameters are real; before and after the forward every parameter is on
    the meta device (nothing of the checkpoint is kept)."""
    import torch

    from forge.backends import TensorReader
    from forge.model import layerwise

    model = layerwise.empty_model(tiny_llama, torch.bfloat16)
    real_during: list[set[str]] = []
    for prefix, block in layerwise.blocks(model):
        block.register_forward_hook(lambda m, a, o: real_during.append(
            {n for n, p in model.named_parameters() if p.device.type != "meta"}), prepend=True)
    with layerwise.streamed(model, TensorReader(tiny_llama), dtype=torch.bfloat16) as m, torch.no_grad():
        m(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    blocks = dict(layerwise.blocks(model))
    assert len(real_during) == len(blocks) == 2 + 3   # two layers; embeddings, final norm, head
    for real in real_during:   # each time: the parameters of the block that ran, no other
        assert len({n.split(".layers.")[-1].split(".")[0] if ".layers." in n else n.rsplit(".", 1)[0] for n in real}) == 1
    assert all(p.device.type == "meta" for p in model.parameters())


def test_streamed_verification_refuses_a_missing_or_foreign_tensor(tmp_path, tiny_llama, monkeypatch):
    """The written tensors are checked against the model from the files' headers (what transformers' load
    checked): a missing tensor and a tensor of no module of the model are refused, naming them."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from forge.steps.verify import check_tensors

    out, _ = _build(tmp_path, tiny_llama, monkeypatch, True)
    for how in ("missing", "foreign"):
        broken = tmp_path / how
        shutil.copytree(out, broken)
        shard = next(broken.glob("*.safetensors"))
        tensors = load_file(shard)
        if how == "missing":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.layers.1.mlp.extra.weight_scale"] = torch.ones(1)
        save_file(tensors, shard, metadata={"format": "pt"})
        with pytest.raises(StepError, match="missing tensors: model.layers.1.mlp.up_proj.weight" if how == "missing"
                           else "unexpected tensors: model.layers.1.mlp.extra.weight_scale"):
            check_tensors(broken, torch.bfloat16)
    check_tensors(out, torch.bfloat16)


def test_a_streamed_fp8_build_loads_no_model(tmp_path, tiny_llama, monkeypatch):
    """Reference, quantize and verification stream: transformers' from_pretrained is never called (with
    FORGE_STREAMING=0 the reference, the quantize step and its two checks each load a model)."""
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    loads: list[str] = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(str(a[0])) or load(*a, **k))
    _build(tmp_path, tiny_llama, monkeypatch, True)
    assert loads == []
    _build(tmp_path, tiny_llama, monkeypatch, False)
    assert len(loads) == 4, loads
