"""Variants you can select by GPU: GFD product labels in the catalog, variant tags and dev.forge.* annotations at
publish, the variant matrix (an OCI index with a forge artifactType), and `forge registry select` matching a node's
nvidia.com/gpu.product label (exact, -SHARED, MIG) in the embedded registry and on a real Distribution registry."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, forge_cli, gate_verdict, make_image, output_files

from forge.gpu.catalog import gpus, product_labels
from forge.core.errors import UsageError
from conftest import resolved
from forge.registry import LocalRegistry, publish
from forge.registry import annotate as ann
from forge.oci.layout import INDEX, REF_NAME
from forge.registry.matrix import MATRIX_TYPE, Matrix, publish_matrix
from forge.registry.select import LESS_MEMORY, INCOMPATIBLE, RUNNABLE, select

CONFIG = (REPO / "tests" / "data" / "configs" / "smollm2-135m.json").read_bytes()
VARIANTS = {  # name -> GPU: four GPUs, two of them Ampere (A10G 8.6 and A100 8.0 must never be confused)
    "vllm-fp8-a10g": "A10G", "vllm-fp8-a100-80gb": "A100-80GB", "vllm-fp8-h100-sxm-tp1": "H100-SXM",
    "vllm-fp8-l4": "L4", "vllm-fp8-l40s": "L40S"}
REJECTED = "vllm-fp8-l40s"   # its eval gate fails: left out of the matrix, never tagged


def write_recipe(path: Path, registry: str = "local") -> Path:
    variants = "".join(f"  - name: {v}\n    target: {{gpu: {g}}}\n" for v, g in VARIANTS.items())
    path.write_text(f"""apiVersion: forge/v1
name: tiny
model: {{source: "hf://org/tiny@{'c' * 40}"}}
target: {{gpu: L4, engine: vllm, max_model_len: 2048, max_num_seqs: 8}}
quantize: {{method: fp8}}
container: {{base: vllm-0.11-cu128}}
publish: {{registry: "{registry}"}}
variants:
{variants}""")
    return path


def _result(out: Path, facts: dict, digest: str):
    return SimpleNamespace(entry=SimpleNamespace(out=out, manifest={"facts": facts, "inputs": {"tools": {}},
                                                                    "output": {"files": output_files(out)}}),
                           output_digest=digest)


def publish_build(root: Path, reg: LocalRegistry, loaded, *, gate: bool = True):
    """Publish a build of ``loaded`` as the pipeline would: a small real image, gate and scan verdicts, and the
    quantized checkpoint's config.json (the fit model reads it) in the quantize output."""
    seed = (loaded.variant or "plain").encode()
    root.mkdir(parents=True)
    (root / "quantize").mkdir()
    (root / "quantize" / "config.json").write_bytes(CONFIG)
    (root / "package").mkdir()
    digest = make_image(root / "package" / "oci", "tiny", {"config.json": CONFIG, "model.safetensors": b"W" * 512 + seed})
    (root / "package" / "image.json").write_text(json.dumps({"manifest_digest": digest, "engine": "vllm"}))
    (root / "gate").mkdir()
    (root / "gate" / "verdict.json").write_text(gate_verdict(gate, on=("vllm", loaded.recipe.target.gpu)))
    (root / "scan").mkdir()
    facts = {"status": "scanned", "passed": True, "summary": "0 findings"}
    (root / "scan" / "verdict.json").write_text(json.dumps(facts))
    h = hashlib.sha256(seed).hexdigest()
    results = {"resolve": _result(root, {}, "sha256:" + "11" * 32),
               "quantize": _result(root / "quantize", {}, "sha256:" + h),
               "gate": _result(root / "gate", {"passed": gate, "failed": [] if gate else ["acc: -9%"]}, "sha256:" + h),
               "package": _result(root / "package", {}, "sha256:" + h),
               "scan": _result(root / "scan", facts, "sha256:" + h)}
    return publish(loaded, results, registry=reg)


def publish_all(tmp_path: Path, reg: LocalRegistry, registry: str = "local"):
    recipe = write_recipe(tmp_path / "tiny.yaml", registry)
    records = {v: publish_build(tmp_path / "builds" / v, reg, resolved(recipe, variant=v), gate=v != REJECTED)
               for v in VARIANTS}
    return recipe, records, publish_matrix(resolved(recipe), list(records.values()), reg, None)


@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


@pytest.fixture
def published(tmp_path, reg):
    return publish_all(tmp_path, reg)


# ---------------------------------------------------------------------- the catalog's GFD labels

def test_catalog_product_labels_are_nvidia_smi_names_with_dashes():
    for g in gpus().values():
        assert list(g.gfd_products) == ["-".join(name.split()) for name in g.smi], g.name
    labels = product_labels()
    for label, gpu in {"NVIDIA-H100-80GB-HBM3": "H100-SXM", "NVIDIA-L4": "L4", "NVIDIA-A10G": "A10G",
                       "NVIDIA-A100-SXM4-80GB": "A100-80GB", "NVIDIA-A100-SXM4-40GB": "A100-40GB",
                       "NVIDIA-A100-PCIE-40GB": "A100-40GB", "NVIDIA-H100-PCIe": "H100-PCIe", "NVIDIA-L40S": "L40S",
                       "NVIDIA-H200": "H200", "NVIDIA-B200": "B200"}.items():
        assert labels[label].name == gpu


# ---------------------------------------------------------------------- publishing variants

def test_a_variant_is_tagged_and_annotated_and_a_plain_recipe_is_not(tmp_path, reg, published):
    recipe, records, _ = published
    h100 = records["vllm-fp8-h100-sxm-tp1"]
    assert h100.variant == "vllm-fp8-h100-sxm-tp1" and h100.status == "validated"
    assert reg.resolve("tiny:vllm-fp8-h100-sxm-tp1").id == h100.id
    a = h100.annotations
    assert a[ann.GPU] == "H100-SXM" and a[ann.PRODUCTS] == "NVIDIA-H100-80GB-HBM3"
    assert a[ann.COMPUTE_CAPABILITY] == "9.0" and a[ann.MIN_DRIVER] == "570.26"   # vllm-0.11-cu128's floor
    assert a[ann.METHOD] == "fp8" and a[ann.ENGINE] == "vllm" and a[ann.KERNEL] == "CUTLASS FP8"
    assert a[ann.TAG] == "tiny:vllm-fp8-h100-sxm-tp1" and 1.5 < float(a[ann.NEED]) < 3   # 135M: mostly overhead
    assert records["vllm-fp8-a100-80gb"].annotations[ann.KERNEL] == "FP8 Marlin"   # Ampere runs FP8 weight-only
    # the embedded registry's index.json carries them on the descriptors naming the image
    named = {d["annotations"][REF_NAME]: d for d in reg.blobs.index()["manifests"] if REF_NAME in d.get("annotations", {})}
    assert named["tiny:vllm-fp8-h100-sxm-tp1"]["digest"] == h100.image_digest
    assert named["tiny:vllm-fp8-h100-sxm-tp1"]["annotations"][ann.PRODUCTS] == "NVIDIA-H100-80GB-HBM3"
    # a rejected variant gets no tag
    assert records[REJECTED].status == "rejected" and f"tiny:{REJECTED}" not in named
    with pytest.raises(UsageError):
        reg.resolve(f"tiny:{REJECTED}")

    plain = publish_build(tmp_path / "plain", reg, resolved(recipe))
    assert plain.variant is None and plain.annotations == {}
    d = next(d for d in reg.blobs.index()["manifests"] if d["digest"] == plain.image_digest)
    assert d["annotations"] == {REF_NAME: f"tiny:{plain.tag}", "dev.forge.record": plain.id}   # as before variants
    assert reg.resolve("tiny").id == plain.id   # NAME alone still means the newest image, never the matrix


def test_the_matrix_is_an_index_with_the_forge_artifact_type_listing_the_tags(tmp_path, reg, published):
    _, records, mx = published
    assert mx.kind == "matrix" and mx.tag == "matrix" and mx.status == "validated"
    assert reg.resolve("tiny:matrix").id == mx.id
    with sqlite3.connect(reg.root / "index.sqlite") as db:   # make the matrix the newest record of the name:
        db.execute("UPDATE artifacts SET created_at = '9999' WHERE id = ?", (mx.id,))
    assert reg.resolve("tiny").kind == "image"               # NAME alone still means the newest image
    shown = json.loads(forge_cli("registry", "show", "tiny:matrix", "--json", "--registry-dir", str(reg.root),
                                 check=0).stdout)
    assert shown["kind"] == "matrix" and shown["annotations"]["dev.forge.name"] == "tiny"
    index = json.loads(reg.blobs.read(mx.image_digest))
    assert index["mediaType"] == INDEX and index["artifactType"] == MATRIX_TYPE == \
        "application/vnd.forge.variant-matrix.v1+json"
    assert "NOT runnable" in index["annotations"]["org.opencontainers.image.description"]
    listed = {d["annotations"][ann.TAG]: d["digest"] for d in index["manifests"]}
    assert listed == {f"tiny:{v}": records[v].image_digest for v in VARIANTS if v != REJECTED}
    assert all("platform" not in d for d in index["manifests"])   # nothing a runtime could pick by
    assert "eval gate failed" in json.loads(index["annotations"]["dev.forge.matrix.left-out"])[REJECTED]
    # the same variants make the same matrix
    again = publish_matrix(resolved(tmp_path / "tiny.yaml"), list(records.values()), reg, None)
    assert again.id == mx.id and len(reg.ls(name="tiny")) == len(VARIANTS) + 1
    # the layout names it; verify re-hashes it and every image it lists; it cannot be pulled or promoted
    assert any(d.get("artifactType") == MATRIX_TYPE and d["annotations"][REF_NAME] == "tiny:matrix"
               for d in reg.blobs.index()["manifests"])
    forge_cli("registry", "verify", "tiny:matrix", "--registry-dir", str(reg.root), check=0)
    proc = forge_cli("registry", "pull", "tiny:matrix", "--to", str(tmp_path / "p"), "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and "variant matrix" in proc.stderr and "Traceback" not in proc.stderr
    proc = forge_cli("registry", "promote", "tiny:matrix", "--to", "prod", "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and "variant matrix" in proc.stderr
    proc = forge_cli("deploy", "tiny:matrix", "--out", str(tmp_path / "d"), "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and "variant matrix" in proc.stderr and "Traceback" not in proc.stderr
    # nothing publishable: no matrix
    assert publish_matrix(resolved(tmp_path / "tiny.yaml"), [records[REJECTED]], reg, None) is None


# ---------------------------------------------------------------------- forge registry select

@pytest.mark.parametrize("label,variant,verdict", [
    ("NVIDIA-A10G", "vllm-fp8-a10g", RUNNABLE),                       # Ampere 8.6: never the A100 (8.0) variant
    ("NVIDIA-A100-SXM4-80GB", "vllm-fp8-a100-80gb", RUNNABLE),
    ("NVIDIA-A100-SXM4-40GB", "vllm-fp8-a100-80gb", LESS_MEMORY),     # a smaller part of the same arch: fits
    ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "vllm-fp8-a100-80gb", LESS_MEMORY),   # one slice: 5 GB
    ("NVIDIA-L4-SHARED", "vllm-fp8-l4", RUNNABLE),                    # time-sliced L4
    ("NVIDIA-H100-80GB-HBM3", "vllm-fp8-h100-sxm-tp1", RUNNABLE),
])
def test_select_picks_the_variant_built_for_the_node(reg, published, label, variant, verdict):
    _, records, _ = published
    proc = forge_cli("registry", "select", "tiny", "--gpu-product", label, "--registry-dir", str(reg.root), check=0)
    assert proc.stdout.strip() == records[variant].image_digest
    data = json.loads(forge_cli("registry", "select", "tiny", "--gpu-product", label, "--json",
                                "--registry-dir", str(reg.root), check=0).stdout)
    assert data["selected"]["variant"] == variant and data["selected"]["verdict"] == verdict
    by = {c["variant"]: c for c in data["variants"]}
    assert by[REJECTED]["verdict"] == "not published" and "eval gate failed" in by[REJECTED]["why"]
    if label == "NVIDIA-A10G":
        assert by["vllm-fp8-a100-80gb"]["verdict"] == INCOMPATIBLE and "another architecture" in by["vllm-fp8-a100-80gb"]["why"]
    if "MIG" in label:
        assert data["node"]["mig_profile"] == "1g.5gb" and by[variant]["memory_gib"] == pytest.approx(4.66, abs=0.01)
        assert by["vllm-fp8-a10g"]["verdict"] == INCOMPATIBLE
    if label.endswith("-SHARED"):
        assert data["node"]["shared"] and "time-sliced" in by[variant]["why"]


def test_select_refuses_unknown_labels_and_nodes_no_variant_runs_on(reg, published):
    proc = forge_cli("registry", "select", "tiny", "--gpu-product", "NVIDIA-A10", "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and "did you mean NVIDIA-A10G" in proc.stderr and "Traceback" not in proc.stderr
    # an H100 PCIe is not the H100 SXM the variant was validated on (same memory, another product): no pick
    proc = forge_cli("registry", "select", "tiny", "--gpu-product", "NVIDIA-H100-PCIe", "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and proc.stdout == "" and "no variant of tiny runs on NVIDIA-H100-PCIe" in proc.stderr
    assert "vllm-fp8-h100-sxm-tp1" in proc.stderr and INCOMPATIBLE in proc.stderr
    proc = forge_cli("registry", "select", "nope", "--gpu-product", "NVIDIA-L4", "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and "no artifact 'nope:matrix'" in proc.stderr


def _entry(variant: str, gpu: str, **extra: str) -> dict:
    g = gpus()[gpu]
    a = {ann.VARIANT: variant, ann.TAG: f"big:{variant}", ann.GPU: gpu, ann.PRODUCTS: ",".join(g.gfd_products),
         ann.COMPUTE_CAPABILITY: "%d.%d" % g.compute_capability, ann.MEMORY: str(g.memory_gib), ann.ENGINE: "vllm",
         ann.TENSOR_PARALLEL: "1", ann.UTILIZATION: "0.9", ann.STATUS: "validated", **extra}
    return {"digest": "sha256:" + hashlib.sha256(variant.encode()).hexdigest(), "annotations": a}


def test_a_slice_or_smaller_part_is_refused_when_the_fit_model_says_it_does_not_fit():
    mx = Matrix("big", "sha256:" + "0" * 64, "test", (
        _entry("vllm-awq-a100", "A100-80GB", **{ann.NEED: "21.5"}),
        _entry("trtllm-a100", "A100-80GB", **{ann.NEED: "2", ann.ENGINE: "trtllm", ann.GPU_BOUND: "true"}),
        _entry("trtllm-pytorch-a100", "A100-80GB", **{ann.NEED: "2", ann.ENGINE: "trtllm"}),   # no engine built
        _entry("vllm-tp2-a100", "A100-80GB", **{ann.NEED: "2", ann.TENSOR_PARALLEL: "2"})), {})
    by = {c.variant: c for c in select(mx, "NVIDIA-A100-SXM4-80GB-MIG-3g.20gb").candidates}
    assert by["vllm-awq-a100"].verdict == INCOMPATIBLE and "needs 21.5 GiB" in by["vllm-awq-a100"].why
    assert by["trtllm-a100"].verdict == INCOMPATIBLE and "engine is bound to the GPU" in by["trtllm-a100"].why
    assert by["trtllm-pytorch-a100"].verdict != INCOMPATIBLE   # a HF checkpoint served by trtllm's pytorch backend
    assert by["vllm-tp2-a100"].verdict == INCOMPATIBLE and "tensor parallel 2" in by["vllm-tp2-a100"].why
    sel = select(mx, "NVIDIA-A100-SXM4-40GB")   # 36 GiB budget: the 21.5 GiB variant fits there
    assert sel.chosen.variant == "vllm-awq-a100" and sel.chosen.verdict == LESS_MEMORY
    assert select(mx, "NVIDIA-A100-SXM4-80GB").chosen.verdict == RUNNABLE


# ---------------------------------------------------------------------- a real Distribution registry

def _get(url: str, accept: str = INDEX) -> tuple[bytes, dict]:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=10) as r:
        return r.read(), dict(r.headers)


def test_variants_and_matrix_round_trip_through_a_remote_registry(tmp_path, reg, oci_registry):
    url = f"oci://{oci_registry}/forge/tiny"
    _, records, mx = publish_all(tmp_path, reg, url)
    assert mx.remote == f"{url}@{mx.image_digest}"
    base = f"http://{oci_registry}/v2/forge/tiny"
    tags = set(json.loads(_get(f"{base}/tags/list", "application/json")[0])["tags"])
    assert {"matrix", *(v for v in VARIANTS if v != REJECTED)} <= tags and REJECTED not in tags
    for v in VARIANTS.keys() - {REJECTED}:
        _, headers = _get(f"{base}/manifests/{v}", "application/vnd.oci.image.manifest.v1+json")
        assert headers["Docker-Content-Digest"] == records[v].image_digest
    body, headers = _get(f"{base}/manifests/matrix")
    assert headers["Docker-Content-Digest"] == mx.image_digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert json.loads(body)["artifactType"] == MATRIX_TYPE
    proc = forge_cli("registry", "verify", "tiny:matrix", "--remote", "--registry-dir", str(reg.root), check=0)
    assert "here and in oci://" in proc.stdout

    # another machine: nothing local, only the registry
    empty = str(tmp_path / "empty-registry")
    for label, variant in [("NVIDIA-A10G", "vllm-fp8-a10g"), ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "vllm-fp8-a100-80gb"),
                           ("NVIDIA-H100-80GB-HBM3", "vllm-fp8-h100-sxm-tp1")]:
        data = json.loads(forge_cli("registry", "select", "tiny", "--gpu-product", label, "--registry", url, "--json",
                                    "--registry-dir", empty, check=0).stdout)
        assert data["selected"]["digest"] == records[variant].image_digest
        assert data["selected"]["image"] == f"{oci_registry}/forge/tiny@{records[variant].image_digest}"
    proc = forge_cli("registry", "select", "other", "--gpu-product", "NVIDIA-L4", "--registry", url,
                     "--registry-dir", empty)
    assert proc.returncode == 2 and "is for 'tiny', not 'other'" in proc.stderr
    proc = forge_cli("registry", "pull", f"{url}:matrix", "--to", str(tmp_path / "p"), "--registry-dir", empty)
    assert proc.returncode == 2 and "variant matrix" in proc.stderr
