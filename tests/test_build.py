"""The step graph and the cache: reuse, invalidation, atomicity, concurrency, no-op cost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.orchestrate.build import build, plan
from forge.core.digests import sha256_file
from conftest import resolved
from forge.store.local import Store


@pytest.fixture
def recipe(tmp_path, tiny_llama) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", str(tiny_llama))


def _statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def test_second_build_reuses_everything(recipe, cache_dir):
    store = Store(cache_dir)
    first = build(resolved(recipe), store)
    assert _statuses(first) == {"resolve": "BUILT", "quantize": "BUILT"}
    second = build(resolved(recipe), store)
    assert _statuses(second) == {"resolve": "HIT", "quantize": "HIT"}
    assert [r.key for r in first] == [r.key for r in second]
    assert [p.status for p in plan(resolved(recipe), store)] == ["HIT", "HIT"]


def test_plan_before_build_shows_miss_then_pending(recipe, cache_dir):
    steps = plan(resolved(recipe), Store(cache_dir))
    assert [(p.spec.name, p.status) for p in steps] == [("resolve", "MISS"), ("quantize", "PENDING")]


def test_downstream_setting_reruns_only_downstream(recipe, tmp_path, tiny_llama, cache_dir):
    store = Store(cache_dir)
    build(resolved(recipe), store)
    changed = write_recipe(tmp_path / "changed.yaml", str(tiny_llama), quantize={"ignore": ["lm_head", "embed_tokens"]})
    assert [p.status for p in plan(resolved(changed), store)] == ["HIT", "MISS"]
    assert _statuses(build(resolved(changed), store)) == {"resolve": "HIT", "quantize": "BUILT"}


def test_upstream_data_change_reruns_and_early_cutoff(tmp_path, tiny_llama, cache_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    recipe = write_recipe(tmp_path / "r.yaml", str(model))
    store = Store(cache_dir)
    build(resolved(recipe), store)
    # touching a file without changing its bytes: re-hashed (stat changed), same digest, all HIT
    os.utime(model / "config.json", ns=(time.time_ns(), time.time_ns()))
    assert _statuses(build(resolved(recipe), store)) == {"resolve": "HIT", "quantize": "HIT"}
    # changing a byte of the weights: resolve and everything below it rebuild
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_theta"] = 12345.0
    (model / "config.json").write_text(json.dumps(cfg))
    assert _statuses(build(resolved(recipe), store)) == {"resolve": "BUILT", "quantize": "BUILT"}


def test_tool_version_is_part_of_the_key(recipe, cache_dir, monkeypatch):
    import forge.executors.runner as runner

    store = Store(cache_dir)
    build(resolved(recipe), store)
    real = runner.tool_versions
    monkeypatch.setattr(runner, "tool_versions", lambda names: {**real(names), **({"transformers": "0.0.0"} if "transformers" in names else {})})
    assert [p.status for p in plan(resolved(recipe), store)] == ["MISS", "PENDING"]


def test_force_one_step(recipe, cache_dir):
    store = Store(cache_dir)
    build(resolved(recipe), store)
    first = build(resolved(recipe), store)[-1].entry
    (first.path / "stale-marker").write_text("from the first build")
    forced = build(resolved(recipe), store, force={"quantize"})
    assert _statuses(forced) == {"resolve": "HIT", "quantize": "BUILT"}
    # the forced output replaced the cached entry under the same key; nothing of the old one is left
    assert forced[-1].key == first.key and not (first.path / "stale-marker").exists()
    assert store.get(first.key).manifest == forced[-1].entry.manifest
    assert not list((cache_dir / "staging").iterdir())


def test_manifest_records_inputs_outputs_and_tools(recipe, cache_dir):
    results = build(resolved(recipe), Store(cache_dir))
    m = results[0].entry.manifest
    assert m["step"] == "resolve" and m["key"] == results[0].key
    assert set(m["inputs"]["tools"]) == {"transformers", "torch", "gguf", "safetensors", "huggingface_hub"}
    assert m["inputs"]["data"]["model"].startswith("sha256:")
    for rel, f in m["output"]["files"].items():
        assert sha256_file(results[0].entry.out / rel) == f["sha256"]
    assert "model.safetensors" in m["output"]["files"]


def test_noop_rebuild_reads_no_weight_file(recipe, cache_dir):
    forge_cli("build", str(recipe), cache=cache_dir, check=0)
    time.sleep(2.1)  # past the racy-clean window, so the memo may remember the source files
    forge_cli("build", str(recipe), cache=cache_dir, check=0)  # the memo now holds every source file
    probe = (
        "import sys, json\n"
        "opened = []\n"
        "sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == 'open' else None)\n"
        "sys.argv = ['forge', 'build', sys.argv[1]]\n"
        "from forge.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "sys.stderr.write('TORCH=%s ' % ('torch' in sys.modules))\n"
        "sys.stderr.write('OPENED=' + json.dumps([p for p in opened if p.endswith(('.safetensors', '.gguf'))]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True, cwd=REPO,
                          # one process: the audit hook must see the build itself, not a supervising parent
                          env={**os.environ, "FORGE_CACHE_DIR": str(cache_dir), "FORGE_NO_SUPERVISOR": "1"})
    assert "HIT" in proc.stdout and "BUILT" not in proc.stdout, proc.stdout + proc.stderr
    opened = json.loads(proc.stderr.split("OPENED=")[-1])
    assert opened == [], f"a no-op rebuild opened weight files: {opened}"
    assert "TORCH=False" in proc.stderr  # planning never imports the heavy libraries


def test_sigkill_before_commit_leaves_nothing_trusted(recipe, cache_dir):
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache_dir), "FORGE_TEST_STOP_BEFORE_COMMIT": "quantize"}
    proc = subprocess.Popen([sys.executable, "-m", "forge", "build", str(recipe)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = cache_dir / "quantize.stopped"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(cache_dir)
    # the staged quantize output is complete on disk, but it was never committed: not trusted
    assert any((cache_dir / "staging").iterdir())
    assert [p.status for p in plan(resolved(recipe), store)] == ["HIT", "MISS"]
    results = build(resolved(recipe), store)
    assert _statuses(results) == {"resolve": "HIT", "quantize": "BUILT"}
    removed = store.prune(older_than_s=None, everything=False, dry_run=False)
    assert [w for w, *_ in removed] == ["staging"]
    assert _statuses(build(resolved(recipe), store)) == {"resolve": "HIT", "quantize": "HIT"}


def test_concurrent_builds_share_one_result(recipe, cache_dir):
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-m", "forge", "build", str(recipe)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    built = sum(o[0].count("BUILT") for o in outs)
    assert built == 2, outs  # each step built exactly once across both builds; the other reused it
    entries = Store(cache_dir).entries()
    assert sorted(e.step for e in entries) == ["quantize", "resolve"]
    assert not any((cache_dir / "staging").iterdir())


def test_a_terminated_build_stops_cleanly_and_the_rerun_goes_on(tmp_path, tiny_llama, cache_dir):
    """SIGTERM (a CI job cancelled) to `forge build` while a step runs: the step's staging is removed and nothing is
    committed, as on Ctrl-C, exit 143 with a line that says so. Dying of the signal, as before, skipped every
    cleanup: the staging stayed, and a smoke test's server (its own session) kept running with nobody to stop it."""
    recipe = write_recipe(tmp_path / "fp8.yaml", str(tiny_llama), quantize={"method": "fp8"})   # reference: seconds
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "forge", "build", str(recipe)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = cache_dir / "staging"
    deadline = time.monotonic() + 300
    steps = cache_dir / "steps"
    while not (staging.is_dir() and any(staging.iterdir()) and len(list(steps.iterdir())) == 1):   # after resolve
        assert proc.poll() is None and time.monotonic() < deadline, "no step after resolve was seen running"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): nothing partial was committed; rerun to continue" in err
    assert not any(staging.iterdir())
    assert _committed(cache_dir) == ["resolve"]
    rerun = forge_cli("build", str(recipe), cache=cache_dir, check=0)
    assert rerun.stdout.count("HIT") == 1 and rerun.stdout.count("BUILT") == 2   # resolve reused


def _committed(cache_dir) -> list[str]:
    return [e.step for e in Store(cache_dir).entries()] if (cache_dir / "steps").is_dir() else []


def test_cache_ls_and_prune_cli(recipe, cache_dir):
    forge_cli("build", str(recipe), cache=cache_dir, check=0)
    listed = json.loads(forge_cli("cache", "ls", "--json", cache=cache_dir, check=0).stdout)
    assert sorted(r["step"] for r in listed) == ["quantize", "resolve"]
    dry = forge_cli("cache", "prune", "--all", "--dry-run", cache=cache_dir, check=0)
    assert "would remove 3 item(s)" in dry.stdout and "would remove report" in dry.stdout   # the drawn page too
    forge_cli("cache", "prune", "--all", cache=cache_dir, check=0)
    assert json.loads(forge_cli("cache", "ls", "--json", cache=cache_dir, check=0).stdout) == []
    assert not list((cache_dir / "report-pages").glob("*.html"))


def test_build_force_flag_forms(recipe, cache_dir):
    forge_cli("build", str(recipe), cache=cache_dir, check=0)
    all_forced = forge_cli("build", "--force", str(recipe), cache=cache_dir, check=0)
    assert all_forced.stdout.count("BUILT") == 2
    one = forge_cli("build", str(recipe), "--force", "quantize", cache=cache_dir, check=0)
    assert one.stdout.count("BUILT") == 1
    bad = forge_cli("build", str(recipe), "--force", "quantise", cache=cache_dir)
    assert bad.returncode == 2 and "unknown step(s) quantise" in bad.stderr


PROBED_TOOLS = ("nvidia-smi", "buildah", "podman", "docker", "trivy", "skopeo", "mmdebstrap", "trtllm-build", "pip", "pip3")


def _recording_standins(tmp_path) -> tuple[Path, Path]:
    """Every external tool forge may probe, as a stand-in that records that it was started."""
    bindir, log = tmp_path / "bin", tmp_path / "started.log"
    bindir.mkdir()
    for tool in PROBED_TOOLS:
        (bindir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\necho "{tool} version 1.0"\n')
        (bindir / tool).chmod(0o755)
    return bindir, log


def test_plan_starts_no_external_tool(tmp_path, tiny_llama, cache_dir, monkeypatch):
    from forge.steps import Unprobed, no_probes
    from forge.steps import scan as scan_step

    bindir, log = _recording_standins(tmp_path)
    recipe = write_recipe(tmp_path / "image.yaml", str(tiny_llama), container={"base": "cpu-python311"},
                          scan={"required": False})
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}

    def planned() -> dict:
        steps = json.loads(forge_cli("plan", "--json", str(recipe), cache=cache_dir, env=env, check=0).stdout)
        return {p["step"]: (p["status"], p["reason"]) for p in steps}

    steps = planned()
    assert steps["resolve"] == ("MISS", None)
    # the base image's key names buildah's and mmdebstrap's versions: never probed here, so it waits, saying why
    assert steps["base_image"] == ("PENDING", "needs `buildah --version` (not remembered yet), probed when the build runs")
    assert steps["quantize"] == ("PENDING", "after resolve") and steps["scan"][0] == "PENDING"
    assert not log.exists(), log.read_text()

    # what a build remembers (tool-versions.json, by binary path, size and mtime) gives the key without a probe
    memo = {}
    for tool in ("buildah", "mmdebstrap"):
        st = (bindir / tool).stat()
        memo[f"{bindir / tool}:{st.st_size}:{st.st_mtime_ns}"] = f"{tool} version 1.0"
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "tool-versions.json").write_text(json.dumps(memo))
    steps = planned()
    assert steps["base_image"][0] == "MISS"
    assert not log.exists(), log.read_text()

    # trivy's DB date is key material and is never remembered: a plan does not ask, the build does
    monkeypatch.setenv("PATH", env["PATH"])
    with no_probes(), pytest.raises(Unprobed, match="trivy version"):
        scan_step.SPEC.identity(resolved(recipe))
    assert not log.exists()
