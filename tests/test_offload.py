"""Calibrated methods past RAM (issue 28 item 4): when GPTQ or AWQ does not fit in memory, the quantize step loads the
model with its weights left in the safetensors files (compressed-tensors' disk offload) and llm-compressor's
sequential pipeline onloads one decoder layer at a time; the checkpoint is the in-memory one, tensor for tensor,
and it is verified on its decompressed weights one decoder layer at a time, as transformers computes them. The
pre-flight decides which, from the shape, the calibration and the memory available, and refuses what fits neither
way with both figures."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, resolved, write_recipe

from forge.core.errors import ResourceError
from forge.gpu import host_fit
from forge.model.shape import from_config
from forge.orchestrate.build import build
from forge.store.local import Store

from test_host_fit import QWEN14B
from test_streaming import _tensors

CALIBRATION = {"data": str(REPO / "evals" / "data" / "calib-pydoc.jsonl"), "samples": 8, "max_seq_len": 64}


@pytest.fixture
def bf16_calibration(monkeypatch):
    """The calibration dtype fixed (the host's choice depends on its memory and CPU flags)."""
    monkeypatch.setenv("FORGE_CPU_CALIBRATION_DTYPE", "bfloat16")


def _gptq_need(**kw):
    (need,) = host_fit.needs(from_config(QWEN14B), "gptq", calibrates=True, evaluates=False, device="cpu",
                             calibration=(20, 512), **kw)
    return need


def test_a_14b_gptq_build_offloads_on_a_24_gib_machine_and_holds_the_model_where_it_fits(bf16_calibration):
    """GPTQ of the 14B shape needs 51.3 GB in memory (1.7 x 29.5 GB + libraries), 7.3 GB offloaded (there the
    streamed verification of the 1.56 GB embeddings is the larger term): on the 24 GiB machine it offloads; on a
    64 GB one it holds the model (faster); the budget is one block."""
    held, offloadable = _gptq_need(), _gptq_need(offloads=True)
    assert held.offloaded is None and host_fit.shortfalls((held,), available=23.4e9)
    assert round(offloadable.bytes / 1e9, 1) == round(held.bytes / 1e9, 1) == 51.3
    need, how, budget = offloadable.offloaded
    assert round(need / 1e9, 1) == 7.3 and "one decoder layer onloaded at a time in bfloat16" in how
    assert "20 x 512 tokens" in how and "or the verification's 4.0 x 1.56 GB block" in how and round(budget / 1e9, 2) == 1.56   # the 152k x 5120 embeddings, the largest block
    assert host_fit.shortfalls((offloadable,), available=23.4e9) == []
    assert offloadable.offloads(23.4e9) and host_fit.offload_budget((offloadable,), available=23.4e9) == budget
    assert not offloadable.offloads(64e9) and host_fit.offload_budget((offloadable,), available=64e9) is None
    assert host_fit.offload_budget((held,), available=23.4e9) is None   # a backend that cannot offload


def test_what_fits_neither_way_is_refused_with_both_figures_exit_5(bf16_calibration, monkeypatch):
    need = _gptq_need(offloads=True)
    (short,) = host_fit.shortfalls((need,), available=6e9)
    assert short[1].startswith("quantize needs 51.3 GB of host memory (gptq loads the whole model and calibrates it "
                               "in bfloat16") and ", or 7.3 GB with the weights offloaded to disk (" in short[1]
    assert short[1].endswith("; 6.0 GB available")
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 6e9)
    with pytest.raises(ResourceError) as e:
        host_fit.require((need,), "quantize")
    assert e.value.exit_code == 5 and "the kernel would kill the build" in e.value.message
    assert ">= 8 GB of memory" in e.value.hint   # a machine with room for the offloaded run (its need + 10 %)


def test_the_offloaded_need_covers_the_peak_forge_measured_and_grows_with_the_calibration():
    """The 3B shape's offloaded GPTQ build inside a 5 GB cgroup peaked at 2.51 GB (reference, calibration, export
    and verification, one process): the need is never below it and at most 25 % above it."""
    data = json.loads((REPO / "bench" / "results" / "scale-llama-3.2-3b-gptq-offloaded-in-5gb-cgroup.json").read_text())
    run = data["forge_gptq_offloaded"]
    cal = data["calibration"]
    shape = from_config(data["model"]["config"])
    need = host_fit.offloaded_need(shape, run["calibration_dtype"], cal["samples"], cal["max_seq_len"])[0]
    assert run["peak_rss_gb"] * 1e9 <= need <= 1.25 * run["peak_rss_gb"] * 1e9, need / 1e9
    small = host_fit.offloaded_need(shape, "bfloat16", 20, 512)[0]
    assert host_fit.offloaded_need(shape, "bfloat16", 512, 2048)[0] - small == pytest.approx(
        host_fit.FACTORS["activations"] * (512 * 2048 - 20 * 512) * 3072 * 2)
    assert host_fit.offloaded_need(shape, "float32", 20, 512)[0] > small


def _build(tmp_path: Path, model: Path, name: str, quantize: dict) -> dict:
    """The steps' cache entries of a build, by step name."""
    recipe = write_recipe(tmp_path / f"{name}.yaml", str(model), quantize=quantize)
    entries = {r.name: r.entry for r in build(resolved(recipe), Store(tmp_path / f"cache-{name}"))}
    assert "quantize" in entries
    return entries


@pytest.mark.parametrize("quantize", [{"method": "gptq", "bits": 4, "group_size": 32},
                                      {"method": "awq", "group_size": 32}], ids=["gptq", "awq"])
def test_an_offloaded_calibration_writes_the_in_memory_checkpoint(tmp_path, tiny_llama, monkeypatch, quantize):
    """The same tensors byte for byte, the same per-layer report and the same verification, whether the model was
    held or its decoder layers were left on disk (a budget of 70 kB keeps only the embeddings resident); the offload
    folder holds links to the snapshot's shards while the step runs and is gone after it."""
    import torch

    from forge.steps import quantize as step

    q = {**quantize, "calibration": CALIBRATION}
    held = _build(tmp_path, tiny_llama, "held", q)["quantize"]
    seen = {}
    load = step._offloaded_model

    def spy(ctx, src, dtype, budget, folder):
        model = load(ctx, src, dtype, budget, folder)
        seen["links"] = [p for p in folder.rglob("*") if p.is_symlink()]
        seen["targets"] = [os.readlink(p) for p in seen["links"]]
        return model

    monkeypatch.setattr(step, "_offloaded_model", spy)
    monkeypatch.setattr(host_fit, "offload_budget", lambda needs, available=None: 70_000.0)
    offloaded = _build(tmp_path, tiny_llama, "offloaded", q)["quantize"]
    assert seen["links"] and {Path(t).name for t in seen["targets"]} == {"model.safetensors"}, seen["targets"]
    assert not (offloaded.out.parent / "offload").exists()
    facts, held_facts = offloaded.manifest["facts"], held.manifest["facts"]
    assert facts["backend_facts"]["offloaded"] == {"cpu_budget_bytes": 70000}
    assert "offloaded" not in held_facts["backend_facts"]
    a, b = _tensors(held.out), _tensors(offloaded.out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    assert json.loads((held.out / "config.json").read_text()) == json.loads((offloaded.out / "config.json").read_text())
    rows = [json.loads((e.out / "quantize-report.json").read_text())["layers"] for e in (held, offloaded)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows[0]] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in rows[1]]
    assert facts["verify"] == held_facts["verify"] and facts["verify"]["resident"] == "one decoder layer"


@pytest.mark.parametrize("quantize", [{"method": "gptq", "bits": 4, "group_size": 32},
                                      {"method": "awq", "group_size": 32}], ids=["gptq", "awq"])
def test_packed_weights_verify_one_layer_at_a_time_as_transformers_runs_the_checkpoint(tmp_path, tiny_llama, quantize):
    """GPTQ and AWQ checkpoints are verified on their decompressed weights, one decoder layer resident (the
    library's own decompression; AWQ's smoothed norms read from the checkpoint, not the snapshot): the same tokens
    as the checkpoint loaded whole by transformers."""
    import torch
    from transformers import AutoTokenizer

    from forge.backends.tensors import CompressedWeights
    from forge.steps import reference
    from forge.steps.verify import verify_dequantized, verify_generation

    entries = _build(tmp_path, tiny_llama, "q", {**quantize, "calibration": CALIBRATION})
    entry, tokens = entries["quantize"], reference.Output.read(entries["reference"]).tokens
    tokenizer = AutoTokenizer.from_pretrained(entry.out)
    whole = verify_generation(tokens, entry.out, tokenizer, torch.bfloat16)
    layered = verify_dequantized(tiny_llama, CompressedWeights(entry.out), tokenizer, torch.bfloat16, reference=tokens)
    keys = ("matching_prefix", "agreement", "quantized_text")
    assert {k: layered[k] for k in keys} == {k: whole[k] for k in keys}
    assert entry.manifest["facts"]["verify"]["how"] == "dequantized weights"


def test_a_checkpoint_with_several_quantization_groups_is_not_decompressed_layer_by_layer(tmp_path, tiny_llama):
    from forge.backends.tensors import CompressedWeights

    group = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                                 "symmetric": True}, "format": "pack-quantized"}
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"group_0": group, "group_1": {**group, "targets": ["re:.*down"]}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: 2 quantization config groups"):
        CompressedWeights(tmp_path)


def test_an_offloaded_calibration_without_the_disk_for_its_layers_is_refused_exit_5(tmp_path, tiny_llama, monkeypatch):
    """The layers the calibration rewrites go to the offload folder, up to the snapshot's size: a disk without that
    room is refused before the model loads, with both figures, and the folder is gone."""
    from collections import namedtuple

    from forge.steps import quantize as step

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(host_fit, "offload_budget", lambda needs, available=None: 70_000.0)
    monkeypatch.setattr(step.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ResourceError) as e:
        _build(tmp_path, tiny_llama, "no-disk", {"method": "gptq", "bits": 4, "group_size": 32,
                                                 "calibration": CALIBRATION})
    assert e.value.exit_code == 5 and "calibrating offloaded to disk writes up to 0.0 GB" in e.value.message
    assert e.value.message.endswith("; 0.0 GB free there") and "FORGE_CACHE_DIR" in e.value.hint
    assert not list((tmp_path / "cache-no-disk").rglob("offload"))
