"""Eval numerics do not depend on batching: a checkpoint with dynamic activation scales (FP8 W8A8) is evaluated one
document per forward pass, so the gate's numbers are a function of the checkpoint alone, and the verdict says so."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, write_recipe

from forge.orchestrate.build import build
from conftest import resolved
from forge.store.local import Store

HELDOUT = REPO / "evals" / "tasks" / "heldout_ppl.yaml"


@pytest.fixture(scope="module")
def batch_sensitive_llama(tmp_path_factory):
    """A small random Llama wide enough (hidden 256) that FP8 activation rounding turns a padded batch's float
    noise into different log-likelihoods: the tiny 64-wide test model is exact at any batch size, and would prove
    nothing."""
    import torch
    import transformers

    from conftest import TINY_VOCAB, _tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False, eos_token_id=2)
    path = tmp_path_factory.mktemp("llama-256")
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    _tiny_tokenizer(path)
    return path


def _logliks(samples: list[dict]) -> dict[int, float]:
    return {s["doc_id"]: float(s["word_perplexity"][0]) for s in samples}


def test_fp8_eval_is_the_same_at_batch_1_and_8_and_the_verdict_records_it(tmp_path, batch_sensitive_llama):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from forge.evaluation.tasks import load_task
    from forge.steps.evaluate import load_samples, simple_evaluate

    recipe = write_recipe(tmp_path / "r.yaml", str(batch_sensitive_llama), quantize={"method": "fp8"},
                          eval={"tasks": [str(HELDOUT)],
                                "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 5.0}]})
    results = {r.name: r for r in build(resolved(recipe), Store(tmp_path / "cache"))}
    checkpoint = results["quantize"].entry.out
    cand = json.loads((results["eval_candidate"].entry.out / "results.json").read_text())
    base = json.loads((results["eval_baseline"].entry.out / "results.json").read_text())
    assert cand["batching"]["batch_size"] == 1 and cand["batching"]["requested"] == 8
    assert base["batching"]["batch_size"] == 8     # BF16: no dynamic activation scales, batched as before
    verdict = json.loads((results["gate"].entry.out / "verdict.json").read_text())
    assert verdict["settings"]["eval_batching"] == {"baseline": base["batching"], "candidate": cand["batching"]}
    summary = (results["gate"].entry.out / "summary.md").read_text()
    assert "Evaluated at batch size baseline 8, candidate 1 (activations quantized dynamically" in summary

    forge_docs = {d: v["word_perplexity"][0] for d, v in load_samples(results["eval_candidate"].entry.out,
                                                                        "heldout_ppl").items()}
    task = load_task(str(HELDOUT), REPO, "test")
    at = {bs: _logliks(simple_evaluate(checkpoint, [task], "hf", "cpu", limit=None, seed=1234, batch_size=bs)[0]
                       ["samples"]["heldout_ppl"]) for bs in (1, 8)}
    assert at[1] == at[8] == forge_docs and len(forge_docs) == 40
    # what lm-eval gives at batch 8 on the same checkpoint without forge's batching: some documents differ,
    # so the equality above is forge's doing, not this model's luck
    raw = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(checkpoint), "dtype": "float32",
                                                          "device": "cpu"},
                                  tasks=[task.lm_eval_task()], batch_size=8, log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False))
    raw8 = _logliks(raw["samples"]["heldout_ppl"])
    assert raw8.keys() == at[1].keys() and any(raw8[d] != at[1][d] for d in raw8), \
        "lm-eval at batch 8 matched batch 1 on every document: this model no longer shows the batch effect"


def test_batching_policy_reads_the_checkpoint(tmp_path):
    from forge.steps.evaluate import batching_for

    def ckpt(name, qc):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   **({"quantization_config": qc} if qc else {})}))
        return d

    dynamic = {"config_groups": {"group_0": {"input_activations": {"dynamic": True, "strategy": "token"},
                                             "weights": {"dynamic": False}}}}
    static = {"config_groups": {"group_0": {"input_activations": {"dynamic": False, "strategy": "tensor"}}}}
    weight_only = {"config_groups": {"group_0": {"input_activations": None, "weights": {"num_bits": 4}}}}
    assert batching_for(ckpt("fp8", dynamic))["batch_size"] == 1
    assert batching_for(ckpt("local", {"config_groups": {"g": {"input_activations": {"dynamic": "local"}}}}))["batch_size"] == 1
    assert batching_for(ckpt("static", static))["batch_size"] == 8
    assert batching_for(ckpt("w4a16", weight_only))["batch_size"] == 8
    assert batching_for(ckpt("bf16", None), 4) == {"batch_size": 4, "requested": 4,
                                                     "reason": "no dynamic activation quantization"}
