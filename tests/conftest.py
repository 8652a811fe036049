"""Test harness: offline by default, no credentials, a private cache per test, tiny models made here."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# offline before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import: set later, a hub
# call from the test process itself retries against the blocked socket with backoff (tens of seconds a call)
os.environ["HF_HUB_OFFLINE"] = "1"
# no test, whatever its scope, writes into the user's registry (function-scoped tests get their own below)
os.environ["FORGE_REGISTRY_DIR"] = __import__("tempfile").mkdtemp(prefix="forge-test-registry-")
# one OpenMP thread pool per core, not per test worker: xdist runs a worker per core (make test), and a torch in
# each with a thread per host core oversubscribes the machine (its spinning threads made the demo's forward passes
# 3-9x slower on 2 cores). Builds the tests start, and the servers they start, inherit it. The xdist controller
# imports this file too, before it starts the workers, which inherit its environment: what the user had set is
# carried in FORGE_TEST_USER_OMP, so that a worker divides the cores by the worker count instead of keeping the
# controller's one-process value.
_USER_OMP = os.environ.setdefault("FORGE_TEST_USER_OMP", os.environ.get("OMP_NUM_THREADS", ""))
if not _USER_OMP:
    _WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "REGISTRY_AUTH_FILE", "REGISTRY_PASSWORD", "FORGE_CI",
           "FORGE_REGISTRY_USER", "FORGE_REGISTRY_PASSWORD", "FORGE_PUBLISH_TO")


@pytest.fixture(autouse=True)
def _offline_and_clean(monkeypatch, tmp_path_factory):
    """Block sockets except loopback and scrub credentials, as a user's CI would not guarantee."""
    for var in SECRETS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "huggingface_hub" in sys.modules:   # imported already (by a test or a library): its constant, too
        monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("FORGE_REGISTRY_DIR", str(tmp_path_factory.mktemp("registry")))  # never the user's
    # a build run in this process quiets the libraries through os.environ (forge.core.options.quiet_libraries); undone
    # after each test, so a later `forge` subprocess starts as a user's does and its step logs hold the libraries' output
    from forge.core.options import QUIET

    for var in QUIET:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) \
                and self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test tried to reach {address}: tests are offline")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def forge_cli(*args: str, cache: Path | None = None, env: dict | None = None, timeout: float = 600,
              check: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `forge` entry point in a subprocess (as a user or CI would)."""
    full_env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    full_env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    if cache is not None:
        full_env["FORGE_CACHE_DIR"] = str(cache)
    proc = subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


TINY_VOCAB = 512


def _tiny_tokenizer(path: Path) -> None:
    """A small BPE tokenizer trained here on forge's calibration text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (REPO / "evals" / "data" / "calib-pydoc.jsonl").read_text().splitlines()[:60]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TINY_VOCAB, limit_alphabet=120,
                                                       special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def _tiny_model(tmp_path_factory, name: str, config_cls: str, model_cls: str) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2)
    path = tmp_path_factory.mktemp(name)
    getattr(transformers, model_cls)(cfg).to(torch.bfloat16).save_pretrained(path)
    _tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint (safetensors, config, tokenizer), made in the test session."""
    return _tiny_model(tmp_path_factory, "tiny-llama", "LlamaConfig", "LlamaForCausalLM")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint: a second architecture (attention biases, its own layer names)."""
    return _tiny_model(tmp_path_factory, "tiny-qwen2", "Qwen2Config", "Qwen2ForCausalLM")


TEST_DOWNLOADS = Path(__import__("tempfile").mkdtemp(prefix="forge-test-downloads-"))
__import__("atexit").register(shutil.rmtree, TEST_DOWNLOADS, True)   # each worker's downloads, gone with it


def resolved(path, *, downloads: Path | None = None, **kw):
    """A recipe through the resolution stage (forge.recipe.resolve), as every build reads it."""
    from forge.recipe.resolve import resolve

    return resolve(path, downloads=downloads or TEST_DOWNLOADS, **kw)


def write_recipe(path: Path, model_source: str, **sections) -> Path:
    """Write a minimal valid recipe; keyword sections are merged over the defaults (as YAML via JSON)."""
    doc = {"apiVersion": "forge/v1", "name": "tiny", "model": {"source": model_source},
           "target": {"gpu": "CPU", "engine": "cpu"}, "quantize": {"method": "none"}}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """A real OCI Distribution registry (Debian's docker-registry) on 127.0.0.1, temporary storage."""
    with start_registry(tmp_path_factory.mktemp("oci-registry")) as host:
        yield host


@contextmanager
def start_registry(root: Path):
    """Run a real OCI Distribution registry on 127.0.0.1 with its storage under ``root``; yields HOST:PORT. Its
    output, the access log included (one line per request), goes to ``root/registry.log``."""
    import time
    import urllib.request

    exe = shutil.which("docker-registry")
    assert exe, "docker-registry is not installed: `make setup-tools` installs it (Debian package docker-registry)"
    port = free_port()
    (root / "config.yml").write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem:\n"
                                     f"    rootdirectory: {root / 'data'}\n  delete: {{enabled: true}}\n"
                                     f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(root / "registry.log", "w")
    proc = subprocess.Popen([exe, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


STANDINS = {  # what the real images carry that forge must override or keep
    "trtllm-1.0-cu129": ("nvcr.io/nvidia/tensorrt-llm/release:1.0.0", "12.9.1"),
    "trtllm-1.2-cu130": ("nvcr.io/nvidia/tensorrt-llm/release:1.2.0", "13.0.0"),
    "vllm-0.11-cu128": ("docker.io/vllm/vllm-openai:v0.11.0", "12.8.1"),
}


def make_standin_bases(root: Path) -> dict[str, str]:
    """Local images under the catalog's references, carrying NGC's env and labels (NVIDIA_REQUIRE_CUDA=cuda>=9.0,
    CUDA_VERSION, a vendor label), in buildah storage at ``root``: the GPU bases cannot be pulled here, their
    packaging logic can be tested (and bench/noop_rebuild.py builds the variants recipe on them). Returns the
    environment a build needs to see them."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: `make setup-tools` installs it")
    old = os.environ.get("FORGE_BUILDAH_ROOT")
    os.environ["FORGE_BUILDAH_ROOT"] = str(root)   # only while the stand-ins are made; builds get it via env
    from forge.image.builders import buildah

    try:
        for ref, cuda in STANDINS.values():
            ctr = buildah("from", "scratch").stdout.strip().splitlines()[-1]
            buildah("config", "--env", "NVIDIA_REQUIRE_CUDA=cuda>=9.0", "--env", f"CUDA_VERSION={cuda}",
                    "--env", "NVIDIA_VISIBLE_DEVICES=all", "--label", "com.nvidia.build.ref=standin",
                    "--label", "org.opencontainers.image.title=stand-in", ctr)
            buildah("commit", "--quiet", ctr, ref)
            buildah("rm", ctr)
    finally:
        if old is None:
            os.environ.pop("FORGE_BUILDAH_ROOT", None)
        else:
            os.environ["FORGE_BUILDAH_ROOT"] = old
    return {"FORGE_BUILDAH_ROOT": str(root)}


@pytest.fixture(scope="session")
def standin_bases(tmp_path_factory):
    """The GPU bases' stand-ins (``make_standin_bases``), once per test session."""
    return make_standin_bases(tmp_path_factory.mktemp("buildah") / "storage")


def image_config(out: Path) -> dict:
    """The OCI image config of the one image in a package step's output layout."""
    index = json.loads((out / "oci" / "index.json").read_text())
    blob = lambda d: json.loads((out / "oci" / "blobs" / "sha256" / d.split(":")[1]).read_text())  # noqa: E731
    return blob(blob(index["manifests"][0]["digest"])["config"]["digest"])


def _tar(files: dict[str, bytes]) -> bytes:
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def _blob(layout: Path, data: bytes) -> dict:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def make_image(layout: Path, ref: str, model: dict[str, bytes], members: dict[str, bytes] | None = None) -> str:
    """An OCI layout holding one small image: a base layer and the weights layer at /opt/forge/model (as forge
    builds them); ``members``: more weights-layer members, by their name in the tar as given. Returns the
    manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers = [_blob(layout, _tar({"etc/os-release": b"ID=debian\n"})),
              _blob(layout, _tar({**{f"opt/forge/model/{k}": v for k, v in model.items()}, **(members or {})}))]
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux",
                                       "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}
                                      for layer in layers]}).encode()
    desc = _blob(layout, manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **desc,
         "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return desc["digest"]


def output_files(out: Path) -> dict:
    """What a step manifest records of a committed output (``output.files``): each file's size and sha256.
    Publish reads the gate's and the scan's verdict only through it, so a fake step result needs it."""
    import hashlib

    return {p.relative_to(out).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(Path(out).rglob("*")) if p.is_file()}


def gate_rule(passed: bool = True) -> dict:
    """One gate rule as verdict.json records it (``forge.evaluation.gatestats.RuleResult.to_json``): a pass, or a failure
    beyond its limit."""
    return {"task": "heldout_ppl", "metric": "word_perplexity", "kind": "max_rel_increase", "threshold": 0.1,
            "limit": 0.1, "n": 40, "baseline": 90.0, "candidate": 92.0 if passed else 126.0,
            "delta": 2.0 if passed else 36.0, "degradation": 0.022 if passed else 0.4,
            "ci_low": 0.01 if passed else 0.35, "ci_high": 0.04 if passed else 0.45, "mde": 0.03,
            "underpowered": False, "passed": passed, "decision": "pass" if passed else "beyond", "reason": ""}


def evaluated_on(engine: str = "cpu", gpu: str = "CPU") -> dict:
    """Where an eval step says it ran (``forge.steps.evaluate.evaluated_on``), here: on the engine and GPU an image
    ships for, so that a gate from it is not a proxy's. The CPU image serves with transformers, as lm-eval's hf
    backend evaluates; a GPU image's own engine ran on its GPU model (the name nvidia-smi reports)."""
    if gpu == "CPU":
        return {"engine": "transformers", "backend": "hf", "device": "cpu", "gpus": [], "dtype": "float32",
                "batch_size": 8}
    from forge.gpu.catalog import gpus

    return {"engine": {"cpu": "transformers"}.get(engine, engine), "backend": "vllm", "device": "cuda",
            "gpus": [gpus()[gpu].smi[0]], "dtype": "auto", "batch_size": 8}


def gate_verdict(passed: bool = True, rules: int = 1, on: tuple[str, str] | None = ("cpu", "CPU"), **extra) -> str:
    """A gate step's verdict.json with ``rules`` rules, all passing or all failing (0: ungated), both sides
    evaluated ``on`` (engine, GPU) (None: a verdict that does not say where); ``extra`` keys make two builds'
    verdicts differ."""
    where = {"evaluated_on": {"baseline": evaluated_on(*on), "candidate": evaluated_on(*on)}} if on else {}
    return json.dumps({"passed": passed and rules > 0, "rules": [gate_rule(passed)] * rules, "reported": [],
                       **where, **extra})


DEMO_SECRETS = {"HF_TOKEN": "hf_forgeTestSecretValue4242", "REGISTRY_PASSWORD": "forge-registry-pw-8675309"}


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory, standin_bases):
    """The demo recipe built once per test session by the real CLI (e2e tests share it: the CPU base image,
    FP8, the eval gate, the package and its smoke test), with secrets in the environment that must leak nowhere.
    Its images go to the stand-in bases' buildah storage: the tests that add GPU variants build into the same
    one (buildah's vfs driver copies every layer: a second storage would hold the CPU base image again, GBs)."""
    cache = tmp_path_factory.mktemp("demo-cache")
    env = {**DEMO_SECRETS, **standin_bases, "FORGE_REGISTRY_DIR": str(tmp_path_factory.mktemp("demo-registry"))}
    recipe = REPO / "recipes" / "smollm2-135m-demo.yaml"
    first = forge_cli("build", str(recipe), cache=cache, env=env, timeout=3600)
    (tmp_path_factory.getbasetemp() / "demo-build.log").write_text(first.stdout + first.stderr)  # what a user sees
    assert first.returncode == 0, first.stdout + first.stderr
    entries = json.loads(forge_cli("cache", "ls", "--json", cache=cache, check=0).stdout)
    steps = {e["step"]: cache / "steps" / e["key"] / "out" for e in entries}
    digests = {e["step"]: e["output_digest"] for e in entries}
    return {"cache": cache, "env": env, "log": first.stdout + first.stderr, "steps": steps, "digests": digests,
            "recipe": recipe}
