"""The build report: written by `forge build` and attached to the registry record, `forge report REF|RECIPE`,
and the page itself in a real browser (Debian's chromium driven by playwright): no console error, no
network request, every section and plot present with the numbers of a known build, read back from the DOM.

The known build is a real tiny fp8 build with an eval gate (resolve → quantize → evals → gate); its image and
scan are an OCI layout written here (forge's labels, three layers) judged by forge's real scan policy on a
Trivy-format report, since buildah bases and Trivy do not run in a unit test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, _blob, _tar, forge_cli, output_files, write_recipe

from forge.orchestrate.build import build
from conftest import resolved
from forge.registry import LocalRegistry, publish
from forge.report import BuildOutputs, EVIDENCE_KIND
from forge.store.local import Store

TASKS = REPO / "evals" / "tasks"
LABELS = {"dev.forge.cuda.version": "12.8", "dev.forge.driver.min": "570.26", "dev.forge.engine.version": "0.11.0",
          "org.opencontainers.image.base.name": "docker.io/vllm/vllm-openai:v0.11.0",
          "org.opencontainers.image.base.digest": "sha256:" + "5" * 64}
TRIVY = {"SchemaVersion": 2, "ArtifactName": "oci", "ArtifactType": "container_image", "Results": [{
    "Target": "debian 12.8", "Class": "os-pkgs", "Type": "debian", "Vulnerabilities": [
        {"VulnerabilityID": "CVE-2026-1111", "PkgName": "openssl", "InstalledVersion": "3.0.15-1",
         "FixedVersion": "3.0.16-1", "Status": "fixed", "Severity": "HIGH", "Title": "openssl: heap overflow"},
        {"VulnerabilityID": "CVE-2026-3333", "PkgName": "libc6", "InstalledVersion": "2.36-9",
         "FixedVersion": "2.36-10", "Status": "fixed", "Severity": "LOW", "Title": "glibc: minor"}]}]}


def _image(out: Path, name: str) -> None:
    """package/: an OCI layout with a base, a runtime and a weights layer, forge's labels and history."""
    layout = out / "oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers = [_blob(layout, _tar({"etc/os-release": b"ID=debian\n" * 400})),
              _blob(layout, _tar({"usr/bin/serve": bytes(range(256)) * 64})),
              _blob(layout, _tar({"opt/forge/model/model.safetensors": bytes(range(256)) * 4096}))]
    history = [{"created_by": "base rootfs"}, {"created_by": "RUN pip install vllm"}, {"empty_layer": True,
               "created_by": "ENV HF_HUB_OFFLINE=1"}, {"created_by": "COPY model /opt/forge/model"}]
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": LABELS},
                                       "history": history, "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **x}
                                      for x in layers]}).encode()
    desc = _blob(layout, manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **desc,
         "annotations": {"org.opencontainers.image.ref.name": name}}]}))
    (out / "image.json").write_text(json.dumps({
        "manifest_digest": desc["digest"], "config_digest": config["digest"], "layers": [x["digest"] for x in layers],
        "weights_layer": layers[-1]["digest"], "oci_ref": name, "base": "vllm-0.11-cu128", "engine": "vllm",
        "builder": "buildah", "build_seconds": 12.5}))


def _scan(out: Path) -> dict:
    from forge.steps.scan import Policy, judge_report

    (out.parent / "trivy.json").write_text(json.dumps(TRIVY))
    verdict = judge_report(out.parent / "trivy.json", out, Policy())
    (out / "sbom.cdx.json").write_text(json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [
        {"type": "library", "name": n} for n in ("openssl", "libc6", "vllm")]}))
    return {"status": "scanned", "passed": verdict.passed, "summary": verdict.summary}


def _result(name: str, out: Path, facts: dict, digest: str):
    """A committed step's result: its manifest records the digest of each output file (publish checks them)."""
    entry = SimpleNamespace(out=out, manifest={"step": name, "facts": facts, "inputs": {"tools": {}}, "seconds": 3.0,
                                               "started_at": "2026-11-30T07:00:00+00:00",
                                               "output": {"files": output_files(out)}})
    return SimpleNamespace(name=name, status="BUILT", key=digest[7:], output_digest=digest, seconds=3.0, entry=entry)


@pytest.fixture(scope="module")
def known(tmp_path_factory, tiny_llama):
    """A finished build: real steps up to the gate, then the image and scan; published with its report."""
    root = tmp_path_factory.mktemp("report")
    recipe = write_recipe(root / "tiny-report.yaml", str(tiny_llama), name="tiny-report",
                          target={"gpu": "L4", "engine": "vllm"}, quantize={"method": "fp8"},
                          eval={"tasks": [str(TASKS / "heldout_ppl.yaml"), str(TASKS / "capitals_mc.yaml")], "limit": 6,
                                "gate": [{"task": "heldout_ppl", "metric": "word_perplexity", "max_rel_increase": 5.0},
                                         # an accuracy rule on 6 documents is underpowered: it cannot pass
                                         {"task": "heldout_ppl", "metric": "bits_per_byte", "max_rel_increase": 0.5}]})
    loaded, store = resolved(recipe), Store(root / "cache")
    results = {r.name: r for r in build(loaded, store)}
    (root / "package").mkdir()
    _image(root / "package", loaded.recipe.name)
    results["package"] = _result("package", root / "package", {}, "sha256:" + "a" * 64)
    results["scan"] = _result("scan", root / "scan", _scan(root / "scan"), "sha256:" + "b" * 64)
    registry = LocalRegistry(root / "registry")
    outputs = BuildOutputs(root / "out", loaded, results)
    record = publish(loaded, results, registry=registry, attach=outputs.attach)
    outputs.finish()
    return SimpleNamespace(root=root, recipe=recipe, loaded=loaded, store=store, results=results, record=record,
                           registry=registry, html=outputs.html, data=outputs.data)


def test_the_report_is_attached_to_the_record_and_forge_report_gives_it_back(known, tmp_path):
    rec = known.record
    assert rec.status == "rejected" and rec.reason.startswith("scan gate failed")   # the HIGH openssl finding
    ev = next(e for e in rec.evidence if e.kind == EVIDENCE_KIND)
    assert ev.artifact_type == "application/vnd.forge.report.v1+html" and list(ev.files) == ["report.html"]
    assert known.registry.verify(rec) == []
    env = {"FORGE_REGISTRY_DIR": str(known.registry.root), "PYTHONPATH": str(REPO)}
    proc = forge_cli("report", rec.short(), "-o", str(tmp_path / "r.html"), env=env, check=0)
    assert (tmp_path / "r.html").read_bytes() == known.html.read_bytes()
    assert "r.html" in proc.stdout and "MiB" in proc.stdout
    # beside the page: the gate's JUnit and a markdown summary
    assert (known.html.parent / "junit.xml").read_text().count("<testcase") == 2
    assert "## ❌ forge build `tiny-report`: rejected" in (known.html.parent / "summary.md").read_text()
    # a corrupted report blob is refused, not served
    blob = known.registry.blobs.blob_path(ev.files["report.html"])
    saved = blob.read_bytes()
    blob.write_bytes(saved.replace(b"tiny-report", b"tiny-hacked", 1))
    try:
        proc = forge_cli("report", rec.short(), "-o", str(tmp_path / "bad.html"), env=env)
        assert proc.returncode == 5 and "does not verify" in proc.stderr and not (tmp_path / "bad.html").exists()
    finally:
        blob.write_bytes(saved)


def test_forge_build_writes_the_report_dir_and_forge_report_renders_from_the_cache(known, tmp_path):
    env = {"FORGE_REGISTRY_DIR": str(tmp_path / "reg"), "PYTHONPATH": str(REPO)}
    proc = forge_cli("build", str(known.recipe), "--report-dir", str(tmp_path / "out"), cache=known.store.root,
                     env=env, check=0)
    assert "BUILT" not in proc.stdout and f"build report {tmp_path / 'out' / 'report.html'}" in proc.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.html", "junit.xml", "summary.md"}
    shown = json.loads(forge_cli("registry", "show", "tiny-report", "--json", env=env, check=0).stdout)
    assert shown["status"] == "gated" and "report" in {e["kind"] for e in shown["evidence"]}
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="image-missing"' in page and "the recipe has no container section" in page
    proc = forge_cli("report", str(known.recipe), "-o", str(tmp_path / "cached.html"), cache=known.store.root,
                     env=env, check=0)
    assert 'id="gate-table"' in (tmp_path / "cached.html").read_text()


def test_the_same_data_is_drawn_once_and_a_changed_build_is_drawn_again(known, tmp_path, monkeypatch):
    """A no-op rebuild must not pay for drawing the page (plotly, the template: seconds): the page is cached in the
    step cache by its data, forge's version and the template; anything the page shows that changed draws it anew."""
    import forge.report
    from forge.registry.record import collect

    drawn, real = [], forge.report.render
    monkeypatch.setattr(forge.report, "render", lambda data: drawn.append(data["build"]["name"]) or real(data))
    collected = collect(known.loaded, known.results)
    pages = []
    for i in range(2):
        outputs = BuildOutputs(tmp_path / f"out{i}", known.loaded, known.results)
        assert set(outputs.attach(collected)) == {EVIDENCE_KIND} and outputs.error is None
        pages.append(outputs.html.read_bytes())
    assert len(drawn) <= 1 and pages[0] == pages[1]   # the second (and the first, if the fixture drew it) cached
    cache = Store(known.loaded.cache_root)   # the build's step cache (the one its downloads are in)
    pages_kept = sorted((cache.root / "report-pages").glob("*.html"))
    assert pages_kept and {path for what, path, _ in cache.prune(older_than_s=None, everything=True, dry_run=True)
                           if what == "report"} == set(pages_kept)   # `forge cache prune` takes them too
    before = len(drawn)
    fewer = {k: v for k, v in known.results.items() if k != "scan"}   # another build: no scan
    outputs = BuildOutputs(tmp_path / "out-other", known.loaded, fewer)
    outputs.attach(collect(known.loaded, fewer))
    assert len(drawn) == before + 1 and outputs.html.read_bytes() != pages[0]


def test_forge_report_errors(tmp_path, tiny_llama):
    env = {"FORGE_REGISTRY_DIR": str(tmp_path / "reg"), "PYTHONPATH": str(REPO)}
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_llama))
    proc = forge_cli("report", str(recipe), cache=tmp_path / "cache", env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "nothing of this recipe is in the step cache" in proc.stderr
    assert "forge build RECIPE" in proc.stderr and not (tmp_path / "report.html").exists()
    proc = forge_cli("report", "nope", env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "no artifact 'nope'" in proc.stderr


# ---------------------------------------------------------------------- in a real browser


def _chromium() -> str:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: `make setup-tools` installs it (Debian package chromium)"
    return exe


def test_the_report_in_a_browser(known, tmp_path):
    from playwright.sync_api import sync_playwright

    from forge.gpu import fit
    from forge.gpu.catalog import gpus
    from forge.model.shape import from_config_file
    from forge.steps.quantize import REPORT_JSON

    verdict = json.loads((known.results["gate"].entry.out / "verdict.json").read_text())
    layers = json.loads((known.results["quantize"].entry.out / REPORT_JSON).read_text())["layers"]
    l4 = fit.fit(from_config_file(Path(known.loaded.recipe.model.source) / "config.json"), gpus()["L4"],
                 fit.plan_from_recipe(known.loaded.recipe))
    url = known.html.as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            problems, requests = [], []
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nreport screenshot: {shot}\nreport page: {known.html} ({known.html.stat().st_size} bytes)")

            def cell(selector: str) -> str:
                return page.inner_text(selector).strip()

            def plot(div: str):
                return page.evaluate(f"() => document.getElementById('{div}').data.map(t => "
                                     "({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []), "
                                     "error_x: t.error_x || null}))")

            assert problems == [] and requests == [url]
            for section in ("gate", "quantize", "gpu", "image", "scan", "steps", "recipe"):
                assert page.is_visible(f"section#{section}"), section
            assert cell("#build-status") == "rejected" and "scan gate failed" in cell("#build-reason")

            # gate: the table and the forest plot carry the verdict's numbers
            assert cell("#gate-decision") == "passed"
            for rule in verdict["rules"]:
                row = f'#gate-table tr[data-metric="{rule["task"]}.{rule["metric"]}"]'
                assert cell(f"{row} td[data-field=baseline]") == format(rule["baseline"], ".4g")
                assert cell(f"{row} td[data-field=candidate]") == format(rule["candidate"], ".4g")
                assert cell(f"{row} td[data-field=limit]") == format(rule["limit"], "+.4g")
                assert cell(f"{row} td[data-field=mde]") == format(rule["mde"], ".3g")
                assert rule["decision"] in cell(f"{row} td[data-field=decision]")
            forest, limits = plot("fig-gate")
            assert forest["x"] == pytest.approx([r["degradation"] for r in verdict["rules"]])
            assert forest["error_x"]["array"] == pytest.approx([r["ci_high"] - r["degradation"] for r in verdict["rules"]])
            assert forest["error_x"]["arrayminus"] == pytest.approx([r["degradation"] - r["ci_low"] for r in verdict["rules"]])
            assert limits["name"] == "limit" and limits["x"] == pytest.approx([5.0, 0.5])

            # quantization: one bar per quantized layer with its measured error; lm_head kept in BF16, highlighted
            errors, kept = plot("fig-quantize")
            assert errors["x"] == [row["layer"] for row in layers]
            assert errors["y"] == pytest.approx([row["weight_rel_error"] for row in layers])
            assert kept["name"] == "kept in higher precision" and kept["x"] == ["lm_head"]
            assert cell("#quantize-summary td[data-field=layer-counts]") == f"{len(layers)} / 1"

            # target GPU: forge fit's numbers for L4, and the catalog GPUs that can run FP8 compared
            assert cell("#gpu-target td[data-field=tok_s]") == format(l4.decode_tok_s_aggregate, ".0f")
            assert cell("#gpu-target td[data-field=usd]") == format(l4.usd_per_million_tokens, ".4f")
            assert cell("#gpu-target td[data-field=max_seqs]") == str(l4.max_seqs_at_max_model_len)
            compared = page.eval_on_selector_all("#gpu-table tr[data-gpu]", "rows => rows.map(r => r.dataset.gpu)")
            assert "L4" in compared and "H100-SXM" in compared and "A100-80GB" in compared
            memory = plot("fig-memory")
            assert [t["name"] for t in memory] == ["weights", "KV cache", "runtime overhead", "budget (VRAM × utilization)"]
            assert len(memory[0]["y"]) == len(compared)

            # image: base, CUDA / driver from the image's labels, size per layer
            sizes = [layer["size"] for layer in known.data["image"]["layers"]]
            assert len(sizes) == 3 and plot("fig-image")[0]["x"] == pytest.approx([s / 1e6 for s in sizes])
            assert cell("#image-table td[data-field=cuda]") == "12.8 / 570.26"
            shown, unit, rest = cell("#image-table td[data-field=size]").split(" ", 2)
            assert unit == "kB" and rest == "in 3 layers" and float(shown) * 1000 == pytest.approx(sum(sizes), rel=0.005)
            assert "docker.io/vllm/vllm-openai:v0.11.0" in cell("#image-table td[data-field=base]")

            # scan: failed on the HIGH finding (the LOW one is below the policy), SBOM components counted
            assert cell("#scan-decision") == "failed"
            assert page.eval_on_selector_all("#scan-findings tr[data-finding]", "r => r.map(x => x.dataset.finding)") \
                == ["CVE-2026-1111"]
            assert cell("#scan-facts td[data-field=sbom]") == "3"
            assert "https://slsa.dev/provenance/v1" in cell("#provenance")

            # steps: every step with its key and status; the recipe as written
            for name, res in known.results.items():
                row = f'#steps-table tr[data-step="{name}"]'
                assert cell(f"{row} [data-field=key]") == res.key[:16]
                assert cell(f"{row} [data-field=status]") == res.status
            assert '"name": "tiny-report"' in cell("#recipe-text")
            assert shot.stat().st_size > 50_000
        finally:
            browser.close()


def test_a_report_that_cannot_be_drawn_does_not_lose_the_record(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.delenv("FORGE_DEBUG", raising=False)
    import numpy as np

    from forge.evaluation.gatestats import judge_rule

    loaded = resolved(write_recipe(tmp_path / "r.yaml", str(tiny_llama)))
    (tmp_path / "gate").mkdir()
    rule = judge_rule("heldout_ppl", "word_perplexity", "max_rel_increase", 0.1, np.ones((40, 2)), np.ones((40, 2)))
    (tmp_path / "gate" / "verdict.json").write_text(json.dumps({"passed": True, "rules": [rule.to_json()]}))
    (tmp_path / "quantize").mkdir()   # the quantize report cannot be read: the page cannot be drawn
    (tmp_path / "quantize" / "quantize-report.json").write_text("{not json")
    results = {"gate": _result("gate", tmp_path / "gate", {"passed": True}, "sha256:" + "c" * 64),
               "quantize": _result("quantize", tmp_path / "quantize", {}, "sha256:" + "d" * 64)}
    outputs = BuildOutputs(tmp_path / "out", loaded, results)
    rec = publish(loaded, results, registry=LocalRegistry(tmp_path / "reg"), attach=outputs.attach)
    assert rec.status == "gated" and EVIDENCE_KIND not in {e.kind for e in rec.evidence}
    assert outputs.error.startswith("JSONDecodeError") and not outputs.html.exists()
    monkeypatch.setenv("FORGE_DEBUG", "1")
    with pytest.raises(json.JSONDecodeError):
        BuildOutputs(tmp_path / "out", loaded, results).attach(None)


@pytest.mark.parametrize("drawn", [True, False], ids=["page-drawn", "page-failed"])
def test_a_build_never_leaves_an_earlier_builds_junit_and_summary(tmp_path, tiny_llama, monkeypatch, drawn):
    """Bug: when the page could not be drawn, finish returned before removing the last build's junit.xml and
    summary.md, so CI uploaded an earlier build's verdict as this one's. Whatever happens to the page, every
    file of the report directory is this build's or absent."""
    monkeypatch.delenv("FORGE_DEBUG", raising=False)
    loaded = resolved(write_recipe(tmp_path / "r.yaml", str(tiny_llama)))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("junit.xml", "summary.md", "report.html"):   # an earlier build's (passed) results
        (out / name).write_text(f"stale {name} of an earlier build")
    if not drawn:
        monkeypatch.setattr("forge.report.data_for", lambda *a, **k: (_ for _ in ()).throw(ValueError("no page")))
    outputs = BuildOutputs(out, loaded, {})   # no gate: this build has no JUnit verdict
    publish(loaded, {}, registry=LocalRegistry(tmp_path / "reg"), attach=outputs.attach)
    assert (outputs.error is None) is drawn
    outputs.finish()
    left = {p.name: p.read_text() for p in out.iterdir()}
    assert not any(text.startswith("stale") for text in left.values()), left
    assert "junit.xml" not in left
    assert ("report.html" in left) is drawn and ("summary.md" in left) is drawn
