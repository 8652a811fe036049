"""What cannot fit this host's memory is refused with the numbers before a weight is read (issue 28): the need
model against forge's own measured peaks, `forge validate` (exit 2), the step itself (exit 5), `forge fit`."""
from __future__ import annotations

import json
import struct

import pytest

from conftest import REPO, forge_cli, resolved, write_recipe

from forge.core.errors import ResourceError
from forge.gpu import host_fit
from forge.model.shape import from_config

QWEN14B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
           "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 48,
           "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("result,method,calibrates,dtype", [
    ("scale-llama-3.2-3b-fp8", "fp8", False, None), ("scale-ci-1gb-fp8", "fp8", False, None),
    ("scale-llama-3.2-3b-gptq", "gptq", True, "float32"), ("scale-ci-1gb-gptq", "gptq", True, "float32"),
])
def test_the_need_covers_the_peak_forge_measured_and_does_not_overstate_it(result, method, calibrates, dtype):
    """The factors are fitted to bench/results: the need is never below the measured peak RSS of forge's quantize
    step (load, quantize, export, verify), and at most 25 % above it."""
    data = json.loads((REPO / "bench" / "results" / f"{result}.json").read_text())
    peak = data[f"forge_{method}"]["quantize_peak_rss_gb"] * 1e9
    (need,) = host_fit.needs_for(data["hashlib"]["bytes"], method, calibrates=calibrates, evaluates=False, dtype=dtype)
    assert peak <= need.bytes <= 1.25 * peak, (need.bytes / 1e9, peak / 1e9)


def test_the_streamed_need_covers_the_peak_forge_measured():
    """Streamed FP8 on the 3B shape (bench/scale.py --streaming): what ``streaming_workers`` admits for the shards
    the step ran at once (1.2 x the largest shard each + the libraries) is never below the build's measured peak
    RSS (reference, quantize and verification), and at most 60 % above it."""
    data = json.loads((REPO / "bench" / "results" / "scale-llama-3.2-3b-streaming.json").read_text())
    run = data["forge_fp8_streamed"]
    peak = run["peak_rss_gb"] * 1e9
    admitted = host_fit.LIBRARIES + run["quantize"]["workers"] * host_fit.FACTORS["shard"] * data["model"]["largest_shard_bytes"]
    assert peak <= admitted <= 1.6 * peak, (admitted / 1e9, peak / 1e9)


def test_a_14b_model_on_a_24_gib_machine_is_refused_with_the_numbers_and_what_to_do(monkeypatch):
    shape = from_config(QWEN14B)
    needs = host_fit.needs(shape, "gptq", calibrates=True, evaluates=True, device="cpu")
    short = dict((n.step, msg) for n, msg in host_fit.shortfalls(needs, available=23.4e9))
    assert set(short) == {"quantize", "eval"}
    assert "gptq loads the whole model" in short["quantize"] and short["quantize"].endswith("23.4 GB available")
    assert "29.5 GB BF16" in short["quantize"] and "float32 on the CPU" in short["eval"]
    assert host_fit.needs(shape, "gptq", calibrates=True, evaluates=True, device="cuda") == ()   # VRAM: forge fit
    fp8 = host_fit.needs(shape, "fp8", calibrates=False, evaluates=False, device="cpu")
    assert [round(n.bytes / 1e9, 1) for n in fp8] == [45.4]   # 1.5 x 29.5 GB + 1.1 GB
    assert host_fit.shortfalls(fp8, available=64e9) == []
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 23.4e9)
    with pytest.raises(ResourceError, match=r"^eval_candidate: eval needs 60.2 GB of host memory .* 23.4 GB available; "
                                            r"the kernel would kill the build$") as e:
        host_fit.require(needs, "eval_candidate")
    assert e.value.exit_code == 5 and e.value.hint.startswith("Evaluate where a GPU is")
    host_fit.require(needs, "gate")   # a step that holds no model is never refused


def _sparse_model(root, config: dict):
    """A model directory whose safetensors file has a valid header and the full size, as a sparse file: validate
    reads headers and sizes, never the (absent) bytes."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    shape = from_config(config)
    header = json.dumps({"weights": {"dtype": "BF16", "shape": [shape.total_params],
                                     "data_offsets": [0, 2 * shape.total_params]}}).encode()
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * shape.total_params)


def test_forge_validate_refuses_a_model_this_host_cannot_quantize_exit_2(tmp_path):
    """In memory (FORGE_STREAMING=0) the 14B FP8 build is refused here; streamed it is valid (the next test)."""
    _sparse_model(tmp_path / "model", QWEN14B)
    recipe = write_recipe(tmp_path / "r.yaml", "./model", quantize={"method": "fp8"})
    proc = forge_cli("validate", str(recipe), timeout=120, env={"FORGE_STREAMING": "0"})
    need = host_fit.needs(from_config(QWEN14B), "fp8", calibrates=False, evaluates=False, device="cpu")[0].bytes
    if host_fit.available_bytes() >= need:
        pytest.skip(f"this host has {host_fit.available_bytes() / 1e9:.0f} GB: the 14B shape fits it")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "quantize.method: quantize needs 45.4 GB of host memory (fp8 loads the whole model" in proc.stderr
    assert "Quantize where a GPU is" in proc.stderr


def test_a_streamed_fp8_build_of_the_14b_shape_fits_a_24_gib_machine(tmp_path):
    """Streamed, FP8 holds one 5 GB shard (the size assumed before the files are seen) or one block, never the
    model: 7.3 GB of the 24 GiB machine's 23.4 GB available, where in memory it needs 45.4 GB; validate says valid."""
    shape = from_config(QWEN14B)
    (need,) = host_fit.needs(shape, "fp8", calibrates=False, evaluates=False, device="cpu", streams=True)
    assert round(need.bytes / 1e9, 1) == 7.3 and "it never holds the model" in need.why
    assert host_fit.shortfalls((need,), available=23.4e9) == []
    (held,) = host_fit.needs(shape, "fp8", calibrates=False, evaluates=False, device="cpu", streams=False)
    assert round(held.bytes / 1e9, 1) == 45.4
    # calibrated methods do not stream: still refused
    (gptq,) = host_fit.needs(shape, "gptq", calibrates=True, evaluates=False, device="cpu", streams=False)
    assert host_fit.shortfalls((gptq,), available=23.4e9)
    _sparse_model(tmp_path / "model", QWEN14B)
    recipe = write_recipe(tmp_path / "r.yaml", "./model", quantize={"method": "fp8"})
    proc = forge_cli("validate", str(recipe), timeout=120, env={"FORGE_STREAMING": "1"})
    if host_fit.available_bytes() < need.bytes:
        pytest.skip(f"this host has {host_fit.available_bytes() / 1e9:.0f} GB: less than the streamed need")
    assert proc.returncode == 0, proc.stderr


def test_streaming_workers_follow_cores_and_memory_and_refuse_a_shard_that_cannot_fit(tmp_path):
    """One shard per core, as many as memory holds; a shard too large for the memory is refused with the numbers."""
    model = tmp_path / "m"
    model.mkdir()
    for i in range(4):
        with open(model / f"model-{i}.safetensors", "wb") as f:
            f.truncate(2 * 10**9)   # sparse: sizes are all that count
    per_shard = host_fit.FACTORS["shard"] * 2e9
    assert host_fit.streaming_workers(model, available=host_fit.LIBRARIES + per_shard, device="cuda") == 1
    assert host_fit.streaming_workers(model, available=1e12, device="cuda") == min(4, len(__import__("os").sched_getaffinity(0)))
    assert host_fit.streaming_workers(model, available=1e12, device="cpu") == 1   # the library runs CPU jobs in turn
    with pytest.raises(ResourceError, match=r"^quantize: streaming needs 3.5 GB of host memory for its largest shard "
                                            r"\(1.2 x 2.0 GB \+ 1.1 GB libraries\); 2.0 GB available$") as e:
        host_fit.streaming_workers(model, available=2e9)
    assert e.value.exit_code == 5 and "max_shard_size" in e.value.hint


def test_the_quantize_step_refuses_before_loading_a_weight_exit_5(tmp_path, monkeypatch):
    """The runner asks before the step runs (where the step runs: any executor's worker)."""
    from forge.executors.runner import _build
    from forge.steps.quantize import SPEC
    from forge.store.local import Store

    monkeypatch.setenv("FORGE_STREAMING", "0")   # in memory: the 14B FP8 build holds the model
    _sparse_model(tmp_path / "model", QWEN14B)
    loaded = resolved(write_recipe(tmp_path / "r.yaml", "./model", quantize={"method": "fp8"}), target=False)
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 23.4e9)
    with pytest.raises(ResourceError) as e:
        _build(SPEC, "k" * 64, {}, loaded, Store(tmp_path / "cache"), {}, lambda *a, **k: None, replace=False)
    assert e.value.exit_code == 5 and "23.4 GB available" in e.value.message and "Quantize where a GPU is" in e.value.hint
    assert not (tmp_path / "cache" / "steps").exists() or not any((tmp_path / "cache" / "steps").iterdir())


def test_an_in_memory_reference_step_of_a_model_larger_than_memory_is_refused_exit_5(tmp_path, monkeypatch):
    """FORGE_STREAMING=0: the reference step loads the whole model, which transformers maps and pages from disk for
    each greedy token (the 14B shape here: still running after 21 minutes). It is refused before it starts, with
    the numbers and the way out; streamed (the default) it holds one decoder layer and is not refused."""
    from forge.executors.runner import _build
    from forge.steps.reference import SPEC
    from forge.store.local import Store

    _sparse_model(tmp_path / "model", QWEN14B)
    recipe = write_recipe(tmp_path / "r.yaml", "./model", quantize={"method": "fp8"})
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 23.4e9)
    monkeypatch.setenv("FORGE_STREAMING", "0")
    loaded = resolved(recipe, target=False)
    with pytest.raises(ResourceError) as e:
        _build(SPEC, "k" * 64, {}, loaded, Store(tmp_path / "cache"), {}, lambda *a, **k: None, replace=False)
    assert e.value.exit_code == 5 and e.value.message.startswith("reference: reference needs 30.6 GB of host memory "
                                                                 "(FORGE_STREAMING=0 loads the whole model")
    assert e.value.message.endswith("23.4 GB available; transformers would page the model from disk for each token")
    assert "Unset FORGE_STREAMING" in e.value.hint
    monkeypatch.setenv("FORGE_STREAMING", "1")
    assert not any(n.step == "reference" for n in resolved(recipe, target=False).host_needs)


@pytest.mark.parametrize("target,base,holds", [
    ({"gpu": "CPU", "engine": "cpu"}, "cpu-python311", "cpu holds the weights in BF16: 29.5 GB"),
    ({"gpu": "CPU-AVX2", "engine": "vllm"}, "vllm-0.32-cpu", "vllm holds the checkpoint as written: 29.5 GB + "),
])
def test_a_cpu_image_of_a_model_larger_than_memory_is_not_smoke_tested_and_says_why(tmp_path, monkeypatch, target,
                                                                                      base, holds):
    """A CPU image whose model does not fit this host's memory is not served (its server would map the weights and
    page them from disk until the smoke test timed out): the package step says so with the numbers, at once."""
    from types import SimpleNamespace

    from forge.steps import package

    _sparse_model(tmp_path / "model", QWEN14B)
    recipe = write_recipe(tmp_path / "r.yaml", "./model", target=target, container={"base": base})
    loaded = resolved(recipe, target=False)
    spec = SimpleNamespace(base=loaded.base)
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 23.4e9)
    why = package._no_room_to_serve(loaded, spec, tmp_path / "model")
    assert why.startswith("not smoke-tested: serve needs ") and holds in why, why
    assert why.endswith("23.4 GB available; served here, it would page the weights from disk"), why
    # the smoke test records that reason as it records any other, and starts nothing
    from forge.image import smoketest

    monkeypatch.setattr(smoketest, "serving", lambda *a, **k: pytest.fail("a server was started"))
    said = smoketest.smoke_test("t", spec, print, keep=tmp_path / "keep", skip=why)
    assert said == {"passed": None, "skipped": why, "answer": None, "health_seconds": None, "models": None}
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 64e9)
    assert package._no_room_to_serve(loaded, spec, tmp_path / "model") is None


def test_forge_fit_gives_the_build_side_figure_per_method(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(QWEN14B))
    proc = forge_cli("fit", "--model", str(tmp_path / "m"), "--gpu", "H100-SXM", "--method", "fp8", "--json", check=0)
    here = json.loads(proc.stdout)["build_on_this_cpu"]
    assert here["needs_gb"]["fp8"]["quantize"] == 7.3 and here["needs_gb"]["fp8"]["eval"] == 60.2   # FP8 streams
    assert here["needs_gb"]["gptq"]["quantize"] > 45
    # GPTQ and AWQ calibrate with the weights offloaded to disk where the model does not fit (tests/test_offload.py)
    assert 5 < here["needs_gb"]["gptq"]["quantize_offloaded"] < 20 and "quantize_offloaded" in here["needs_gb"]["awq"]
    assert "quantize_offloaded" not in here["needs_gb"]["int8"] and "quantize_offloaded" not in here["needs_gb"]["fp8"]
    assert set(here["needs_gb"]) == {"awq", "gptq", "fp8", "int8"} and here["available_gb"] > 0
    text = forge_cli("fit", "--model", str(tmp_path / "m"), "--gpu", "H100-SXM", "--method", "fp8", check=0).stdout
    assert "building on this CPU" in text and "fits here" in text and "offloaded to disk" in text


@pytest.mark.parametrize("memory_gb,dtype", [(64, "float32"), (20, "bfloat16")])
def test_the_calibration_need_follows_the_dtype_the_quantize_step_picks(monkeypatch, memory_gb, dtype):
    """On a CPU without native bf16 the quantize step calibrates in float32 only when the float32 model takes at
    most half of the memory (forge.steps.quantize.calibration_dtype); the estimate uses the same rule, so a 3B
    model on 20 GB is not refused for a float32 load that would not happen."""
    from forge.core import host

    monkeypatch.setattr(host, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(host, "memory_bytes", lambda: memory_gb * 10**9)
    monkeypatch.delenv("FORGE_CPU_CALIBRATION_DTYPE", raising=False)
    shape = from_config({**QWEN14B, "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
                         "num_hidden_layers": 28, "num_key_value_heads": 8, "vocab_size": 49152,
                         "tie_word_embeddings": True})   # the 3B shape of bench/results: 5.9 GB BF16
    (need,) = host_fit.needs(shape, "gptq", calibrates=True, evaluates=False, device="cpu")
    assert f"calibrates it in {dtype}" in need.why
    factor = host_fit.FACTORS["float32" if dtype == "float32" else "bfloat16"]
    assert need.bytes == pytest.approx(factor * host_fit.bf16_bytes(shape) + host_fit.LIBRARIES)


def test_a_build_killed_by_the_kernel_names_the_step_and_its_peak_rss_exit_5(tmp_path, tiny_llama):
    """The default executor runs steps in the build's own process; the kernel's OOM killer sends it SIGKILL, which
    nothing can catch. `forge build` runs the build in a child and waits (forge.cli.supervise): it outlives the kill
    and says what happened. The kill is sent here the way the kernel sends it, to the process holding the weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), quantize={"method": "fp8"})
    cache = tmp_path / "cache"
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache), "FORGE_TEST_STOP_BEFORE_COMMIT": "quantize"}
    proc = subprocess.Popen([sys.executable, "-m", "forge", "build", str(recipe)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker, deadline = cache / "quantize.stopped", time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    build_pid = int(marker.read_text())
    assert build_pid != proc.pid   # the weights are held by the child, not by the process the user started
    os.kill(build_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, out + err
    assert "killed by the kernel (out of memory?) during step quantize at" in err and "GB peak RSS" in err, err
    assert "Traceback" not in err and "forge fit RECIPE" in err


def test_killing_the_build_kills_the_process_holding_the_weights(tmp_path, tiny_llama):
    """A CI job's timeout SIGKILLs the process it started: the build behind it must not go on (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), quantize={"method": "fp8"})
    cache = tmp_path / "cache"
    env = {**os.environ, "FORGE_CACHE_DIR": str(cache), "FORGE_TEST_STOP_BEFORE_COMMIT": "quantize"}
    proc = subprocess.Popen([sys.executable, "-m", "forge", "build", str(recipe)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, deadline = cache / "quantize.stopped", time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    child = int(marker.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
        assert time.time() < deadline, "the build's child outlived the process the user started"
        time.sleep(0.1)


def _memory_cgroup(tmp_name: str, limit: int):
    """A child of this process's cgroup (v1 memory controller or v2) with a memory limit, or a skip reason."""
    from pathlib import Path

    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / tmp_name, "memory.limit_in_bytes"
            break
        if controllers == "" and (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
            d, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/") / tmp_name, "memory.max"
    else:
        return None, "no memory cgroup here"
    try:
        d.mkdir(exist_ok=True)
        (d / limit_file).write_text(str(limit))
    except OSError as e:
        return None, f"cannot make a memory cgroup here ({e.strerror}: needs root or a delegated cgroup)"
    return d, ""


def test_validate_sees_a_cgroup_memory_limit_and_refuses_with_the_numbers_exit_2(tmp_path, tiny_llama):
    """CI runners are containers: their limit is a cgroup's, not the host's MemAvailable. forge validate run under a
    600 MB cgroup limit refuses a quantization that needs more, with both figures."""
    import subprocess
    import sys

    cg, why = _memory_cgroup(f"forge-test-{tmp_path.name}", 600_000_000)
    if cg is None:
        pytest.skip(why)
    try:
        recipe = write_recipe(tmp_path / "tiny.yaml", str(tiny_llama), quantize={"method": "fp8"})
        run = f"echo $$ > {cg}/cgroup.procs && exec {sys.executable} -m forge validate {recipe}"
        proc = subprocess.run(["sh", "-c", run], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        assert "quantize needs 1.1 GB of host memory" in proc.stderr and "GB available" in proc.stderr, proc.stderr
        available = float(proc.stderr.split(" GB available")[0].split()[-1])
        assert 0 < available <= 0.6   # the cgroup's room (one decimal), not this host's
        assert forge_cli("validate", str(recipe), timeout=120).returncode == 0   # outside the cgroup it fits
    finally:
        cg.rmdir()


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_cgroup_room_counts_page_cache_as_droppable_but_not_shmem(tmp_path, kind):
    """Measured in a 5 GB cgroup: after the reference step read the 3B snapshot, 3.8 GB of the cgroup's usage was
    page cache (3.3 GB of it active); the pre-flight said 0.7 GB available and refused a 7.1 GB-limit build that
    fits. File cache is what the kernel drops before it kills; shmem (tmpfs) is not; a limit above, in a parent
    cgroup, counts too; "max" (v2) is no limit."""
    proc = tmp_path / "cgroup"
    if kind == "v1":
        proc.write_text("4:memory:/ci/job\n1:cpu:/ci/job\n")
        d, files = tmp_path / "fs" / "memory" / "ci" / "job", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        stat = "total_cache 3800000000\ntotal_rss 500000000\ntotal_shmem 300000000\n"
    else:
        proc.write_text("0::/ci/job\n")
        (tmp_path / "fs").mkdir()
        (tmp_path / "fs" / "cgroup.controllers").write_text("memory\n")
        d, files = tmp_path / "fs" / "ci" / "job", ("memory.max", "memory.current")
        stat = "anon 500000000\nfile 3800000000\nshmem 300000000\n"
    d.mkdir(parents=True)
    (d / files[0]).write_text("5000000000\n")
    (d / files[1]).write_text("4300000000\n")
    (d / "memory.stat").write_text(stat)
    room = host_fit.cgroup_room(proc, tmp_path / "fs")
    assert room == 5e9 - (4.3e9 - (3.8e9 - 0.3e9))   # 4.2 GB: the anon 0.5 GB and the shmem 0.3 GB are used
    (d.parent / files[0]).write_text("4000000000\n")          # a tighter limit on the parent, with no usage file
    assert host_fit.cgroup_room(proc, tmp_path / "fs") == room   # a limit without its usage is not guessed at
    (d.parent / files[1]).write_text("3900000000\n")
    assert host_fit.cgroup_room(proc, tmp_path / "fs") == 4e9 - 3.9e9   # no stat there: all of it counts as used
    (d / files[0]).write_text("max\n" if kind == "v2" else f"{(1 << 63) - 4096}\n")
    (d.parent / files[0]).write_text("max\n" if kind == "v2" else f"{(1 << 63) - 4096}\n")
    assert host_fit.cgroup_room(proc, tmp_path / "fs") is None       # no limit anywhere
    proc.write_text("garbage without colons\n")
    assert host_fit.cgroup_room(proc, tmp_path / "fs") is None


def test_a_streamed_quantize_is_judged_by_the_snapshots_real_shards_once_they_are_here(tmp_path, monkeypatch):
    """validate assumes a shard of up to 5 GB (the files may not be downloaded yet); the quantize step sees them.
    Measured in a 5 GB cgroup: the 3B shape's 2 GB shards fit 4.5 GB free, the assumed 5 GB would not."""
    shape = from_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072,
                         "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
                         "num_hidden_layers": 28, "vocab_size": 128256, "tie_word_embeddings": True})
    needs = host_fit.needs(shape, "fp8", calibrates=False, evaluates=False, device="cpu", streams=True)
    monkeypatch.setattr(host_fit, "available_bytes", lambda: 4.5e9)
    with pytest.raises(ResourceError, match=r"1.2 x 5.0 GB for a shard"):
        host_fit.require(needs, "quantize")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for i, size in enumerate((2_100_000_000, 2_000_000_000, 1_300_000_000)):
        with open(snapshot / f"model-0000{i + 1}-of-00003.safetensors", "wb") as f:
            f.truncate(size)   # sparse: only the size is read
    host_fit.require(needs, "quantize", {"resolve": snapshot})   # 1.2 x 2.1 GB + 1.1 GB = 3.6 GB: fits
    with open(snapshot / "model-00001-of-00003.safetensors", "wb") as f:
        f.truncate(4_000_000_000)
    with pytest.raises(ResourceError, match=r"1.2 x 4.0 GB for a shard"):
        host_fit.require(needs, "quantize", {"resolve": snapshot})
