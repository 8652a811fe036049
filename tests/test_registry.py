"""The registry: records and statuses, the embedded store (verify, tamper, promote, pull, concurrency), and
publishing to a real OCI Distribution registry (Debian's docker-registry) with evidence as referrers."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import evaluated_on, forge_cli, gate_rule, gate_verdict, make_image, output_files

from forge.registry import LocalRegistry, publish
from forge.oci.layout import REF_NAME
from forge.registry.evidence import decide, proxy_reason


# ---------------------------------------------------------------------- fixtures: a build's step outputs

def _result(out: Path, facts: dict, digest: str = "sha256:" + "ab" * 32, tools: dict | None = None, step: str = "step"):
    """A committed step's result as publish reads it: its manifest records each output file's digest."""
    entry = SimpleNamespace(out=out, manifest={"step": step, "facts": facts, "inputs": {"tools": tools or {}},
                                               "output": {"files": output_files(out) if step != "step" else {}}})
    return SimpleNamespace(entry=entry, output_digest=digest)


def make_build(root: Path, name: str = "tiny", *, gate_passed=True, scan="pass", image=True, seed: str = "0",
               registry: str = "local", members: dict[str, bytes] | None = None, rules: int = 1,
               on: tuple[str, str] | None = ("vllm", "L40S")):
    """(loaded, results) shaped like a finished forge build, from files written here (``members``: more
    weights-layer members, named as in the tar)."""
    root.mkdir(parents=True, exist_ok=True)
    results = {"resolve": _result(root, {}, "sha256:" + "11" * 32),
               "quantize": _result(root, {"method": "fp8"}, "sha256:" + hashlib.sha256(seed.encode()).hexdigest(),
                                   {"llmcompressor": "0.14.0.1"})}
    (root / "gate").mkdir()
    (root / "gate" / "verdict.json").write_text(gate_verdict(gate_passed, rules, on=on, seed=seed))
    results["gate"] = _result(root / "gate", {"passed": gate_passed}, step="gate")
    if image:
        (root / "package").mkdir()
        digest = make_image(root / "package" / "oci", name, {"config.json": b'{"seed": "%s"}' % seed.encode(),
                                                             "model.safetensors": b"W" * 4096 + seed.encode()},
                            members)
        (root / "package" / "image.json").write_text(json.dumps(
            {"manifest_digest": digest, "oci_ref": name, "engine": "vllm"}))
        results["package"] = _result(root / "package", {})
        (root / "scan").mkdir()
        if scan == "unscanned":
            facts = {"status": "unscanned", "passed": None, "reason": "trivy is not on PATH"}
        else:
            facts = {"passed": scan == "pass", "summary": "0 findings" if scan == "pass" else "failed: 2 HIGH",
                     "blocking": [] if scan == "pass" else [{"id": "CVE-2026-1"}, {"id": "CVE-2026-2"}]}
            (root / "scan" / "trivy-report.json").write_text('{"SchemaVersion": 2, "Results": []}')
            (root / "scan" / "sbom.cdx.json").write_text('{"bomFormat": "CycloneDX"}')
        (root / "scan" / "verdict.json").write_text(json.dumps(facts))
        results["scan"] = _result(root / "scan", facts, step="scan")
    recipe = SimpleNamespace(name=name, model=SimpleNamespace(source="hf://org/tiny@" + "c" * 40),
                             quantize=SimpleNamespace(method="fp8"), target=SimpleNamespace(gpu="L40S"),
                             publish=SimpleNamespace(registry=registry), container=None)
    (root / "recipe.yaml").write_text(f"# recipe {seed}\n")   # its bytes are evidence: the digest is theirs
    loaded = SimpleNamespace(recipe=recipe, digest="sha256:" + hashlib.sha256(f"# recipe {seed}\n".encode()).hexdigest(),
                             path=root / "recipe.yaml", base=None)   # a resolved recipe, as far as publish reads it
    return loaded, results


# ---------------------------------------------------------------------- status rules

@pytest.mark.parametrize("gate,scan,image,status", [
    ({"rules": 1, "passed": True}, {"status": "scanned", "passed": True}, True, "validated"),
    ({"rules": 1, "passed": False, "failed": ["x"]}, None, False, "rejected"),
    ({"rules": 1, "passed": True}, {"status": "scanned", "passed": False, "summary": "1 CRITICAL"}, True, "rejected"),
    ({"rules": 1, "passed": True}, {"status": "unscanned", "reason": "no trivy"}, True, "unscanned"),
    (None, {"status": "scanned", "passed": True}, True, "scanned"),
    ({"rules": 1, "passed": True}, None, False, "gated"),
    (None, None, False, "built"),
    # no rule ran: never validated, whatever else passed
    ({"rules": 0, "passed": False}, {"status": "scanned", "passed": True}, True, "ungated"),
    ({"rules": 0, "passed": False}, None, False, "ungated"),
    # fail closed: anything but an explicit pass is not one
    ({"rules": 1}, {"status": "scanned", "passed": True}, True, "rejected"),
    ({"rules": 1, "passed": True}, {"status": "scanned", "passed": None}, True, "rejected"),
])
def test_only_a_passed_gate_and_a_passed_scan_validate(gate, scan, image, status):
    assert decide(gate, scan, image)[0] == status


def test_provenance_that_does_not_name_the_image_is_not_validated():
    assert decide({"rules": 1, "passed": True}, {"status": "scanned", "passed": True}, True,
                  "it names sha256:aa, not the image sha256:bb") == (
        "rejected", "provenance: it names sha256:aa, not the image sha256:bb")


# ---------------------------------------------------------------------- embedded registry

@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def test_publish_records_everything_and_pull_returns_weights_and_evidence(tmp_path, reg):
    loaded, results = make_build(tmp_path / "b")
    rec = publish(loaded, results, registry=reg)
    assert rec.status == "validated" and rec.tag and rec.image_digest
    assert {e.kind for e in rec.evidence} == {"eval-verdict", "scan-report", "sbom", "provenance", "recipe"}
    assert next(e for e in rec.evidence if e.kind == "recipe").files == {"recipe.yaml": rec.recipe_digest}
    assert rec.eval_digest in next(e for e in rec.evidence if e.kind == "eval-verdict").files.values()
    assert rec.tool_versions == {"llmcompressor": "0.14.0.1"}

    listed = json.loads(forge_cli("registry", "ls", "--json", "--registry-dir", str(reg.root), check=0).stdout)
    assert [r["id"] for r in listed] == [rec.id]
    assert forge_cli("registry", "verify", f"tiny:{rec.tag}", "--registry-dir", str(reg.root), check=0)
    refs = json.loads(forge_cli("registry", "referrers", "tiny", "--json", "--registry-dir", str(reg.root),
                                check=0).stdout)["local"]
    assert sorted(r["artifactType"] for r in refs) == sorted(e.artifact_type for e in rec.evidence)

    forge_cli("registry", "pull", rec.id[:10], "--to", str(tmp_path / "pulled"), "--registry-dir", str(reg.root), check=0)
    assert (tmp_path / "pulled" / "model" / "model.safetensors").read_bytes() == b"W" * 4096 + b"0"
    assert json.loads((tmp_path / "pulled" / "evidence" / "eval-verdict" / "verdict.json").read_text())["passed"]
    statement = json.loads((tmp_path / "pulled" / "evidence" / "provenance" / "provenance.intoto.json").read_text())
    assert statement["subject"][0]["digest"]["sha256"] == rec.image_digest[7:]
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"

    # the store is a valid OCI layout other tools read: skopeo finds the image by its name:tag
    proc = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{reg.blobs.root}:tiny:{rec.tag}"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert "sha256:" + hashlib.sha256(proc.stdout).hexdigest() == rec.image_digest


def test_pull_keeps_dot_names_and_takes_only_the_model_dir(tmp_path, reg):
    """Bug: member names lost their leading "./" by lstrip("./"), which strips any leading dots and slashes: a
    member outside the model directory (".opt/...", "../opt/...") was pulled as a model file. Every "./" prefix
    goes ("././x" too), never a character more; a dot-file of the model keeps its own name."""
    loaded, results = make_build(tmp_path / "b", members={
        "./opt/forge/model/.hidden_config": b"hidden", "././opt/forge/model/..x": b"dots",
        ".opt/forge/model/not-the-model.json": b"outside", "../opt/forge/model/escaped.json": b"outside"})
    rec = publish(loaded, results, registry=reg)
    forge_cli("registry", "pull", rec.id[:10], "--to", str(tmp_path / "pulled"), "--registry-dir", str(reg.root), check=0)
    model = tmp_path / "pulled" / "model"
    assert sorted(p.name for p in model.iterdir()) == ["..x", ".hidden_config", "config.json", "model.safetensors"]
    assert (model / ".hidden_config").read_bytes() == b"hidden" and (model / "..x").read_bytes() == b"dots"


def test_republishing_the_same_build_adds_nothing(tmp_path, reg):
    loaded, results = make_build(tmp_path / "b")
    first = publish(loaded, results, registry=reg)
    before = reg.blobs.index()
    second = publish(loaded, results, registry=reg)
    assert second == first and len(reg.ls()) == 1 and reg.blobs.index() == before


@pytest.mark.parametrize("target", ["weights layer", "evidence"])
def test_one_flipped_byte_fails_verify_naming_the_blob(tmp_path, reg, target):
    loaded, results = make_build(tmp_path / "b")
    rec = publish(loaded, results, registry=reg)
    if target == "weights layer":
        digest = json.loads(reg.blobs.read(rec.image_digest))["layers"][-1]["digest"]
    else:
        digest = next(e for e in rec.evidence if e.kind == "scan-report").files["trivy-report.json"]
    path = reg.blobs.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    proc = forge_cli("registry", "verify", "tiny", "--registry-dir", str(reg.root))
    assert proc.returncode == 5
    assert digest in proc.stderr and "do not verify" in proc.stderr
    proc = forge_cli("registry", "pull", "tiny", "--to", str(tmp_path / "p"), "--registry-dir", str(reg.root))
    assert proc.returncode == 5 and digest in proc.stderr and "Traceback" not in proc.stderr


def test_promote_validated_only(tmp_path, reg):
    ok = publish(*make_build(tmp_path / "ok", seed="1"), registry=reg)
    proc = forge_cli("registry", "promote", f"tiny:{ok.tag}", "--to", "prod", "--registry-dir", str(reg.root), check=0)
    assert "tiny:prod" in proc.stdout
    assert reg.resolve("tiny:prod").status == "promoted"
    assert "tiny:prod" in {d.get("annotations", {}).get(REF_NAME) for d in reg.blobs.index()["manifests"]}

    unscanned = publish(*make_build(tmp_path / "u", seed="2", scan="unscanned"), registry=reg)
    rejected = publish(*make_build(tmp_path / "r", seed="3", scan="fail"), registry=reg)
    gate_failed = publish(*make_build(tmp_path / "g", seed="4", gate_passed=False, image=False), registry=reg)
    ungated = publish(*make_build(tmp_path / "n", seed="5", rules=0), registry=reg)
    assert rejected.tag is None and gate_failed.tag is None and "eval gate failed" in gate_failed.reason
    assert ungated.status == "ungated" and ungated.eval_verdict == "ungated" and "no rules" in ungated.reason
    for rec, why in ((unscanned, "trivy is not on PATH"), (rejected, "scan gate failed: 2 HIGH"),
                     (gate_failed, "heldout_ppl.word_perplexity"), (ungated, "nothing was gated")):
        proc = forge_cli("registry", "promote", rec.id[:12], "--to", "prod", "--registry-dir", str(reg.root))
        assert proc.returncode == 2 and why in proc.stderr and rec.status in proc.stderr, proc.stderr
    assert reg.resolve("tiny:prod").id == ok.id  # nothing moved the tag
    statuses = json.loads(forge_cli("registry", "ls", "--json", "--status", "rejected",
                                    "--registry-dir", str(reg.root), check=0).stdout)
    assert {r["id"] for r in statuses} == {rejected.id, gate_failed.id}
    listed = json.loads(forge_cli("registry", "ls", "--json", "--status", "ungated", "--registry-dir", str(reg.root),
                                  check=0).stdout)
    assert [r["id"] for r in listed] == [ungated.id]


# ---------------------------------------------------------------------- status from evidence

def _flip_first_rule(verdict: bytes, passed: bool) -> bytes:
    doc = json.loads(verdict)
    doc["rules"][0] = gate_rule(passed)
    doc["passed"] = passed
    return json.dumps(doc).encode()


def test_the_record_says_how_its_status_was_derived(tmp_path, reg):
    rec = publish(*make_build(tmp_path / "b"), registry=reg)
    how = rec.status_evidence
    assert rec.status == "validated" and "at least one gated rule" in how["rule"]
    assert how["eval-verdict"] == {"file": "verdict.json", "digest": rec.eval_digest, "rules": 1, "passed": True,
                                   "failed": [], "said": "pass", "evaluated_on": evaluated_on("vllm", "L40S"),
                                   "ships": {"engine": "vllm", "gpu": "L40S"}, "proxy": None,
                                   "through_image": False}   # evaluated by vLLM on the GPU, not through the image
    assert how["scan-report"]["digest"] == rec.scan_digest and how["scan-report"]["said"] == "pass"
    assert how["provenance"]["digest"] == rec.provenance_digest and how["provenance"]["subject"] == rec.image_digest
    assert how["provenance"]["said"] == "names the image" and how["image"] == rec.image_digest
    proc = forge_cli("registry", "verify", rec.id[:12], "--registry-dir", str(reg.root), check=0)
    assert "status validated re-derived from the evidence" in proc.stdout


@pytest.mark.parametrize("on,engine,gpu,proxy", [
    (("cpu", "CPU"), "cpu", "CPU", None),                       # the CPU image serves with transformers, as hf evaluated
    (("vllm", "L4"), "vllm", "L4", None),                       # vLLM on an L4, shipped for an L4
    (("cpu", "CPU"), "vllm", "L4", "evaluated with transformers (hf) on cpu; the image serves vllm on L4"),
    (("vllm", "L4"), "vllm", "H100-SXM", "evaluated with vllm (vllm) on NVIDIA L4; the image serves vllm on H100-SXM"),
    (("vllm", "L4"), "tgi", "L4", "evaluated with vllm (vllm) on NVIDIA L4; the image serves tgi on L4"),
    (None, "cpu", "CPU", "the verdict does not say where the candidate was evaluated"),   # fail closed
])
def test_a_gate_is_a_proxys_unless_the_candidate_ran_on_the_shipped_engine_and_gpu(on, engine, gpu, proxy):
    assert proxy_reason(evaluated_on(*on) if on else None, engine, gpu) == proxy


def test_a_proxy_validated_record_is_shown_and_promoted_only_when_the_user_says_so(tmp_path, reg):
    """The variants demo's GPU images are gated by transformers on a CPU: every gate passes, the status says it was
    a proxy's, `registry ls`/`show` tell it apart, promote refuses it without --accept-proxy-eval, and a promotion
    with it is recorded and still re-derives."""
    rec = publish(*make_build(tmp_path / "b", on=("cpu", "CPU")), registry=reg)   # ships vllm on L40S
    assert rec.status == "proxy-validated" and rec.tag   # tagged like any image, not promotable as it stands
    assert rec.reason.startswith("gated on a proxy: evaluated with transformers (hf) on cpu; the image serves vllm on L40S")
    args = ("--registry-dir", str(reg.root))
    listed = json.loads(forge_cli("registry", "ls", "--json", *args, check=0).stdout)
    assert [r["status"] for r in listed] == ["proxy-validated"]
    shown = forge_cli("registry", "show", rec.id[:12], *args, check=0).stdout
    assert "transformers (lm-eval hf) on cpu; ships vllm on L40S (a proxy's numbers)" in shown
    assert "status proxy-validated re-derived" in forge_cli("registry", "verify", rec.id[:12], *args, check=0).stdout
    proc = forge_cli("registry", "promote", rec.id[:12], "--to", "prod", *args)
    assert proc.returncode == 2 and "is proxy-validated" in proc.stderr and "--accept-proxy-eval" in proc.stderr
    forge_cli("registry", "promote", rec.id[:12], "--to", "prod", "--accept-proxy-eval", *args, check=0)
    promoted = reg.get(rec.id)
    assert promoted.status == "promoted" and promoted.accepted_proxy_eval
    assert any("--accept-proxy-eval" in detail for _, _, detail in reg.events(promoted))
    assert reg.verify(promoted) == []   # promoted with the opt-in: the evidence's proxy-validated supports it


@pytest.mark.parametrize("passed", [False, True], ids=["flipped-to-failed", "flipped-to-passed"])
def test_a_verdict_edited_in_the_step_cache_is_refused_by_publish(tmp_path, reg, passed):
    from forge.core.errors import EvidenceError

    loaded, results = make_build(tmp_path / "b", gate_passed=not passed)
    verdict = results["gate"].entry.out / "verdict.json"
    verdict.write_bytes(_flip_first_rule(verdict.read_bytes(), passed))
    with pytest.raises(EvidenceError, match="was modified after the gate step committed it") as e:
        publish(loaded, results, registry=reg)
    assert e.value.exit_code == 5 and str(verdict) in e.value.message
    assert reg.ls() == []


def test_a_manifest_fact_never_outvotes_the_verdict_file(tmp_path, reg):
    loaded, results = make_build(tmp_path / "b", gate_passed=False)
    results["gate"].entry.manifest["facts"] = {"passed": True, "failed": []}   # the file says failed
    rec = publish(loaded, results, registry=reg)
    assert rec.status == "rejected" and rec.reason.startswith("eval gate failed: heldout_ppl.word_perplexity")


def test_verify_fails_when_a_stored_verdict_is_edited_or_the_status_is_not_supported(tmp_path, reg):
    rec = publish(*make_build(tmp_path / "b"), registry=reg)
    blob = reg.blobs.blob_path(rec.eval_digest)
    original = blob.read_bytes()
    blob.write_bytes(_flip_first_rule(original, False))          # a rule flipped to failed, in the store
    proc = forge_cli("registry", "verify", rec.id[:12], "--registry-dir", str(reg.root))
    assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr
    err = " ".join(proc.stderr.split())
    assert f"eval-verdict verdict.json: blob {rec.eval_digest}" in err
    assert "recorded as validated, but the evidence says rejected (eval gate failed" in err
    blob.write_bytes(original)
    assert reg.verify(rec) == []

    # every blob intact, but the row says more than the evidence: a rejected build marked validated
    bad = publish(*make_build(tmp_path / "r", seed="2", scan="fail"), registry=reg)
    assert bad.status == "rejected"
    reg.update(bad.model_copy(update={"status": "validated"}), "edited by hand")
    proc = forge_cli("registry", "verify", bad.id[:12], "--registry-dir", str(reg.root))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 5 and "recorded as validated, but the evidence says rejected (scan gate failed" in err
    assert bad.scan_digest in err   # the scan verdict decided it

    # the record names a provenance digest that is not its provenance evidence
    other = publish(*make_build(tmp_path / "o", seed="3"), registry=reg)
    reg.update(other.model_copy(update={"provenance_digest": "sha256:" + "0" * 64}), "edited by hand")
    proc = forge_cli("registry", "verify", other.id[:12], "--registry-dir", str(reg.root))
    assert proc.returncode == 5 and "provenance: blob sha256:" + "0" * 64 in " ".join(proc.stderr.split())

    # the record's account of how its status was derived, edited
    told = publish(*make_build(tmp_path / "t", seed="4"), registry=reg)
    how = {**told.status_evidence, "scan-report": {**told.status_evidence["scan-report"], "said": "unscanned"}}
    reg.update(told.model_copy(update={"status_evidence": how}), "edited by hand")
    assert [p[1:] for p in reg.verify(reg.get(told.id))] == [
        ("status_evidence", "the record's account of how its status was derived does not match its evidence")]


def _publish_one(args):
    root, build_dir, seed = args
    loaded, results = make_build(Path(build_dir), seed=seed)
    return publish(loaded, results, registry=LocalRegistry(Path(root))).id


def test_four_parallel_publishes_lose_and_duplicate_nothing(tmp_path):
    root = tmp_path / "registry"
    LocalRegistry(root)
    # four different builds, and the first one published a second time at the same moment
    jobs = [(str(root), str(tmp_path / f"b{i}"), str(i)) for i in range(4)]
    jobs.append((str(root), str(tmp_path / "b0-again"), "0"))
    with multiprocessing.get_context("spawn").Pool(5) as pool:
        ids = pool.map(_publish_one, jobs)
    reg = LocalRegistry(root)
    records = reg.ls()
    assert len(records) == 4 and {r.id for r in records} == set(ids)
    index = reg.blobs.index()["manifests"]
    images = [d for d in index if "artifactType" not in d]
    assert sorted(d["digest"] for d in images) == sorted(r.image_digest for r in records)
    assert len(index) == len({json.dumps(d, sort_keys=True) for d in index})  # no descriptor twice
    for r in records:
        assert reg.verify(r) == []
        assert len(reg.referrers(r)) == 5   # eval verdict, scan report, SBOM, recipe, provenance
        assert len(reg.events(r)) == 1


# ---------------------------------------------------------------------- a real OCI registry

def _get(url: str, accept: str = "application/vnd.oci.image.index.v1+json") -> tuple[int, bytes, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_push_evidence_referrers_pull_and_promote_on_a_real_registry(tmp_path, reg, oci_registry, monkeypatch):
    monkeypatch.setenv("FORGE_REGISTRY_USER", "ci-bot")
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", "s3cret-registry-pw")   # this registry ignores auth; it must not leak
    url = f"oci://{oci_registry}/forge/tiny"
    loaded, results = make_build(tmp_path / "b", registry=url)
    rec = publish(loaded, results, registry=reg)
    assert rec.remote == f"{url}@{rec.image_digest}"
    base = f"http://{oci_registry}/v2/forge/tiny"

    tags = json.loads(_get(f"{base}/tags/list")[1])["tags"]
    fallback = "sha256-" + rec.image_digest[7:]
    assert rec.tag in tags and fallback in tags
    # Distribution 2.8 has no referrers API, so forge kept the referrers tag schema index itself
    assert _get(f"{base}/referrers/{rec.image_digest}")[0] == 404
    status, body, _ = _get(f"{base}/manifests/{fallback}")
    index = json.loads(body)
    assert status == 200 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    # every piece of evidence, and the record itself (what `forge registry pull` takes in elsewhere)
    assert sorted(d["artifactType"] for d in index["manifests"]) == sorted(
        [e.artifact_type for e in rec.evidence] + ["application/vnd.forge.record.v1+json"])
    for d in index["manifests"]:
        status, body, headers = _get(f"{base}/manifests/{d['digest']}", "application/vnd.oci.image.manifest.v1+json")
        m = json.loads(body)
        assert m["subject"]["digest"] == rec.image_digest and m["artifactType"] == d["artifactType"]
        assert headers["Docker-Content-Digest"] == d["digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    # the image kept its digest
    assert _get(f"{base}/manifests/{rec.tag}", "application/vnd.oci.image.manifest.v1+json")[2][
        "Docker-Content-Digest"] == rec.image_digest

    # republish: idempotent, no second copy of any referrer
    publish(loaded, results, registry=reg)
    assert len(json.loads(_get(f"{base}/manifests/{fallback}")[1])["manifests"]) == len(rec.evidence) + 1

    # pull it back from the registry alone (another machine has no local record)
    proc = forge_cli("registry", "pull", f"{url}:{rec.tag}", "--to", str(tmp_path / "pulled"),
                     "--registry-dir", str(tmp_path / "empty-registry"), check=0)
    assert (tmp_path / "pulled" / "model" / "model.safetensors").read_bytes() == b"W" * 4096 + b"0"
    assert {p.name for p in (tmp_path / "pulled" / "evidence").iterdir()} == {e.kind for e in rec.evidence}
    listed = json.loads(forge_cli("registry", "referrers", rec.tag, "--json", "--registry-dir", str(reg.root),
                                  check=0).stdout)
    assert listed["remote_via"] == "tag-schema" and len(listed["remote"]) == len(rec.evidence) + 1

    # verify --remote re-hashes what the registry serves; a blob deleted there is named
    proc = forge_cli("registry", "verify", rec.id[:12], "--remote", "--registry-dir", str(reg.root), check=0)
    assert "here and in oci://" in proc.stdout
    sbom = next(e for e in rec.evidence if e.kind == "sbom").files["sbom.cdx.json"]
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{base}/blobs/{sbom}", method="DELETE"), timeout=10)
    proc = forge_cli("registry", "verify", rec.id[:12], "--remote", "--registry-dir", str(reg.root))
    assert proc.returncode == 5 and sbom in proc.stderr and "missing from the registry" in proc.stderr
    assert forge_cli("registry", "verify", rec.id[:12], "--registry-dir", str(reg.root)).returncode == 0  # local copy intact

    # promote re-tags remotely too, same digest
    forge_cli("registry", "promote", rec.id[:12], "--to", "prod", "--registry-dir", str(reg.root), check=0)
    assert _get(f"{base}/manifests/prod", "application/vnd.oci.image.manifest.v1+json")[2][
        "Docker-Content-Digest"] == rec.image_digest

    # a rejected build is recorded locally, never pushed
    loaded2, results2 = make_build(tmp_path / "r", seed="9", scan="fail", registry=url)
    rejected = publish(loaded2, results2, registry=reg)
    assert rejected.status == "rejected" and rejected.remote is None
    assert len(json.loads(_get(f"{base}/tags/list")[1])["tags"]) == 3   # tag, fallback, prod

    stored = (reg.root / "index.sqlite").read_bytes() + json.dumps([r.model_dump() for r in reg.ls()]).encode()
    assert b"s3cret-registry-pw" not in stored and b"s3cret-registry-pw" not in proc.stdout.encode() + proc.stderr.encode()


def test_unreachable_registry_is_exit_5_and_records_nothing(tmp_path, reg):
    from conftest import free_port

    loaded, results = make_build(tmp_path / "b", registry=f"oci://127.0.0.1:{free_port()}/forge")
    from forge.core.errors import ToolError

    with pytest.raises(ToolError, match="unreachable"):
        publish(loaded, results, registry=reg)
    assert reg.ls() == []
