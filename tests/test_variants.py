"""Recipe variants: one graph over all variants (shared steps once), per-variant gates and records, --variant,
and validate checking every variant against the GPU it names."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.orchestrate.build import execute, execute_one, plan
from forge.executors.process import ProcessExecutor
from conftest import resolved
from forge.registry import LocalRegistry
from forge.store.local import Store

TASKS = REPO / "evals" / "tasks"
DEMO = REPO / "recipes" / "smollm2-135m-variants.yaml"


def _recipe(tmp_path, model, *, variant_list, name="tiny", gate=0.0, **sections):
    """A tiny-model recipe with an eval gate; ``gate`` 0.0: any degradation fails it (method none passes)."""
    return write_recipe(tmp_path / f"{name}.yaml", str(model), name=name, quantize={"method": "none"},
                        eval={"tasks": [str(TASKS / "heldout_ppl.yaml")], "limit": 6,
                              "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": gate}]},
                        variants=variant_list, **sections)


TWO = [{"name": "plain"}, {"name": "fp8", "quantize": {"method": "fp8"}}]


@pytest.fixture
def two(tmp_path, tiny_llama):
    return _recipe(tmp_path, tiny_llama, variant_list=TWO)


def test_plan_shows_resolve_and_the_baseline_eval_shared(two, tmp_path):
    proc = forge_cli("plan", str(two), "--json", cache=tmp_path / "cache", check=0)
    nodes = json.loads(proc.stdout)["nodes"]
    by_step = {}
    for n in nodes:
        by_step.setdefault(n["step"], []).append(n)
    assert [n["variants"] for n in by_step["resolve"]] == [["plain", "fp8"]]
    assert [n["variants"] for n in by_step["eval_baseline"]] == [["plain", "fp8"]]
    for step in ("quantize", "eval_candidate", "gate"):   # the overrides reach these: one node per variant
        assert sorted(n["variants"][0] for n in by_step[step]) == ["fp8", "plain"] and not any(
            n["shared"] for n in by_step[step]), step
    ids = {n["id"]: n["step"] for n in nodes}
    assert {ids[d] for d in by_step["eval_baseline"][0]["depends"]} == {"resolve"}
    text = forge_cli("plan", str(two), cache=tmp_path / "cache", check=0).stdout
    assert [n["variants"] for n in by_step["reference"]] == [["fp8"]]   # plain quantizes nothing: no reference
    assert "shared by: plain, fp8" in text and "9 nodes, 2 shared" in text


def test_shared_steps_run_once_and_digests_equal_single_variant_builds(two, tmp_path):
    built = []
    loaded = [resolved(two, variant=n) for n in ("plain", "fp8")]
    executor = ProcessExecutor(max_parallel=2)   # a worker process per step: answers come back in any order
    outcomes = execute(loaded, Store(tmp_path / "cache"), executor=executor,
                       on_done=lambda name, r, vs: built.append((r.name, r.status, tuple(vs))))
    assert executor.peak == 2   # independent nodes (the two quantizes, the baseline eval) were handed out together
    assert sorted(s for s, status, _ in built if status == "BUILT") == sorted(
        ["resolve", "reference", "eval_baseline", "quantize", "quantize", "eval_candidate", "eval_candidate", "gate",
         "gate"])
    assert ("resolve", "BUILT", ("plain", "fp8")) in built and ("eval_baseline", "BUILT", ("plain", "fp8")) in built
    assert outcomes["plain"].passed and not outcomes["fp8"].passed     # fp8 moved the perplexity; 0.0 allowed
    # a variant's steps, shared or not, are what a build of that variant alone makes (in a fresh cache)
    alone = execute_one(resolved(two, variant="fp8"), Store(tmp_path / "alone"))
    assert [(r.name, r.key, r.output_digest) for r in alone.results] == \
           [(r.name, r.key, r.output_digest) for r in outcomes["fp8"].results]
    for step in ("resolve", "eval_baseline"):   # the shared ones are the same entries in both variants
        assert outcomes["plain"].by_name[step].key == alone.by_name[step].key
    # the plan after the build: every node a HIT, shared ones still once
    nodes = plan(loaded, Store(tmp_path / "cache"))
    assert {n.status for n in nodes} == {"HIT"} and [n.step for n in nodes if n.shared] == ["resolve", "eval_baseline"]


def test_a_failing_gate_rejects_its_variant_alone_exit_3(two, tmp_path):
    reg = tmp_path / "registry"
    proc = forge_cli("build", str(two), "--registry-dir", str(reg), cache=tmp_path / "cache")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "eval gate failed" in proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()[:1] in (["plain"], ["fp8"])}
    assert "gated" in rows["plain"] and "pass" in rows["plain"]      # no container section: gated, not validated
    assert "rejected" in rows["fp8"] and "FAIL word_perplexity" in rows["fp8"]
    records = {r.method: r for r in LocalRegistry(reg).ls(name="tiny")}
    assert records["none"].status == "gated" and records["fp8"].status == "rejected"
    assert "eval gate failed" in records["fp8"].reason
    # the shared steps appear once in the progress lines
    assert sum(1 for line in proc.stdout.splitlines() if "resolve (shared: 2)" in line and "BUILT" in line) == 1
    # --variant builds only the one named (everything it needs is a HIT now)
    again = forge_cli("build", str(two), "--variant", "plain", "--json", "--registry-dir", str(reg),
                      cache=tmp_path / "cache", check=0)
    data = json.loads(again.stdout)
    assert list(data["variants"]) == ["plain"]
    assert {s["status"] for s in data["variants"]["plain"]["steps"]} == {"HIT"}


def test_variant_names_are_checked(two, tmp_path, tiny_llama):
    for cmd in ("build", "plan", "validate"):
        proc = forge_cli(cmd, str(two), "--variant", "fp9", cache=tmp_path / "cache")
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "no variant named 'fp9'; its variants: plain, fp8" in proc.stderr
    plain = write_recipe(tmp_path / "plain.yaml", str(tiny_llama))
    proc = forge_cli("plan", str(plain), "--variant", "x", cache=tmp_path / "cache")
    assert proc.returncode == 2 and "the recipe declares no variants" in proc.stderr


def test_validate_checks_every_variant_against_its_gpu(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama, variant_list=[
        {"name": "cpu"},
        {"name": "vllm-fp8-l4", "target": {"gpu": "L4", "engine": "vllm"}, "quantize": {"method": "fp8"}},
        {"name": "trtllm-fp8-a10g", "target": {"gpu": "A10G", "engine": "trtllm"}, "quantize": {"method": "fp8"}},
        {"name": "vllm-nvfp4-l4", "target": {"gpu": "L4", "engine": "vllm"}, "quantize": {"method": "nvfp4"}},
        {"name": "too-big", "target": {"gpu": "L4", "engine": "vllm", "max_model_len": 2 ** 21,
                                       "max_num_seqs": 65536}},
    ])
    proc = forge_cli("validate", str(recipe), cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = {line.split()[1].rstrip(":"): line for line in proc.stdout.splitlines() if line[:1] in "✓✗"}
    assert lines["cpu"].startswith("✓") and lines["vllm-fp8-l4"].startswith("✓") and "fits L4" in lines["vllm-fp8-l4"]
    assert lines["trtllm-fp8-a10g"].startswith("✗") and "A10G has 8.6" in lines["trtllm-fp8-a10g"]
    assert lines["vllm-nvfp4-l4"].startswith("✗") and "needs compute capability >= 10.0" in lines["vllm-nvfp4-l4"]
    assert lines["too-big"].startswith("✗") and "does not fit L4" in lines["too-big"]
    assert "3 of 5 variant(s) invalid: trtllm-fp8-a10g, vllm-nvfp4-l4, too-big" in proc.stderr
    # a build refuses before running anything, naming the variant
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache")
    assert proc.returncode == 2 and "(in variant 'trtllm-fp8-a10g')" in proc.stderr
    assert not (tmp_path / "cache" / "steps").exists() or not any((tmp_path / "cache" / "steps").iterdir())


def test_gpu_variants_package_on_standin_bases_tagged_by_variant(tmp_path, tiny_llama, standin_bases):
    """Two vLLM variants for two GPUs: one FP8 checkpoint, eval and gate (shared), an image each, tagged
    <name>:<variant>; the records say each GPU."""
    recipe = _recipe(tmp_path, tiny_llama, gate=5.0, variant_list=[
        {"name": "vllm-fp8-l4-tp1", "target": {"gpu": "L4"}},
        {"name": "vllm-fp8-h100-sxm-tp1", "target": {"gpu": "H100-SXM", "max_num_seqs": 8}}],
        target={"gpu": "L4", "engine": "vllm", "max_model_len": 256, "max_num_seqs": 4},
        container={"base": "vllm-0.11-cu128"}, scan={"required": False})
    data = json.loads(recipe.read_text())
    data["quantize"] = {"method": "fp8"}
    recipe.write_text(json.dumps(data))
    reg = tmp_path / "registry"
    proc = forge_cli("build", str(recipe), "--registry-dir", str(reg), cache=tmp_path / "cache", env=standin_bases)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = {r.variant: r for r in LocalRegistry(reg).ls(name="tiny") if r.kind == "image"}
    assert set(records) == {"vllm-fp8-l4-tp1", "vllm-fp8-h100-sxm-tp1"}
    l4, h100 = records["vllm-fp8-l4-tp1"], records["vllm-fp8-h100-sxm-tp1"]
    assert (l4.target_gpu, h100.target_gpu) == ("L4", "H100-SXM") and l4.status == h100.status == "unscanned"
    # container.weights: image (the GPU default): one weights-free serving image for the base, a model image each
    # (the engine's command for each differs: max_num_seqs), their shard layers the same blobs
    assert l4.model_digest == h100.model_digest and l4.image_digest == h100.image_digest
    assert l4.model_image_digest != h100.model_image_digest
    registry = LocalRegistry(reg)
    shards = [[la["digest"] for la in json.loads(registry.blobs.read(r.model_image_digest))["layers"]][:-1]
              for r in (l4, h100)]
    assert shards[0] == shards[1] and shards[0]
    assert LocalRegistry(reg).resolve("tiny:vllm-fp8-h100-sxm-tp1").id == h100.id
    for step in ("resolve", "reference", "quantize", "eval_baseline", "eval_candidate", "gate"):
        assert f"{step} (shared: 2)" in proc.stdout, step
    assert "package · vllm-fp8-l4-tp1" in proc.stdout and "package · vllm-fp8-h100-sxm-tp1" in proc.stdout


def test_demo_recipe_plans_four_variants_sharing_the_checkpoint(tmp_path):
    out = json.loads(forge_cli("plan", str(DEMO), "--json", cache=tmp_path / "cache", check=0).stdout)
    assert out["variants"] == ["cpu-fp8", "vllm-fp8-l4-tp1", "vllm-fp8-h100-sxm-tp1", "vllm-cpu-fp8"]
    assert sum(n["step"] == "base_image" for n in out["nodes"]) == 2   # forge's two bases: cpu-python311, vllm-0.32-cpu
    shared = {n["step"] for n in out["nodes"] if n["shared"]}
    assert {"resolve", "reference", "eval_baseline", "quantize", "eval_candidate", "gate"} <= shared
    assert sorted(n["variants"][0] for n in out["nodes"] if n["step"] == "package") == sorted(out["variants"])


@pytest.mark.e2e
@pytest.mark.xdist_group("demo")   # on the worker that built the demo
def test_demo_variants_build_cpu_and_two_gpu_images(tmp_path, standin_bases, demo_build):
    """The variants demo on the real SmolLM2, in the demo build's cache: its shared sections are the demo's, so
    the snapshot, the FP8 checkpoint, both evals and the gate are hits (each shown once, for all three variants);
    the CPU image (smoke-tested here) and two vLLM images on stand-in bases are built; three records, each tagged
    <name>:<variant>, and the variant matrix listing them. (The vLLM CPU variant builds on the vllm worker:
    tests/test_vllm_e2e.py; here it would add the vLLM base build to this worker's time.)"""
    reg = tmp_path / "registry"
    three = [x for v in ("cpu-fp8", "vllm-fp8-l4-tp1", "vllm-fp8-h100-sxm-tp1") for x in ("--variant", v)]
    proc = forge_cli("build", str(DEMO), *three, "--registry-dir", str(reg), cache=demo_build["cache"],
                     env={**demo_build["env"], **standin_bases}, timeout=3600)
    (tmp_path / "demo-variants.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    registry = LocalRegistry(reg)
    records = {r.variant: r for r in registry.ls(name="smollm2-135m") if r.kind == "image"}
    assert set(records) == {"cpu-fp8", "vllm-fp8-l4-tp1", "vllm-fp8-h100-sxm-tp1"}
    assert {r.status for r in records.values()} == {"unscanned"}      # scan.required: false (no Trivy here)
    # the shared gate ran with transformers on this CPU: the CPU image's own numerics, a proxy for the vLLM images
    assert {v: bool(r.eval_proxy) for v, r in records.items()} == {
        "cpu-fp8": False, "vllm-fp8-l4-tp1": True, "vllm-fp8-h100-sxm-tp1": True}
    assert {v: r.smoke_test for v, r in records.items()} == {   # the CPU image served here; a GPU image never failed
        "cpu-fp8": "passed", "vllm-fp8-l4-tp1": "not smoke-tested: no L4 here",
        "vllm-fp8-h100-sxm-tp1": "not smoke-tested: no H100-SXM here"}
    listed = forge_cli("registry", "ls", "--registry-dir", str(reg), check=0).stdout
    assert listed.count("pass (proxy)") == 2, listed
    shown = forge_cli("registry", "show", "smollm2-135m:vllm-fp8-l4-tp1", "--registry-dir", str(reg), check=0).stdout
    assert "transformers (lm-eval hf) on cpu; ships vllm on L4 (a proxy's numbers)" in shown
    assert {r.target_gpu for r in records.values()} == {"CPU", "L4", "H100-SXM"}
    # the CPU image (baked) and one weights-free vLLM serving image shared by the two GPU variants (container.weights:
    # image, the GPU default), each with its own model image
    assert len({r.model_digest for r in records.values()}) == 1 and len({r.image_digest for r in records.values()}) == 2
    assert records["cpu-fp8"].weights == "baked" and records["vllm-fp8-l4-tp1"].weights == "image"
    assert records["vllm-fp8-l4-tp1"].model_image_digest != records["vllm-fp8-h100-sxm-tp1"].model_image_digest
    for step in ("resolve", "reference", "quantize", "eval_baseline", "eval_candidate", "gate"):
        assert sum(f"{step} (shared: 3)" in line for line in proc.stdout.splitlines()) == 1, step
    assert {r.model_digest for r in records.values()} == {demo_build["digests"]["quantize"]}   # the demo's checkpoint
    for name, rec in records.items():
        assert registry.resolve(f"smollm2-135m:{name}").id == rec.id
