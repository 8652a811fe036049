"""Backends and engines as plugins: a throwaway backend and a throwaway engine, each one file under
tests/plugins/, registered through FORGE_PLUGINS, carry a tiny model through quantize and package; and
the registries' lookups are lazy and say what is available."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, forge_cli, free_port, image_config, write_recipe

PLUGINS = REPO / "tests" / "plugins"
PLUGIN_ENV = {"FORGE_PLUGINS": "backend:echo=echo_backend:BACKEND engine:echo=echo_engine:ENGINE",
              "PYTHONPATH": str(PLUGINS)}
BASE_REF = "localhost/forge-test/echo-base:1"


@pytest.fixture(scope="session")
def echo_base(tmp_path_factory):
    """An empty base image (no Python: the echo engine's image is packaged here, not served)."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: `make setup-tools` installs it")
    root = str(tmp_path_factory.mktemp("echo-buildah") / "storage")
    cmd = ["buildah", "--storage-driver", "vfs", "--root", root, "--runroot", root + "-run"]
    ctr = subprocess.run([*cmd, "from", "scratch"], capture_output=True, text=True, check=True).stdout.split()[-1]
    subprocess.run([*cmd, "commit", "--quiet", "--rm", ctr, BASE_REF], capture_output=True, check=True)
    return {"FORGE_BUILDAH_ROOT": root}


def _catalog(tmp_path) -> None:
    (tmp_path / "containers").mkdir(exist_ok=True)
    (tmp_path / "containers" / "bases.yaml").write_text(
        f"bases:\n  echo-base:\n    image: {BASE_REF}\n    engine: echo\n    engine_version: '1'\n    formats: [bf16]\n")


def _entries(cache) -> dict:
    listing = json.loads(forge_cli("cache", "ls", "--json", cache=cache, check=0).stdout)
    return {e["step"]: cache / "steps" / e["key"] / "out" for e in listing}


def test_a_plugin_backend_and_engine_build_a_tiny_model(tmp_path, tiny_llama, echo_base):
    _catalog(tmp_path)
    recipe = write_recipe(tmp_path / "echo.yaml", str(tiny_llama), name="tiny-echo",
                          target={"gpu": "CPU", "engine": "echo"},
                          quantize={"method": "gptq", "bits": 4, "group_size": 32, "backend": "echo"},
                          container={"base": "echo-base"}, scan={"required": False})
    env = {**PLUGIN_ENV, **echo_base, "FORGE_REGISTRY_DIR": str(tmp_path / "registry")}
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = _entries(tmp_path / "cache")

    # quantize: the echo backend ran inside forge's skeleton; the manifest has the keys every backend writes
    quant = entries["quantize"]
    facts = json.loads((quant.parent / "manifest.json").read_text())["facts"]
    assert facts["backend"] == "echo" and facts["format"] == "bf16" and facts["backend_facts"] == {"grid_levels": 15}
    assert facts["verify"]["tokens"] == 16 and facts["layers"] == 14   # loaded with transformers and generated
    from forge.steps.quantize import MANIFEST_KEYS

    assert tuple(json.loads((quant / "forge-quantization.json").read_text())) == MANIFEST_KEYS
    import torch
    from safetensors.torch import load_file

    weights = load_file(quant / "model.safetensors")
    q_proj = weights["model.layers.0.self_attn.q_proj.weight"].float()
    for group in q_proj.reshape(q_proj.shape[0], -1, 32).reshape(-1, 32):   # every group on a 15-level grid
        assert torch.unique(group).numel() <= 15
    assert torch.unique(weights["lm_head.weight"].float()[0]).numel() > 15    # ignored: untouched

    # package: the engine's command, health route and Python are in the image; the image was not smoke-tested
    text = (entries["package"] / "Containerfile").read_text()
    assert f"FROM {BASE_REF}" in text and "http://127.0.0.1:8000/ready" in text
    assert "COPY --chown=10001:10001 echo/ /opt/echo/" in text      # the engine's own files, after the weights
    assert "COPY --chown=10001:10001 model/" not in text   # the weights are forge's own last layer
    config = image_config(entries["package"])
    assert "ECHO_PREFIX=echo: " in config["config"]["Env"]
    argv = config["config"]["Entrypoint"]
    assert argv[:2] == ["python3", "-c"] and argv[3:] == ["/opt/forge/model", "8000", "tiny-echo"]
    assert config["config"]["Labels"]["dev.forge.engine"] == "echo"
    transcript = json.loads((entries["package"] / "smoke-test.json").read_text())
    assert transcript["passed"] is None and "not smoke-tested: echo images cannot be smoke-tested here" in transcript["skipped"]

    # the image's ENTRYPOINT serves (run on the host: the test base has no Python)
    port = free_port()
    server = subprocess.Popen([sys.executable, *argv[1:3], argv[3], str(port), argv[5]], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the echo server did not come up"
                time.sleep(0.2)
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] == "echo: What is the capital of France?"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)

    # a rebuild is a no-op: every step is a HIT
    again = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
    assert again.returncode == 0 and " 0 built, " in again.stdout, again.stdout


def test_unknown_backend_and_engine_name_what_is_available(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama), target={"gpu": "CPU", "engine": "ech"},
                          quantize={"method": "gptq", "group_size": 32, "backend": "eco"})
    proc = forge_cli("validate", str(recipe), env=PLUGIN_ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "quantize.backend: Unknown backend 'eco'. Did you mean 'echo'? Available: llmcompressor, modelopt, echo" \
        in proc.stderr
    assert "target.engine: Unknown engine 'ech'. Did you mean 'echo'? Available: vllm, tgi, trtllm, cpu, echo" in proc.stderr
    proc = forge_cli("validate", str(recipe))   # without the plugins
    assert proc.returncode == 2 and "Unknown backend 'eco'. Available: llmcompressor, modelopt" in proc.stderr


def test_a_malformed_plugin_entry_is_a_usage_error(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama))
    proc = forge_cli("validate", str(recipe), env={"FORGE_PLUGINS": "echo_engine:ENGINE"})
    assert proc.returncode == 2 and "FORGE_PLUGINS entry 'echo_engine:ENGINE' is not KIND:NAME=module:attr" in proc.stderr


def test_registries_are_lazy_and_never_import_torch():
    """Every built-in backend and engine resolves without importing torch (forge --help, plan and no-op builds)."""
    code = ("import sys; from forge import backends, engines; from forge.gpu import capability; "
            "[backends.get(n) for n in backends.REGISTRY.names()]; [engines.get(n) for n in engines.names()]; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(backends.REGISTRY.names(), engines.names())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "['llmcompressor', 'modelopt'] ['vllm', 'tgi', 'trtllm', 'cpu']" in proc.stdout


def test_every_method_has_a_backend_and_every_engine_loads_some_backends_format():
    """The method table and the registries agree: no method is offered by nobody, no engine loads nothing."""
    from forge import backends, engines
    from forge.gpu import methods

    offered = {m for n in backends.REGISTRY.names() for m in backends.get(n).methods}
    assert offered == set(methods.NAMES)
    formats = {fmt for m in methods.METHODS.values() for fmt in m.formats}
    for name in engines.names():
        assert set(engines.get(name).formats) <= formats, name
        for scheme in engines.get(name).kernels:
            assert scheme in {m.scheme_for(b) for m in methods.METHODS.values() for b in (m.bits_options or (None,))}
