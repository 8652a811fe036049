"""forge deploy: manifests for validated registry records (goldens for the CPU demo and a vLLM H100 TP=2
recipe), every object schema-validated, refusals, cross-object checks on edited directories."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, forge_cli, gate_verdict, output_files

from forge import deploy
from forge.image.containers import PORT, UID
from forge.core.errors import EvidenceError, UsageError
from forge.deploy.kustomize import read_dir
from forge.deploy.validate import problems, schema_problems
from forge.registry import LocalRegistry, publish
from conftest import resolved

DATA = REPO / "tests" / "data" / "deploy"
GOLDEN = DATA / "golden"
# The ENTRYPOINT each image carries, as forge's package step wrote it for these recipes (a literal: deploy
# must copy whatever the image says, so the goldens do not move when the package step's command does)
VLLM = ["vllm", "serve", "/opt/forge/model", "--host", "0.0.0.0", "--port", "8000", "--served-model-name",
        "llama-3.1-70b-instruct-fp8", "--max-model-len", "8192", "--max-num-seqs", "64", "--gpu-memory-utilization",
        "0.9", "--tensor-parallel-size", "2", "--quantization", "compressed-tensors", "--kv-cache-dtype", "fp8"]
CPU = ["/opt/venv/bin/transformers", "serve", "/opt/forge/model", "--host", "0.0.0.0", "--port", "8000",
       "--device", "cpu", "--dtype", "auto"]
CASES = {  # case -> (recipe, the served model's config.json, the image's ENTRYPOINT)
    "demo-cpu": ("demo-cpu.yaml", "smollm2-135m-config.json", CPU),
    "vllm-h100-tp2": ("vllm-h100-tp2.yaml", "llama-3.1-70b-config.json", VLLM),
}


# ---------------------------------------------------------------------- records made here, as a build would

def _blob(layout: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:   # uncompressed, as forge writes weights layers
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image_with_config(layout: Path, ref: str, model: dict[str, bytes], entrypoint: list[str],
                      user: str = f"{UID}:{UID}") -> str:
    """An OCI layout with one image whose config is what forge's package step writes (ENTRYPOINT, USER,
    EXPOSE, ENV), its weights as the last layer under /opt/forge/model. Returns the manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers = [_blob(layout, _tar({"etc/os-release": b"ID=debian\n"})),
              _blob(layout, _tar({f"opt/forge/model/{k}": v for k, v in model.items()}))]
    config = _blob(layout, json.dumps({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"User": user, "ExposedPorts": {f"{PORT}/tcp": {}}, "Entrypoint": entrypoint,
                   "Env": ["PATH=/usr/bin:/bin", "HF_HUB_OFFLINE=1", "HF_HOME=/tmp/hf"],
                   "WorkingDir": "/opt/forge/model"}}, sort_keys=True).encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}
                                      for layer in layers]}, sort_keys=True).encode()
    desc = _blob(layout, manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **desc,
         "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return desc["digest"]


def _result(out: Path, facts: dict, digest: str):
    return SimpleNamespace(entry=SimpleNamespace(out=out, manifest={"facts": facts, "inputs": {"tools": {}},
                                                                    "output": {"files": output_files(out)}}),
                           output_digest=digest)


def make_record(root: Path, reg: LocalRegistry, recipe: Path, model_config: bytes, entrypoint: list[str], *,
                gate=True, scan="pass", user: str = f"{UID}:{UID}", evaluated_on: tuple[str, str] | None = None,
                weights_free: bool = False):
    """Publish a build of ``recipe`` whose image runs ``entrypoint`` (``weights_free``: its image carries no
    weights, as a serving image whose model is its own image)."""
    loaded = resolved(recipe)
    base = loaded.base
    root.mkdir(parents=True)
    (root / "package").mkdir()
    model = {} if weights_free else {"config.json": model_config, "model.safetensors": b"W" * 1024}
    digest = image_with_config(root / "package" / "oci", loaded.recipe.name, model, entrypoint, user=user)
    (root / "package" / "image.json").write_text(json.dumps({"manifest_digest": digest, "engine": base.engine}))
    (root / "gate").mkdir()
    on = evaluated_on or (base.engine, loaded.recipe.target.gpu)   # default: on the engine and GPU it ships for
    (root / "gate" / "verdict.json").write_text(gate_verdict(gate, on=on))
    (root / "scan").mkdir()
    facts = {"status": "scanned", "passed": scan == "pass", "summary": "0 findings" if scan == "pass" else "1 CRITICAL"}
    (root / "scan" / "verdict.json").write_text(json.dumps(facts))
    (root / "scan" / "trivy-report.json").write_text('{"SchemaVersion": 2, "Results": []}')
    results = {"resolve": _result(root, {}, "sha256:" + "11" * 32),
               "quantize": _result(root, {}, "sha256:" + hashlib.sha256(model_config).hexdigest()),
               "gate": _result(root / "gate", {"passed": gate, "failed": [] if gate else ["acc: -9%"]}, "sha256:" + "22" * 32),
               "package": _result(root / "package", {}, "sha256:" + "33" * 32),
               "scan": _result(root / "scan", facts, "sha256:" + "44" * 32)}
    return publish(loaded, results, registry=reg)


@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def _case(tmp_path, reg, case: str, **kw):
    recipe, config, entrypoint = CASES[case]
    return make_record(tmp_path / case, reg, DATA / recipe, (DATA / config).read_bytes(), entrypoint, **kw)


def _by_kind(objects) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


# ---------------------------------------------------------------------- goldens

def same_as_golden(out: Path, case: str) -> dict[str, str]:
    """The files forge deploy wrote in ``out``, asserted equal to GOLDEN/case (FORGE_TEST_UPDATE_GOLDEN=1 rewrites
    those: review the diff before committing)."""
    written = {p.name: p.read_text() for p in sorted(out.iterdir())}
    if os.environ.get("FORGE_TEST_UPDATE_GOLDEN"):
        (GOLDEN / case).mkdir(parents=True, exist_ok=True)
        for old in (GOLDEN / case).iterdir():
            old.unlink()
        for name, text in written.items():
            (GOLDEN / case / name).write_text(text)
    assert written == {p.name: p.read_text() for p in sorted((GOLDEN / case).iterdir())}
    return written


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_match_the_golden_files_and_every_object_validates(tmp_path, reg, case):
    rec = _case(tmp_path, reg, case)
    out = tmp_path / "out"
    proc = forge_cli("deploy", rec.id[:12], "--out", str(out), "--namespace", "llm", "--registry-dir", str(reg.root),
                     check=0)
    assert "was never pushed" in proc.stderr and f"kubectl apply -k {out}" in proc.stdout
    written = same_as_golden(out, case)
    objects = read_dir(out)
    for obj in objects:   # each one on its own, against its schema (a kind without one would fail)
        assert schema_problems(obj) == [], obj["kind"]
    assert len(objects) == len(written) - 1


def test_vllm_h100_tp2_deployment_says_what_the_record_and_the_recipe_say(tmp_path, reg):
    rec = _case(tmp_path, reg, "vllm-h100-tp2")
    objs = _by_kind(deploy.generate(reg, [rec], deploy.Options(namespace="llm")).objects)
    d = objs["Deployment"]
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    image_cfg = json.loads(reg.blobs.read(json.loads(reg.blobs.read(rec.image_digest))["config"]["digest"]))["config"]
    assert c["image"].endswith("@" + rec.image_digest) and c["command"] == image_cfg["Entrypoint"]
    assert c["command"][c["command"].index("--tensor-parallel-size") + 1] == "2"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 2
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0] == {"key": "nvidia.com/gpu.product", "operator": "In",
                                               "values": ["NVIDIA-H100-80GB-HBM3"]}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["securityContext"]["runAsUser"] == UID and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    # 70B FP8 (~72 GB) at 250 MB/s + 240 s vLLM start-up, x1.5: longer than the default 30 s a probe would allow
    budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert 700 <= budget <= 800
    ann = d["metadata"]["annotations"]
    assert ann["dev.forge/recipe-digest"] == rec.recipe_digest and ann["dev.forge/eval-verdict-digest"] == rec.eval_digest
    assert ann["dev.forge/record-id"] == rec.id
    so = objs["ScaledObject"]
    queue, kv = so["spec"]["triggers"]
    assert queue["metadata"]["query"] == ('sum(vllm:num_requests_waiting{namespace="llm",'
                                          'model_name="llama-3.1-70b-instruct-fp8"})')
    assert "vllm:kv_cache_usage_perc" in kv["metadata"]["query"]   # vLLM 0.11: the renamed metric
    # forge fit: ~58 sequences of 8192 tokens fit in the KV cache of 2 x H100 (under max_num_seqs 64): half wait
    assert 20 <= int(queue["metadata"]["threshold"]) <= 32
    assert objs["ServiceMonitor"]["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}


def test_a_pushed_record_is_pulled_from_its_registry_by_digest(tmp_path, reg):
    rec = _case(tmp_path, reg, "vllm-h100-tp2")
    pushed = reg.update(rec.model_copy(update={"remote": f"oci://registry.example.com/llm/llama@{rec.image_digest}"}),
                        "pushed")
    generated = deploy.generate(reg, [pushed])
    image = _by_kind(generated.objects)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"registry.example.com/llm/llama@{rec.image_digest}" and generated.notes == ()


def test_metric_names_follow_the_engine_version():
    from forge.deploy.engines import serving

    assert serving("vllm", "0.8.5").kv_cache_usage == "vllm:gpu_cache_usage_perc"
    assert serving("vllm", "0.11.0").kv_cache_usage == "vllm:kv_cache_usage_perc"
    assert serving("tgi", "3.3.4").queue.name == "tgi_queue_size"


def test_hpa_instead_of_keda_and_the_cpu_engine_refuses_queue_autoscaling(tmp_path, reg):
    rec = _case(tmp_path, reg, "vllm-h100-tp2")
    objs = _by_kind(deploy.generate(reg, [rec], deploy.Options(autoscale="hpa", replicas=2)).objects)
    assert "ScaledObject" not in objs
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] == 2 and hpa["maxReplicas"] == 8
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"

    cpu = _case(tmp_path, reg, "demo-cpu")
    kinds = {o["kind"] for o in deploy.generate(reg, [cpu]).objects}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}   # auto: no queue metric, no /metrics
    for how in ("keda", "hpa"):
        proc = forge_cli("deploy", cpu.id[:12], "--autoscale", how, "--out", str(tmp_path / how),
                         "--registry-dir", str(reg.root))
        assert proc.returncode == 2 and "exposes no queue metric" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / how).exists()


@pytest.mark.parametrize("gate,scan,status", [(False, "pass", "rejected"), (True, "fail", "rejected")])
def test_only_validated_records_deploy(tmp_path, reg, gate, scan, status):
    rec = _case(tmp_path, reg, "demo-cpu", gate=gate, scan=scan)
    assert rec.status == status
    proc = forge_cli("deploy", rec.id[:12], "--out", str(tmp_path / "out"), "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and f"is {status}" in proc.stderr and rec.reason in proc.stderr
    assert "only a validated artifact can be deployed" in proc.stderr and not (tmp_path / "out").exists()


def test_a_record_gated_on_a_proxy_deploys_only_when_the_user_says_so(tmp_path, reg):
    """A vLLM H100 image whose gate ran with transformers on a CPU (as the variants demo's GPU variants are gated
    here) is proxy-validated: deploy refuses it, naming where it was evaluated and the opt-in; with
    --accept-proxy-eval it writes the manifests, whose labels say the status."""
    rec = _case(tmp_path, reg, "vllm-h100-tp2", evaluated_on=("cpu", "CPU"))
    assert rec.status == "proxy-validated"
    assert "evaluated with transformers (hf) on cpu; the image serves vllm on H100-SXM" in rec.reason
    proc = forge_cli("deploy", rec.id[:12], "--out", str(tmp_path / "out"), "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and "is proxy-validated" in proc.stderr and "--accept-proxy-eval" in proc.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in proc.stderr
    proc = forge_cli("deploy", rec.id[:12], "--out", str(tmp_path / "out"), "--registry-dir", str(reg.root),
                     "--accept-proxy-eval")
    assert proc.returncode == 0, proc.stderr
    assert "proxy-validated" in "".join(p.read_text() for p in (tmp_path / "out").glob("*.yaml"))   # the labels


def test_a_root_image_and_a_changed_recipe_are_refused(tmp_path, reg):
    rec = _case(tmp_path, reg, "demo-cpu", user="0:0")
    with pytest.raises(UsageError, match="runs as '0:0'"):
        deploy.generate(reg, [rec])
    changed = tmp_path / "recipe.yaml"
    changed.write_text((DATA / "demo-cpu.yaml").read_text() + "\n# edited\n")
    ok = make_record(tmp_path / "c", reg, changed, (DATA / CASES["demo-cpu"][1]).read_bytes(), CPU)
    built = changed.read_bytes()
    changed.write_text(changed.read_text() + "# edited again\n")
    with pytest.raises(UsageError, match="has changed since"):   # named explicitly: it must be what was built
        deploy.generate(reg, [ok], deploy.Options(recipe=changed))
    # not named: the edited file at the recorded path is not what was built, so the record's own copy is deployed
    assert [ev.files for ev in ok.evidence if ev.kind == "recipe"] == [{"recipe.yaml": ok.recipe_digest}]
    assert reg.blobs.read(ok.recipe_digest) == built
    assert deploy.generate(reg, [ok]).objects
    changed.unlink()
    assert deploy.generate(reg, [ok]).objects   # and with no file at all (deploying from the registry alone)
    # a record from before recipes were evidence, without its file: says what to pass
    old = ok.model_copy(update={"evidence": tuple(ev for ev in ok.evidence if ev.kind != "recipe")})
    with pytest.raises(UsageError, match="carries no copy.*"):
        deploy.generate(reg, [old])
    # a recipe blob that is not the recipe the record names (edited in the store) is refused, not deployed
    reg.blobs.blob_path(ok.recipe_digest).chmod(0o644)
    reg.blobs.blob_path(ok.recipe_digest).write_bytes(built + b"# tampered\n")
    with pytest.raises(EvidenceError, match="recipe evidence"):
        deploy.generate(reg, [ok])


def test_kube_version_is_a_stated_one(tmp_path, reg):
    rec = _case(tmp_path, reg, "demo-cpu")
    with pytest.raises(UsageError, match="--kube-version 1.20: no Kubernetes schemas"):
        deploy.generate(reg, [rec], deploy.Options(kube_version="1.20"))
    assert deploy.generate(reg, [rec], deploy.Options(kube_version="1.37")).objects
    old = deploy.generate(reg, [rec], deploy.Options(kube_version="1.29")).objects   # no preStop sleep action yet
    assert "lifecycle" not in old[0]["spec"]["template"]["spec"]["containers"][0]


def test_variants_get_one_deployment_each_pinned_to_their_gpu(tmp_path, reg):
    a = _case(tmp_path, reg, "vllm-h100-tp2")
    b = _case(tmp_path, reg, "demo-cpu")
    objects = deploy.generate(reg, [a, b]).objects
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == ["llama-3-1-70b-instruct-fp8-h100-sxm", "smollm2-135m-demo-cpu"]
    assert problems(list(objects), None) == []


# ---------------------------------------------------------------------- validation catches what it must

def _edit(out: Path, kind: str, change) -> None:
    from forge.deploy.kustomize import KUSTOMIZATION, _yaml, dump

    for p in out.iterdir():
        if p.name != KUSTOMIZATION and p.name.endswith(f"-{kind.lower()}.yaml"):
            obj = _yaml().load(p.read_text())
            change(obj)
            p.write_text(dump(obj))
            return
    raise AssertionError(kind)


def _container(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


EDITS = {
    "typo": ("Deployment", lambda o: _container(o).update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    "gpu-limit": ("Deployment", lambda o: _container(o)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
                  "nvidia.com/gpu request 2 != limit 1"),
    "command": ("Deployment", lambda o: _container(o).update(command=["vllm", "serve", "/tmp"]), "not the image's command"),
    "tag": ("Deployment", lambda o: _container(o).update(image="vllm/vllm-openai:latest"), "not pinned by digest"),
    "probe-port": ("Deployment", lambda o: _container(o)["startupProbe"]["httpGet"].update(port=9000),
                   "startupProbe port 9000 is not a port of the container"),
    "selector": ("Service", lambda o: o["spec"]["selector"].update({"app.kubernetes.io/name": "other"}),
                 "selects no Deployment's pods"),
    "pdb": ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/instance": "x"}),
            "selects no Deployment's pods"),
    "scale-target": ("ScaledObject", lambda o: o["spec"]["scaleTargetRef"].update(name="gone"), "is not a Deployment here"),
    "keda-typo": ("ScaledObject", lambda o: o["spec"].update(minReplicas=1), "spec.minReplicas: unknown field"),
    "keda-type": ("ScaledObject", lambda o: o["spec"].update(maxReplicaCount="8"), "maxReplicaCount"),
    "monitor-port": ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(port="metrics"),
                     "endpoint port 'metrics' is not a named port"),
    "monitor-typo": ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="5s"), "intervall: unknown field"),
    "unknown-kind": ("Service", lambda o: o.update(apiVersion="example.com/v1", kind="Widget"), "no schema for example.com/v1 Widget"),
}


@pytest.fixture
def vllm_dir(tmp_path, reg):
    rec = _case(tmp_path, reg, "vllm-h100-tp2")
    out = tmp_path / "out"
    deploy.write(deploy.generate(reg, [rec]), out)
    return out


def test_check_passes_an_untouched_directory(vllm_dir, reg):
    assert deploy.check(vllm_dir, reg) == (5, [])


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_check_finds_each_broken_edit(vllm_dir, reg, edit):
    kind, change, message = EDITS[edit]
    _edit(vllm_dir, kind, change)
    _, found = deploy.check(vllm_dir, reg)
    assert any(message in p for p in found), found


def test_check_cli_exit_codes(vllm_dir, reg):
    ok = forge_cli("deploy", "--check", str(vllm_dir), "--registry-dir", str(reg.root), check=0)
    assert "5 objects valid" in ok.stdout
    _edit(vllm_dir, "Deployment", EDITS["gpu-limit"][1])
    bad = forge_cli("deploy", "--check", str(vllm_dir), "--registry-dir", str(reg.root))
    assert bad.returncode == 2 and "request 2 != limit 1" in bad.stderr and "Traceback" not in bad.stderr


def test_a_directory_not_written_by_forge_is_never_overwritten(tmp_path, reg):
    rec = _case(tmp_path, reg, "demo-cpu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not written by forge deploy"):
        deploy.write(deploy.generate(reg, [rec]), mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    deploy.write(deploy.generate(reg, [rec]), again)
    deploy.write(deploy.generate(reg, [rec], deploy.Options(replicas=2)), again)   # forge's own: replaced whole
    assert "replicas: 2" in next(again.glob("*-deployment.yaml")).read_text()


def test_a_record_pulled_from_an_oci_registry_deploys_on_a_machine_without_its_recipe(tmp_path, reg, oci_registry):
    """Issue 29: a record built in CI deploys from the registry alone (`forge registry pull`, then `forge deploy`);
    a pulled record whose claimed status its evidence does not support is refused and recorded nowhere."""
    from forge.registry import remote

    recipe = tmp_path / "ci" / "demo-cpu.yaml"
    recipe.parent.mkdir()
    recipe.write_bytes((DATA / "demo-cpu.yaml").read_bytes())
    rec = make_record(tmp_path / "build", reg, recipe, (DATA / CASES["demo-cpu"][1]).read_bytes(), CPU)
    url = f"oci://{oci_registry}/forge/deploy-elsewhere"
    pushed = remote.push(rec, reg.blobs, remote.Remote.parse(url))
    here = forge_cli("deploy", rec.id[:12], "--out", str(tmp_path / "here"), "--registry-dir", str(reg.root), check=0)
    recipe.unlink()   # the other machine has neither the recipe nor the record

    elsewhere = tmp_path / "elsewhere"
    proc = forge_cli("registry", "pull", pushed, "--registry-dir", str(elsewhere), check=0)
    assert "re-derived from its evidence" in proc.stdout
    pulled = LocalRegistry(elsewhere).resolve(rec.image_digest)
    assert (pulled.id, pulled.status, pulled.remote) == (rec.id, "validated", pushed)
    assert forge_cli("registry", "verify", rec.id[:12], "--registry-dir", str(elsewhere)).returncode == 0
    proc = forge_cli("deploy", f"{rec.name}@{rec.image_digest}", "--out", str(tmp_path / "there"),
                     "--registry-dir", str(elsewhere), check=0)
    assert here.returncode == 0 and "there" in proc.stdout
    there = {p.name: p.read_text() for p in (tmp_path / "there").iterdir()}
    assert sorted(there) == sorted(p.name for p in (tmp_path / "here").iterdir())
    assert pushed.removeprefix("oci://") in "".join(there.values())   # pulls the image from where it was pushed
    # the same objects as on the machine that built it, but for where the image is pulled from
    assert there == {p.name: p.read_text().replace(f"forge.local/{rec.name}@", pushed.removeprefix("oci://").split("@")[0] + "@")
                     for p in (tmp_path / "here").iterdir()}

    # a record artifact claiming "validated" for a build whose gate failed: the evidence decides, nothing recorded
    failed = make_record(tmp_path / "failed", reg, DATA / "demo-cpu.yaml", (DATA / CASES["demo-cpu"][1]).read_bytes(),
                         CPU, gate=False)
    assert failed.status == "rejected"
    forged = failed.model_copy(update={"status": "validated", "tag": failed.id[:12]})
    client = remote.Client(remote.Remote.parse(url))
    for d, _ in reg.blobs.image_blobs(forged.image_digest):
        if d != forged.image_digest:
            client.put_blob(reg.blobs.blob_path(d), d, reg.blobs.blob_path(d).stat().st_size)
    client.put_manifest(reg.blobs.read(forged.image_digest), "application/vnd.oci.image.manifest.v1+json", forged.tag)
    descriptors = []
    for digest in [ev.manifest_digest for ev in forged.evidence] + [remote.record_artifact(forged, reg.blobs)]:
        m = json.loads(reg.blobs.read(digest))
        for blob in [m["config"], *m["layers"]]:
            client.put_blob(reg.blobs.blob_path(blob["digest"]), blob["digest"], blob["size"])
        client.put_manifest(reg.blobs.read(digest), "application/vnd.oci.image.manifest.v1+json", digest)
        descriptors.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                            "size": len(reg.blobs.read(digest)), "artifactType": m["artifactType"]})
    client.add_referrers(forged.image_digest, descriptors)
    proc = forge_cli("registry", "pull", f"{url}:{forged.tag}", "--registry-dir", str(tmp_path / "third"))
    assert proc.returncode == 5 and "recorded as validated, but the evidence says rejected" in proc.stderr, proc.stderr
    assert LocalRegistry(tmp_path / "third").ls() == []
