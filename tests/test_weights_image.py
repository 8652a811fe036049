"""container.weights: image (issue 29): a model image per checkpoint beside a weights-free serving image keyed by base +
engine only, the record naming all three artifacts, and push / pull / verify covering them — against buildah on the
GPU bases' stand-ins and the real Distribution registry on 127.0.0.1."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, resolved, start_registry, write_recipe

from forge.core.errors import RecipeError
from forge.image.containers import SERVE_ENTRY_SOURCE
from forge.image.model_image import unpack
from forge.oci.client import Client, Remote
from forge.oci.layout import Layout
from forge.registry import LocalRegistry
from forge.steps.quantize import REPORTS

CALIB = REPO / "evals" / "data" / "calib-pydoc.jsonl"
FAKE_BIN = REPO / "tests" / "fake_bin"
VLLM = {"base": "vllm-0.11-cu128"}


def _gpu_recipe(path: Path, model, name="tiny", **sections) -> Path:
    sections.setdefault("container", VLLM)
    sections.setdefault("scan", {"required": False})   # no Trivy here; the scan has its own tests below
    target = {"gpu": "L4", "engine": "vllm", "max_model_len": 256, "max_num_seqs": 4, **sections.pop("target", {})}
    return write_recipe(path, str(model), name=name, quantize=sections.pop("quantize", {"method": "none"}),
                        target=target, **sections)


def _steps(cache: Path, recipe: str | None = None) -> dict[str, Path]:
    entries = json.loads(forge_cli("cache", "ls", "--json", cache=cache, check=0).stdout)
    return {e["step"]: cache / "steps" / e["key"] / "out" for e in entries if recipe is None or e["recipe"] == recipe}


def _checkpoint_files(quantize_out: Path) -> dict[str, str]:
    files = json.loads((quantize_out.parent / "manifest.json").read_text())["output"]["files"]
    return {rel: f["sha256"] for rel, f in files.items() if rel not in REPORTS}


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------- the recipe field


def test_weights_default_image_on_gpus_baked_on_the_cpu_and_for_compiled_engines(tmp_path, tiny_llama):
    cpu = write_recipe(tmp_path / "cpu.yaml", str(tiny_llama), container={"base": "cpu-python311"})
    assert resolved(cpu).weights == "baked"                     # the CPU demo keeps its baked image
    assert resolved(_gpu_recipe(tmp_path / "gpu.yaml", tiny_llama)).weights == "image"
    baked = _gpu_recipe(tmp_path / "baked.yaml", tiny_llama, container={**VLLM, "weights": "baked"})
    assert resolved(baked).weights == "baked"
    engine = write_recipe(tmp_path / "trt.yaml", str(tiny_llama), name="trt",
                          quantize={"method": "fp8", "calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}},
                          target={"gpu": "H100-SXM", "engine": "trtllm", "max_model_len": 256, "max_num_seqs": 4},
                          trtllm={"mode": "engine"}, container={"base": "trtllm-1.0-cu129"}, scan={"required": False})
    assert resolved(engine).weights == "baked"                  # a compiled engine is bound to its model


def test_weights_errors_name_the_field_and_the_fix(tmp_path, tiny_llama):
    engine = write_recipe(tmp_path / "trt.yaml", str(tiny_llama), name="trt",
                          quantize={"method": "fp8", "calibration": {"data": str(CALIB), "samples": 4, "max_seq_len": 64}},
                          target={"gpu": "H100-SXM", "engine": "trtllm", "max_model_len": 256, "max_num_seqs": 4},
                          trtllm={"mode": "engine"}, container={"base": "trtllm-1.0-cu129", "weights": "image"})
    with pytest.raises(RecipeError) as e:
        resolved(engine)
    said = "\n".join(e.value.problems)
    assert "container.weights" in said and "trtllm.mode: engine" in said and "container.weights: baked" in said
    packed = _gpu_recipe(tmp_path / "zstd.yaml", tiny_llama,
                         container={**VLLM, "weights": "image", "weights_compression": "zstd"})
    with pytest.raises(RecipeError) as e:
        resolved(packed)
    assert "container.weights" in e.value.problems[0] and "uncompressed" in e.value.problems[0]
    wrong = _gpu_recipe(tmp_path / "wrong.yaml", tiny_llama, container={**VLLM, "weights": "layer"})
    proc = forge_cli("validate", str(wrong))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "container.weights" in proc.stderr and "'baked'" in proc.stderr and "'image'" in proc.stderr


# ---------------------------------------------------------------------- the entrypoint in the serving image


def _entry(models: Path, spec: dict, **env) -> subprocess.CompletedProcess:
    (models / ".forge").mkdir(parents=True, exist_ok=True)
    (models / ".forge" / "serve.json").write_text(json.dumps(spec))
    return subprocess.run([sys.executable, str(SERVE_ENTRY_SOURCE)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "FORGE_MODEL_DIR": str(models), **env})


def test_the_entrypoint_runs_only_its_own_engine_and_says_why_not(tmp_path):
    models = tmp_path / "models"
    echo = "/bin/echo"
    ok = _entry(models, {"engine": "vllm", "argv": [echo, "serve", str(models), "--port", "8000"], "port": 8000},
                FORGE_ENGINE="vllm", FORGE_ENGINE_EXE=echo, FORGE_PORT="8123")
    assert ok.returncode == 0 and ok.stdout.split() == ["serve", str(models), "--port", "8123"]   # the port moved
    other = _entry(models, {"engine": "tgi", "argv": [echo]}, FORGE_ENGINE="vllm", FORGE_ENGINE_EXE=echo)
    assert other.returncode == 78 and "packaged for the 'tgi' engine; this serving image runs 'vllm'" in other.stderr
    exe = _entry(models, {"engine": "vllm", "argv": ["/bin/sh", "-c", "id"]}, FORGE_ENGINE="vllm", FORGE_ENGINE_EXE=echo)
    assert exe.returncode == 78 and "runs only '/bin/echo'" in exe.stderr
    env = _entry(models, {"engine": "vllm", "argv": [echo], "env": {"LD_PRELOAD": "/x.so"}}, FORGE_ENGINE="vllm",
                 FORGE_ENGINE_EXE=echo)
    assert env.returncode == 78 and "may set only HF_/TRANSFORMERS_" in env.stderr
    out = _entry(models, {"engine": "vllm", "argv": [echo], "files": {"/etc/forge-x": "x"}}, FORGE_ENGINE="vllm",
                 FORGE_ENGINE_EXE=echo)
    assert out.returncode == 78 and "only ask for runtime files under /tmp/" in out.stderr
    missing = subprocess.run([sys.executable, str(SERVE_ENTRY_SOURCE)], capture_output=True, text=True,
                             env={"FORGE_MODEL_DIR": str(tmp_path / "nothing"), "FORGE_ENGINE": "vllm"})
    assert missing.returncode == 78 and "mount the model image there read-only" in missing.stderr


# ---------------------------------------------------------------------- builds on the stand-in bases


def test_a_second_model_on_the_same_base_reuses_the_serving_image(tmp_path, tiny_llama, tiny_qwen2, standin_bases):
    """Two models, one base: the serving image (base + engine, no model) is built once; each model gets its own
    model image; the records name the three artifacts and verify."""
    cache, reg = tmp_path / "cache", tmp_path / "registry"
    first = _gpu_recipe(tmp_path / "a.yaml", tiny_llama, name="tiny-a")
    proc = forge_cli("build", str(first), "--registry-dir", str(reg), cache=cache, env=standin_bases)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"serving_image\s+BUILT", proc.stdout) and re.search(r"package\s+BUILT", proc.stdout)
    second = _gpu_recipe(tmp_path / "b.yaml", tiny_qwen2, name="tiny-b", target={"max_num_seqs": 8})
    proc = forge_cli("build", str(second), "--registry-dir", str(reg), cache=cache, env=standin_bases)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"serving_image\s+HIT", proc.stdout), proc.stdout   # no serving image built for model two
    assert re.search(r"package\s+BUILT", proc.stdout)

    registry = LocalRegistry(reg)
    a, b = registry.resolve("tiny-a"), registry.resolve("tiny-b")
    assert a.weights == b.weights == "image"
    assert a.image_digest == b.image_digest                   # one weights-free serving image for the base
    assert a.model_image_digest != b.model_image_digest and None not in (a.modelpack_digest, b.modelpack_digest)
    for rec in (a, b):
        assert registry.verify(rec) == [], rec.name
        prov = json.loads(registry.blobs.read(rec.evidence[-1].files["provenance.intoto.json"]))
        assert ["sha256:" + s["digest"]["sha256"] for s in prov["subject"]] == [
            rec.image_digest, rec.model_image_digest, rec.modelpack_digest]   # the provenance names the three
    steps = _steps(cache, "tiny-a")
    serving = steps["serving_image"]
    text = (serving / "Containerfile").read_text()
    assert "tiny" not in text and "COPY serve.py /opt/forge/serve.py" in text   # nothing of any model
    config = json.loads(Layout(serving / "oci").read(json.loads(Layout(serving / "oci").read(
        a.image_digest))["config"]["digest"]))["config"]
    assert config["Entrypoint"] == ["python3", "/opt/forge/serve.py"] and "dev.forge.model.digest" not in config["Labels"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert (env["FORGE_ENGINE"], env["FORGE_ENGINE_EXE"], env["MODEL"]) == ("vllm", "vllm", "/models")
    assert env["NVIDIA_REQUIRE_CUDA"] == "cuda>=12.8"
    # the model image: the checkpoint under /models, and the engine's command for it
    models = unpack(Layout(steps["package"] / "model-oci"), a.model_image_digest, tmp_path / "rootfs")
    served = json.loads((models / ".forge" / "serve.json").read_text())
    assert served["argv"][:3] == ["vllm", "serve", "/models"] and served["served_name"] == "tiny-a"
    assert {k: v for k, v in _tree(models).items() if not k.startswith(".forge/")} == _checkpoint_files(
        steps["quantize"])
    # the record shows and lists them
    shown = json.loads(forge_cli("registry", "show", "tiny-a", "--json", "--registry-dir", str(reg), check=0).stdout)
    assert (shown["weights"], shown["model_image_digest"], shown["modelpack_digest"]) == (
        "image", a.model_image_digest, a.modelpack_digest)
    index = {m["annotations"].get("org.opencontainers.image.ref.name"): m["digest"]
             for m in registry.blobs.index()["manifests"] if m.get("annotations")}
    assert index[f"tiny-a:{a.tag}-model"] == a.model_image_digest and index[f"tiny-a:{a.tag}-modelpack"] == \
        a.modelpack_digest
    # fail closed: a ModelPack whose blob is gone, or provenance that does not name the model image, does not verify
    registry.blobs.blob_path(a.modelpack_digest).unlink()
    assert any(role == "modelpack manifest" for _, role, _ in registry.verify(a))
    forged = b.model_copy(update={"model_image_digest": a.model_image_digest})
    assert any("does not name the model image" in what for _, _, what in registry.verify(forged))


def test_the_model_image_is_scanned_for_secrets_only(tmp_path, tiny_llama, standin_bases):
    """The serving image gets Trivy's vuln + secret scanners and the SBOM; the model image the secret scanner alone,
    and a secret found there fails the scan gate (exit 4)."""
    recipe = _gpu_recipe(tmp_path / "s.yaml", tiny_llama, scan={"required": True})
    clean = REPO / "tests" / "data" / "trivy" / "debian-12-clean.json"
    env = {**standin_bases, "PATH": f"{FAKE_BIN}:{os.environ['PATH']}", "FAKE_TRIVY_REPORT": str(clean),
           "FAKE_TRIVY_LOG": str(tmp_path / "trivy.log")}
    proc = forge_cli("build", str(recipe), "--registry-dir", str(tmp_path / "reg"), cache=tmp_path / "cache", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "trivy.log").read_text().splitlines()]
    scans = {c[c.index("--input") + 1].rsplit("/", 1)[-1]: c[c.index("--scanners") + 1] for c in calls if "image" in c}
    assert scans == {"oci": "vuln,secret", "model-oci": "secret"}
    verdict = json.loads((_steps(tmp_path / "cache")["scan"] / "verdict.json").read_text())
    assert verdict["model_image"] == {"scanners": {"serving image": ["vuln", "secret"], "model image": ["secret"]},
                                      "secrets": 0}
    rec = LocalRegistry(tmp_path / "reg").resolve("tiny")
    assert rec.status_evidence["scan-report"]["scanners"] == {"serving image": ["vuln", "secret"],
                                                              "model image": ["secret"]}   # the record says it too
    env["FAKE_TRIVY_SECRETS_REPORT"] = str(REPO / "tests" / "data" / "trivy" / "secrets.json")
    env["FAKE_TRIVY_LOG"] = str(tmp_path / "trivy2.log")
    proc = forge_cli("build", str(recipe), "--force", "scan", cache=tmp_path / "cache", env=env)
    assert proc.returncode == 4 and "secret(s) in the model image" in proc.stderr, proc.stdout + proc.stderr


# ---------------------------------------------------------------------- the real Distribution registry


@contextmanager
def _logged_registry(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with start_registry(root) as host:
        yield host, root / "registry.log"


def _put_blobs(log: Path, since: int = 0) -> list[str]:
    """The blob digests the registry received a finishing PUT for (one per upload), from its access log."""
    lines = log.read_text().splitlines()[since:]
    return [m.group(1) for line in lines if '"PUT ' in line and "/blobs/uploads/" in line
            for m in [re.search(r"digest=sha256(?::|%3A)([0-9a-f]{64})", line)] if m]


def _sharded(tmp_path: Path, model: Path) -> Path:
    """The tiny Llama saved in several safetensors shards (a real checkpoint's layout, in miniature)."""
    import shutil

    import torch
    import transformers

    out = tmp_path / "sharded"
    m = transformers.AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16)
    m.save_pretrained(out, max_shard_size="60KB")
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def test_shards_go_up_once_and_a_requantization_moves_only_what_changed(tmp_path, tiny_llama, standin_bases):
    """Two variants of one checkpoint push its shard blobs once (and one serving image); re-quantizing with one more
    layer in ``ignore`` pushes only the shards that changed; the ModelPack's layers are the model image's blobs;
    skopeo reads all three; `registry pull` restores the weights byte for byte, and a taken-in record verifies."""
    model = _sharded(tmp_path, tiny_llama)
    fp8 = {"method": "fp8", "ignore": ["lm_head"]}
    variants = [{"name": "l4"}, {"name": "h100", "target": {"gpu": "H100-SXM", "max_num_seqs": 8}}]
    recipe = _gpu_recipe(tmp_path / "v.yaml", model, name="tiny-shards", quantize=fp8, variants=variants)
    cache, reg = tmp_path / "cache", tmp_path / "registry"
    with _logged_registry(tmp_path / "oci-registry") as (host, log):
        url = f"oci://{host}/forge/tiny"
        proc = forge_cli("build", str(recipe), "--publish-to", url, "--registry-dir", str(reg), cache=cache,
                         env=standin_bases)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        registry = LocalRegistry(reg)
        l4, h100 = registry.resolve("tiny-shards:l4"), registry.resolve("tiny-shards:h100")
        assert l4.image_digest == h100.image_digest and l4.model_image_digest != h100.model_image_digest
        layers = {r.variant: [la["digest"] for la in json.loads(registry.blobs.read(r.model_image_digest))["layers"]]
                  for r in (l4, h100)}
        shards = layers["l4"][:-1]
        assert len(shards) >= 3 and layers["h100"][:-1] == shards   # one checkpoint: the same shard layers
        put = _put_blobs(log)
        assert all(put.count(d[7:]) == 1 for d in shards), "a shard went up twice"
        serving = json.loads(registry.blobs.read(l4.image_digest))["layers"]
        assert all(put.count(la["digest"][7:]) == 1 for la in serving)   # the serving image once, for both
        assert {d[7:] for d in shards} <= set(put)

        client = Client(Remote.parse(url))
        for rec in (l4, h100):
            image = json.loads(client.get_manifest(f"{rec.tag}-model")[0])
            pack = json.loads(client.get_manifest(f"{rec.tag}-modelpack")[0])
            assert [la["digest"] for la in pack["layers"]] == [la["digest"] for la in image["layers"]]
            assert pack["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
        for tag, raw in ((l4.tag, False), (f"{l4.tag}-model", False), (f"{l4.tag}-modelpack", True)):
            inspected = subprocess.run(["skopeo", "inspect", *(["--raw"] if raw else []), "--tls-verify=false",
                                        f"docker://{host}/forge/tiny:{tag}"], capture_output=True, text=True)
            assert inspected.returncode == 0, (tag, inspected.stderr)
        assert json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{host}/forge/tiny:"
                                          f"{l4.tag}-model"], capture_output=True, text=True).stdout)["Digest"] == \
            l4.model_image_digest

        # re-quantized with one more layer kept in BF16: only the shard that holds it (and the small layer) go up
        seen = len(log.read_text().splitlines())
        more = _gpu_recipe(tmp_path / "more.yaml", model, name="tiny-shards",
                           quantize={**fp8, "ignore": ["lm_head", "model.layers.1.mlp.down_proj"]}, variants=variants[:1])
        proc = forge_cli("build", str(more), "--publish-to", url, "--registry-dir", str(reg), cache=cache,
                         env=standin_bases)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert any("serving_image" in line and "HIT" in line for line in proc.stdout.splitlines()), proc.stdout
        again = LocalRegistry(reg).resolve("tiny-shards:l4")
        now = [la["digest"] for la in json.loads(registry.blobs.read(again.model_image_digest))["layers"]][:-1]
        changed = [d for d, before in zip(now, shards) if d != before]
        assert len(now) == len(shards) and 1 <= len(changed) < len(shards)
        put = _put_blobs(log, seen)
        assert sorted(d for d in put if "sha256:" + d in now) == sorted(d[7:] for d in changed)

        # another machine: pull the weights out, byte for byte; take the record in and verify all three
        other = {"FORGE_REGISTRY_DIR": str(tmp_path / "other")}
        forge_cli("registry", "pull", f"{url}:{l4.tag}", "--to", str(tmp_path / "pulled"), env=other, check=0)
        quantize = _steps(cache, "tiny-shards")["quantize"]
        expected = {}
        for out in [p.parent / "out" for p in (cache / "steps").glob("*/manifest.json")]:
            m = json.loads((out.parent / "manifest.json").read_text())
            if m["step"] == "quantize" and m["output"]["digest"] == l4.model_digest:
                expected = _checkpoint_files(out)
        assert expected and quantize.exists()
        assert _tree(tmp_path / "pulled" / "model") == expected
        forge_cli("registry", "pull", f"{url}:{l4.tag}", env=other, check=0)
        taken = LocalRegistry(tmp_path / "other").resolve(f"tiny-shards@{l4.image_digest}")
        assert (taken.model_image_digest, taken.modelpack_digest) == (l4.model_image_digest, l4.modelpack_digest)
        forge_cli("registry", "verify", taken.id[:12], env=other, check=0)
        forge_cli("registry", "verify", l4.id[:12], "--remote", "--registry-dir", str(reg), check=0)


def test_select_returns_the_serving_image_and_the_model_image():
    from forge.registry import annotate as ann
    from forge.registry.matrix import Matrix
    from forge.registry.select import select

    serving, model, pack = ("sha256:" + c * 64 for c in "abc")
    entry = {"digest": serving, "annotations": {ann.VARIANT: "l4", ann.TAG: "tiny:l4", ann.GPU: "L4",
                                                ann.PRODUCTS: "NVIDIA-L4", ann.STATUS: "validated", ann.WEIGHTS: "image",
                                                ann.MODEL_IMAGE: model, ann.MODELPACK: pack}}
    sel = select(Matrix("tiny", "sha256:" + "d" * 64, "oci://127.0.0.1:5000/forge", (entry,), {}), "NVIDIA-L4")
    chosen = sel.chosen
    assert (chosen.digest, chosen.model_image_digest, chosen.modelpack_digest) == (serving, model, pack)
    assert chosen.image == f"127.0.0.1:5000/forge@{serving}" and chosen.model_image == f"127.0.0.1:5000/forge@{model}"
    said = sel.to_json()["selected"]
    assert (said["weights"], said["model_image_digest"], said["modelpack_digest"]) == ("image", model, pack)
