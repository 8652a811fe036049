"""method: auto on a tiny model: the walk, mixed precision, exit 3 with the closest trial, cache reuse, GPU plans.

The tiny model is crafted so the outcome is deterministic: only its layer-1 MLP is trained (briefly, on the
held-out text), so what the model knows goes through model.layers.1.mlp.down_proj; then, without changing what
the model computes, every 32nd input column of that layer is scaled x15 (and the matching up_proj row /15): in
4-bit groups of 32 that outlier rounds the rest of the layer to zero, 8-bit and BF16 keep it.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from conftest import REPO, forge_cli, write_recipe

from conftest import resolved
from forge.store.local import Store

TASKS = REPO / "evals" / "tasks"
CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"
DAMAGED = "model.layers.1.mlp.down_proj"
W4 = {"method": "gptq", "bits": 4, "group_size": 32}
W8 = {"method": "gptq", "bits": 8, "group_size": 32}
STEPS = 60


@pytest.fixture(scope="module")
def outlier_llama(tmp_path_factory, tiny_llama):
    """tiny_llama trained briefly on the held-out text (so damage raises its perplexity), then made
    outlier-heavy in one layer without changing what it computes (see the module docstring)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("outlier-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = [json.loads(line)["text"] for line in (REPO / "evals" / "data" / "heldout.jsonl").read_text().splitlines()]
    ids = torch.tensor(tok(" ".join(texts))["input_ids"])
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)
    mlp = model.get_submodule(DAMAGED.rsplit(".", 1)[0])
    for p in model.parameters():   # only this MLP learns: what the model knows, it knows through DAMAGED
        p.requires_grad_(False)
    for p in mlp.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(mlp.parameters(), lr=2e-2)
    for _ in range(STEPS):
        batch = windows[torch.randint(0, len(windows), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():   # down(act(gate x) * up x): down's input column j x15, up's row j /15: same function
        mlp.down_proj.weight[:, ::32] *= 15.0
        mlp.up_proj.weight[::32, :] /= 15.0
    model.to(torch.bfloat16).save_pretrained(path)
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return path


def _recipe(tmp_path, model, *, candidates, threshold=0.2, max_trials=None, name="auto-tiny", target=None):
    quantize = {"method": "auto", "candidates": candidates,
                "calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}}
    if max_trials:
        quantize["max_trials"] = max_trials
    return write_recipe(tmp_path / f"{name}.yaml", str(model), name=name, quantize=quantize,
                        target=target or {"gpu": "CPU", "engine": "cpu"},
                        eval={"tasks": [str(TASKS / "heldout_ppl.yaml")], "limit": 16,
                              "gate": [{"task": "heldout_ppl", "metric": "word_perplexity",
                                        "max_rel_increase": threshold}]})


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One step cache for the module: the trials of one test are the cache hits of the next."""
    return tmp_path_factory.mktemp("auto-cache")


def test_cheapest_scheme_fails_and_its_mixed_precision_version_wins(tmp_path, outlier_llama, shared_cache):
    recipe = _recipe(tmp_path, outlier_llama, candidates=[W4, "fp8"], threshold=0.05)
    proc = forge_cli("build", str(recipe), "--json", cache=shared_cache, check=0)
    out = json.loads(proc.stdout)
    assert "trial gptq W4A16 g32: gate failed" in proc.stderr
    assert "trial gptq W4A16 g32 + 1 BF16 layer(s): gate passed" in proc.stderr
    decision = json.loads((shared_cache / "reports" / "auto-tiny" / "auto" / "auto-decision.json").read_text())
    first, second = decision["trials"]
    assert (first["scheme"], first["kept_bf16"], first["passed"]) == ("gptq W4A16 g32", [], False)
    assert first["gate"][0]["decision"] == "beyond" and first["gate"][0]["ci_low"] > 0.05
    # the per-layer error report names the damaged layer first; keeping it in BF16 passes the gate
    assert (second["kept_bf16"], second["passed"]) == ([DAMAGED], True)
    assert second["overrides"]["ignore"] == ["lm_head", DAMAGED]
    assert decision["winner"]["kept_bf16"] == [DAMAGED] and "every cheaper one failed it" in decision["why"]
    # the fit model prices the BF16 layer: more bytes than plain W4, fewer than FP8 (the next scheme)
    order = {o["scheme"]: o["fit_weight_bytes"] for o in decision["order"]}
    assert order["gptq W4A16 g32"] < second["fit_weight_bytes"] < order["fp8 FP8-W8A8"]
    # the published record is the winner's, with the decision report as evidence
    rec = out["record"]
    assert rec["method"] == "gptq" and rec["status"] != "rejected"
    assert {e["kind"] for e in rec["evidence"]} >= {"eval-verdict", "auto-decision"}
    md = (shared_cache / "reports" / "auto-tiny" / "auto" / "auto-decision.md").read_text()
    assert f"| 2 | gptq W4A16 g32 | {DAMAGED} |" in md

    # a rerun is all cache hits: the plan says so, and the walk builds nothing
    plan = json.loads(forge_cli("plan", str(recipe), "--json", cache=shared_cache, check=0).stdout)
    assert [(t["scheme"], t["cached"], t["gate"]) for t in plan["trials"]] == [
        ("gptq W4A16 g32", True, "fail"), ("fp8 FP8-W8A8", False, None)]
    again = forge_cli("build", str(recipe), "--json", cache=shared_cache, check=0)
    assert {s["status"] for s in json.loads(again.stdout)["steps"]} == {"HIT"}
    assert "gate failed (cached)" in again.stderr and "gate passed (cached)" in again.stderr
    rerun = json.loads((shared_cache / "reports" / "auto-tiny" / "auto" / "auto-decision.json").read_text())
    assert all(t["cached"] for t in rerun["trials"]) and rerun["winner"]["kept_bf16"] == [DAMAGED]


def test_nothing_passes_exits_3_naming_the_closest_trial(tmp_path, outlier_llama, shared_cache):
    """max_rel_increase: 0 with plain W4 wholly past it (its 95% interval above 0): no mixed-precision trial is
    spent on it (it used to be, as any limit <= 0 counted as "just fails"); exit 3 names the closest trial."""
    recipe = _recipe(tmp_path, outlier_llama, candidates=[W4], threshold=0.0, max_trials=2, name="auto-strict")
    proc = forge_cli("build", str(recipe), cache=shared_cache)
    assert proc.returncode == 3, proc.stderr
    assert "no candidate passed the eval gate; the closest trial was gptq W4A16 g32 " in proc.stderr
    decision = json.loads((shared_cache / "reports" / "auto-strict" / "auto" / "auto-decision.json").read_text())
    assert len(decision["trials"]) == 1 and decision["winner"] is None
    only = decision["trials"][0]
    assert only["gate"][0]["ci_low"] > 0 and "no mixed precision tried" in only["note"]
    assert decision["closest"] == "gptq W4A16 g32" and "in 1 trial(s). Closest" in decision["why"]
    rejected = json.loads(forge_cli("registry", "ls", "--json", "--status", "rejected", check=0).stdout)
    assert len(rejected) == 1 and rejected[0]["reason"].startswith("eval gate failed")
    # the trial budget: max_trials 1 stops the walk and says so (the trial is a cache hit by now)
    recipe = _recipe(tmp_path, outlier_llama, candidates=[W4, W8], threshold=0.0, max_trials=1, name="auto-strict")
    assert forge_cli("build", str(recipe), cache=shared_cache).returncode == 3
    decision = json.loads((shared_cache / "reports" / "auto-strict" / "auto" / "auto-decision.json").read_text())
    assert len(decision["trials"]) == 1 and "max_trials 1 reached" in decision["why"]


def test_auto_recipe_validation_names_field_and_fix(tmp_path, tiny_llama):
    bad = write_recipe(tmp_path / "bad.yaml", str(tiny_llama), quantize={"method": "fp8", "candidates": ["fp8"]})
    proc = forge_cli("validate", str(bad), check=2)
    assert "quantize: candidates and max_trials apply to method: auto only" in proc.stderr
    no_gate = write_recipe(tmp_path / "nogate.yaml", str(tiny_llama), quantize={"method": "auto"})
    proc = forge_cli("validate", str(no_gate), check=2)
    assert "quantize.method: method: auto picks the cheapest candidate that passes the eval gate" in proc.stderr
    unknown = _recipe(tmp_path, tiny_llama, candidates=[{"method": "gptq", "bits": 3}])
    proc = forge_cli("validate", str(unknown), check=2)
    assert "quantize.candidates" in proc.stderr and "bits" in proc.stderr


@pytest.mark.parametrize("gpu", ["L4", "H100-SXM"])
def test_gpu_target_plans_its_trials_in_cost_order(tmp_path, tiny_llama, cache_dir, gpu):
    from forge.gpu import fit
    from forge.gpu.catalog import gpu as catalog_gpu
    from forge.model.shape import from_config_file

    recipe = write_recipe(tmp_path / "gpu.yaml", str(tiny_llama), name="auto-gpu",
                          target={"gpu": gpu, "engine": "vllm", "max_num_seqs": 8},
                          quantize={"method": "auto", "group_size": 32,
                                    "calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}},
                          eval={"tasks": [str(TASKS / "heldout_ppl.yaml")],
                                "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 0.1}]})
    plan = json.loads(forge_cli("plan", str(recipe), "--json", cache=cache_dir, check=0).stdout)
    trials = plan["trials"]
    usd = [t["usd_per_million_tokens"] for t in trials]
    assert usd == sorted(usd) and all(u > 0 for u in usd)
    assert not any(t["cached"] for t in trials)
    # the order is the fit model's: recompute one scheme's cost from the catalog
    shape = from_config_file(tiny_llama / "config.json")
    fp8 = fit.fit(shape, catalog_gpu(gpu), fit.Plan(method="fp8", engine="vllm", max_num_seqs=8))
    assert next(t for t in trials if t["scheme"] == "fp8 FP8-W8A8")["usd_per_million_tokens"] == pytest.approx(
        fp8.usd_per_million_tokens)
    schemes = [t["scheme"] for t in trials]
    assert schemes[0] in ("awq W4A16 g32", "gptq W4A16 g32")
    assert schemes.index("gptq W4A16 g32") < schemes.index("gptq W8A16 g32")
    # NVFP4 needs Blackwell: skipped here, with the reason
    assert any(s["candidate"].startswith("nvfp4") and "10.0" in s["why"] for s in plan["skipped"])
    human = forge_cli("plan", str(recipe), cache=cache_dir, check=0).stdout
    assert "method: auto plan" in human and schemes[0] in human


def test_a_mixed_precision_winner_labels_its_bf16_layers(tmp_path, tiny_llama):
    from types import SimpleNamespace

    from forge.steps.package import _labels

    recipe = _recipe(tmp_path, tiny_llama, candidates=[W4])
    base = SimpleNamespace(image=None, name="cpu-python311", engine="cpu", engine_version="x", cuda=None,
                           min_driver=None, versions=())
    manifests = {"quantize": {"output": {"digest": "sha256:00"}}}

    def labels(**overrides) -> dict:
        loaded = resolved(recipe, overrides=overrides)
        return dict(_labels(SimpleNamespace(recipe=loaded, input_manifests=manifests), base, None))

    trial = labels(quantize={**W4, "candidates": [], "ignore": ["lm_head", DAMAGED]})
    assert trial["dev.forge.quantization.auto"] == "true"
    assert trial["dev.forge.quantization.bf16_layers"] == f"lm_head,{DAMAGED}"
    assert trial["dev.forge.quantization.method"] == "gptq"
    plain = labels()   # not chosen by method: auto: no auto labels
    assert not any(k.startswith("dev.forge.quantization.auto") for k in plain)


def test_warnings_reach_the_user_when_no_candidate_passes(tmp_path, tiny_llama, monkeypatch):
    """Bug: the walk dropped what its trials' builds warned about (the remote step cache was down, ...), and with no
    winner run() also dropped the chosen build's warnings: the CLI, which prints outcome.build.warnings before
    exiting 3, printed none. Cheap: the trials' and the final build's step graphs are stand-ins (a failed gate)."""
    from types import SimpleNamespace

    from forge.core.errors import EvalGateError, ExitCode
    from forge.orchestrate import auto, build, pipeline

    rule = {"task": "heldout_ppl", "metric": "word_perplexity", "kind": "max_rel_increase", "threshold": 0.2,
            "limit": 0.2, "baseline": 10.0, "candidate": 20.0, "degradation": 1.0, "ci_low": 0.9, "ci_high": 1.1,
            "decision": "beyond"}   # far past the limit: no mixed-precision retry
    calls = []

    def fake_execute(loaded, store, **kw):
        calls.append(loaded)
        out = tmp_path / f"trial{len(calls)}"
        out.mkdir()
        verdict = json.dumps({"passed": False, "rules": [rule]}).encode()
        (out / "verdict.json").write_bytes(verdict)
        files = {"verdict.json": {"sha256": hashlib.sha256(verdict).hexdigest(), "size": len(verdict)}}
        entry = SimpleNamespace(out=out, manifest={"step": "gate", "facts": {"passed": False, "bytes": 1},
                                                   "seconds": 1.0, "output": {"files": files}})
        results = [SimpleNamespace(name=n, status="BUILT", entry=entry) for n in ("quantize", "gate")]
        warned = ["registry 127.0.0.1:9 is unreachable; building without the remote step cache",
                  f"trial {len(calls)} warned"]
        return build.BuildOutcome(results, None, warned)

    def fake_run(loaded, store, **kw):
        return pipeline.Outcome(build.BuildOutcome([], EvalGateError("eval gate failed:\n  heldout_ppl beyond"),
                                                   ["the final build warned", "trial 1 warned"]),
                                record=None, registry_root=tmp_path / "reg")

    monkeypatch.setattr(auto, "execute_one", fake_execute)   # where auto looks it up
    monkeypatch.setattr(pipeline, "run", fake_run)
    loaded = resolved(_recipe(tmp_path, tiny_llama, candidates=[W4, W8]))
    outcome = auto.run(loaded, Store(tmp_path / "cache"), report_dir=tmp_path / "out")
    assert len(calls) == 2 and outcome.decision.winner is None
    assert outcome.error is not None and outcome.exit_code == ExitCode.EVAL_GATE
    assert outcome.build.warnings == ["registry 127.0.0.1:9 is unreachable; building without the remote step cache",
                                      "trial 1 warned", "trial 2 warned", "the final build warned"]   # once each


@pytest.mark.parametrize("limit,degradation,ci_low,just", [
    (0.1, 0.35, 0.30, True),      # a positive limit: within JUST_FAILS (4) times it
    (0.1, 0.5, 0.45, False),      # 5x the limit: beyond reach
    (0.0, 0.25, 0.20, False),     # max_abs_drop: 0, a drop shown to be there: was retried ("just fails" for any limit <= 0)
    (0.0, 0.01, -0.02, True),     # max_abs_drop: 0, the interval reaches the limit
    (-0.1, 0.3, 0.2, False),      # min_recovery 1.1 (limit -0.1): far past it
    (-0.1, 0.0, -0.15, True),     # ... the interval reaches it
])
def test_just_fails_needs_the_limit_within_reach(limit, degradation, ci_low, just):
    """Bug: a rule whose limit is <= 0 counted as "just fails" whatever its degradation, so a scheme far past a
    max_abs_drop: 0 rule spent up to MIX_STEPS more trials on mixed precision that could not bring it back."""
    from forge.orchestrate.auto import Trial, _just_fails

    rule = {"limit": limit, "degradation": degradation, "ci_low": ci_low, "ci_high": degradation + 0.05,
            "decision": "beyond" if ci_low > limit else "likely beyond"}
    passing = {**rule, "limit": 1.0, "degradation": 0.0, "ci_low": -0.1, "ci_high": 0.1, "decision": "pass"}
    t = Trial("gptq W4A16 g32", (), {}, None, 1.0, rules=[passing, rule])
    assert _just_fails(t) is just
