"""forge deploy of a record whose weights are their own model image (issue 29): an image volume (goldens at 1.36),
the copy fallback (goldens at 1.33) whose init containers really copy the model out of a shell-less image, the
feature-gate rules by Kubernetes version, and --check catching an edited model reference."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import forge_cli
from test_deploy import CASES, DATA, VLLM, _edit, make_record, same_as_golden

from forge import deploy
from forge.core.errors import EvidenceError, UsageError
from forge.deploy.engines import serving
from forge.deploy.gather import gather
from forge.deploy.kustomize import read_dir
from forge.deploy.model_mount import COPY_TO, TOOLS
from forge.deploy.sizing import DEFAULT_PROGRESS_DEADLINE, size, with_model_pull
from forge.deploy.validate import schema_problems
from forge.image.containers import UID
from forge.image.model_image import write_model_image
from forge.registry import LocalRegistry

VLLM_MODELS = [("/models" if a == "/opt/forge/model" else a) for a in VLLM]   # the weights-free image serves /models
GOLDENS = {"model-image-volume-1.36": "1.36", "model-copy-1.33": "1.33"}   # case -> --kube-version (auto mount)


@pytest.fixture
def reg(tmp_path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def checkpoint(root: Path) -> Path:
    """A two-shard checkpoint with the 70B model's config.json (sizing reads it from the model image)."""
    root.mkdir(parents=True)
    (root / "config.json").write_bytes((DATA / CASES["vllm-h100-tp2"][1]).read_bytes())
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "model-00001-of-00002.safetensors").write_bytes(b"A" * 200_000)
    (root / "model-00002-of-00002.safetensors").write_bytes(b"B" * 100_000)
    return root


def model_record(tmp_path: Path, reg: LocalRegistry):
    """A validated vLLM H100 TP=2 record built with container.weights: image: a weights-free serving image and the
    model image (with its ModelPack manifest) in the registry's store."""
    recipe, config, _ = CASES["vllm-h100-tp2"]
    rec = make_record(tmp_path / "build", reg, DATA / recipe, (DATA / config).read_bytes(), VLLM_MODELS,
                      weights_free=True)
    mi = write_model_image(checkpoint(tmp_path / "ckpt"), reg.blobs, f"{rec.name}:{rec.tag}-model",
                           annotations={"org.opencontainers.image.title": rec.name, "dev.forge.method": rec.method})
    return reg.update(rec.model_copy(update={"weights": "image", "model_image_digest": mi.manifest_digest,
                                             "modelpack_digest": mi.modelpack_digest}), "model image")


def _pod(objects) -> dict:
    return next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]


# ---------------------------------------------------------------------- goldens

@pytest.mark.parametrize("case", sorted(GOLDENS))
def test_model_image_manifests_match_the_golden_files_and_validate_strictly(tmp_path, reg, case):
    kube = GOLDENS[case]
    rec = model_record(tmp_path, reg)
    out = tmp_path / "out"
    proc = forge_cli("deploy", rec.id[:12], "--out", str(out), "--namespace", "llm", "--kube-version", kube,
                     "--registry-dir", str(reg.root), check=0)
    same_as_golden(out, case)
    for obj in read_dir(out):   # each on its own, against the schema of that Kubernetes version, strictly
        assert schema_problems(obj, kube) == [], obj["kind"]
    assert forge_cli("deploy", "--check", str(out), "--kube-version", kube, "--registry-dir", str(reg.root),
                     check=0).returncode == 0
    pod = _pod(read_dir(out))
    server = pod["containers"][0]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    model = next(v for v in pod["volumes"] if v["name"] == "model")
    ref = f"forge.local/{rec.name}@{rec.model_image_digest}"   # the serving image's repository, by digest
    if kube == "1.36":
        assert model == {"name": "model", "image": {"reference": ref, "pullPolicy": "IfNotPresent"}}
        assert [c["name"] for c in pod["initContainers"]] == ["model-check"]
        assert "runtime must mount image volumes" in proc.stderr and "containerd >= 2.1" in proc.stderr
    else:
        assert "emptyDir" in model and [c["name"] for c in pod["initContainers"]] == ["forge-tools", "model-copy"]
        assert pod["initContainers"][1]["image"] == ref
        assert pod["initContainers"][0]["image"] == server["image"]   # the copy binary comes from the serving image
        assert server["resources"]["requests"]["ephemeral-storage"] == model["emptyDir"]["sizeLimit"]
        assert "not on by default before 1.35" in proc.stderr and "--model-mount image-volume" in proc.stderr


def test_versions_the_feature_gate_and_refusals(tmp_path, reg):
    rec = model_record(tmp_path, reg)

    def run(*args):
        return forge_cli("deploy", rec.id[:12], "--out", str(tmp_path / "o"), "--registry-dir", str(reg.root), *args)

    assert "image" in next(v for v in _pod(deploy.generate(reg, [rec], deploy.Options(kube_version="1.35")).objects)[
        "volumes"] if v["name"] == "model")   # on by default from 1.35
    # 1.33-1.34: only when asked, and then saying the gate must be on
    gated = run("--kube-version", "1.34", "--model-mount", "image-volume")
    assert gated.returncode == 0, gated.stderr
    assert "--feature-gates=ImageVolume=true" in gated.stderr and "OFF by default" in gated.stderr
    assert "image:" in next((tmp_path / "o").glob("*-deployment.yaml")).read_text()
    # older: refused, with what to do instead; nothing written
    for args, message in [(("--kube-version", "1.32", "--model-mount", "image-volume"), "beta from 1.33"),
                          (("--model-mount", "volume"), "not a way to mount the model")]:
        shutil.rmtree(tmp_path / "o", ignore_errors=True)
        proc = run(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()
    # a copy on any version, by choice
    assert [c["name"] for c in _pod(deploy.generate(reg, [rec], deploy.Options(
        kube_version="1.36", model_mount="copy")).objects)["initContainers"]] == ["forge-tools", "model-copy"]
    # a record with baked weights has no model image to mount
    baked = make_record(tmp_path / "baked", reg, DATA / "demo-cpu.yaml", (DATA / CASES["demo-cpu"][1]).read_bytes(),
                        CASES["demo-cpu"][2])
    with pytest.raises(UsageError, match="no model image to mount"):
        deploy.generate(reg, [baked], deploy.Options(model_mount="copy"))
    # a record whose model image is not in the registry: says how to get it
    gone = rec.model_copy(update={"model_image_digest": "sha256:" + "9" * 64})
    with pytest.raises(EvidenceError, match="is not in the registry"):
        deploy.generate(reg, [gone])


def test_startup_is_budgeted_on_the_mount_and_the_rollout_on_pull_and_copy(tmp_path, reg):
    rec = model_record(tmp_path, reg)
    by = {how: next(o for o in deploy.generate(reg, [rec], deploy.Options(kube_version="1.36", model_mount=how)).objects
                    if o["kind"] == "Deployment") for how in ("image-volume", "copy")}
    probes = {how: d["spec"]["template"]["spec"]["containers"][0]["startupProbe"] for how, d in by.items()}
    assert probes["image-volume"] == probes["copy"]   # the copy is done before the server starts: not in its probe
    assert by["copy"]["metadata"]["annotations"]["dev.forge/model-mount"] == "copy"
    # the rule, at 70 GB: a pull at 125 MB/s (560 s) and, for the copy, 280 s more, x1.5, plus the startup budget
    sz = size(gather(reg, rec), serving(rec.engine, rec.engine_version))
    volume, copy = with_model_pull(sz, 70_000_000_000, 0), with_model_pull(sz, 70_000_000_000, 70_000_000_000)
    assert volume.progress_deadline_s == 840 + sz.startup_budget_s
    assert copy.progress_deadline_s == 1260 + sz.startup_budget_s
    assert with_model_pull(sz, 1_000, 1_000).progress_deadline_s == max(DEFAULT_PROGRESS_DEADLINE,
                                                                         1 + sz.startup_budget_s)   # whole seconds
    assert "GB copy / 250 MB/s" in dict(copy.why)["progress-deadline"]


# ---------------------------------------------------------------------- --check

def _volume(o, name="model"):
    return next(v for v in o["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def _init(o, name):
    return next(c for c in o["spec"]["template"]["spec"]["initContainers"] if c["name"] == name)


OTHER = "sha256:" + "5" * 64
EDITS = {   # (model mount, kube version, edit, message)
    "volume-reference": ("image-volume", "1.36", lambda o: _volume(o)["image"].update(
        reference=_volume(o)["image"]["reference"].split("@")[0] + "@" + OTHER), "is not the record's model image"),
    "volume-tag": ("image-volume", "1.36", lambda o: _volume(o)["image"].update(reference="forge.local/x:latest"),
                   "not pinned by digest"),
    "copy-image": ("copy", "1.33", lambda o: _init(o, "model-copy").update(
        image=_init(o, "model-copy")["image"].split("@")[0] + "@" + OTHER), "is not the record's model image"),
    "tools-image": ("copy", "1.33", lambda o: _init(o, "forge-tools").update(image="busybox@" + OTHER),
                    "is not the record's serving image"),
    "no-mount": ("image-volume", "1.36", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(
        volumeMounts=[m for m in o["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                      if m["name"] != "model"]), "mounts nothing at /models"),
    "writable": ("image-volume", "1.36", lambda o: o["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][-1]
                 .update(readOnly=False), "/models is not mounted readOnly"),
    "dangling-mount": ("copy", "1.33", lambda o: _init(o, "model-copy")["volumeMounts"][0].update(name="tools"),
                       "volumeMount 'tools' at /forge-tools names no volume"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_check_catches_an_edited_model_reference(tmp_path, reg, edit):
    how, kube, change, message = EDITS[edit]
    rec = model_record(tmp_path, reg)
    out = tmp_path / "out"
    deploy.write(deploy.generate(reg, [rec], deploy.Options(kube_version=kube, model_mount=how)), out)
    assert deploy.check(out, reg, kube)[1] == []
    _edit(out, "Deployment", change)
    proc = forge_cli("deploy", "--check", str(out), "--kube-version", kube, "--registry-dir", str(reg.root))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_check_refuses_an_image_volume_below_1_33(tmp_path, reg):
    rec = model_record(tmp_path, reg)
    out = tmp_path / "out"
    deploy.write(deploy.generate(reg, [rec], deploy.Options(kube_version="1.36")), out)
    _, found = deploy.check(out, reg, "1.32")
    assert any("image volumes need Kubernetes 1.33 or later" in p for p in found), found


# ---------------------------------------------------------------------- the copy fallback, run for real

def _rootfs_with_host_usr(root: Path) -> list[str]:
    """Shell commands (for a private mount namespace) that make ``root`` a Debian-like rootfs: the host's /usr
    read-only, the merged-/usr links, /dev/null. What a Debian-based serving image has, and no more."""
    for d in ("usr", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if Path("/" + link).is_symlink():
            (root / link).symlink_to("usr/" + link)
    (root / "dev" / "null").touch()
    return [f"mount --bind -o ro /usr {root}/usr", f"mount --bind /dev/null {root}/dev/null"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not Path("/bin").is_symlink(),
                    reason="needs root (a mount namespace and chroot) on a merged-/usr host")
def test_the_copy_fallback_copies_the_model_out_of_a_shell_less_image(tmp_path, reg):
    """The two init containers' commands, exactly as emitted, each in a root filesystem like its image's: forge-tools
    in one with a shell (the host's /usr), model-copy in the model image's own files and nothing else (no shell,
    no libc), as uid 10001. The copy is the checkpoint, byte for byte."""
    rec = model_record(tmp_path, reg)
    pod = _pod(deploy.generate(reg, [rec], deploy.Options(kube_version="1.33")).objects)
    tools_c, copy_c = pod["initContainers"]
    assert tools_c["command"][:2] == ["/bin/sh", "-c"]

    serving = tmp_path / "serving-root"
    setup = _rootfs_with_host_usr(serving)
    (serving / TOOLS.strip("/")).mkdir()
    os.chown(serving / TOOLS.strip("/"), UID, UID)
    script = "; ".join(setup + [f"exec chroot --userspec={UID}:{UID} {serving} /bin/sh -c \"$0\""])
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           tools_c["command"][2]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tools = serving / TOOLS.strip("/")
    assert {"cp", "ld.so"} <= {p.name for p in tools.iterdir()} and any(p.name.startswith("libc.so") for p in tools.iterdir())

    # the model image's root filesystem: its layers unpacked, nothing else; the two emptyDirs mounted in it
    model_root = tmp_path / "model-root"
    manifest = json.loads(reg.blobs.read(rec.model_image_digest))
    for layer in manifest["layers"]:
        with tarfile.open(reg.blobs.blob_path(layer["digest"])) as tf:
            tf.extractall(model_root, filter="data")
    assert sorted(p.name for p in model_root.iterdir()) == ["models"]   # no shell, no libc, no /bin
    shutil.copytree(tools, model_root / TOOLS.strip("/"))
    (model_root / COPY_TO.strip("/")).mkdir()
    os.chown(model_root / COPY_TO.strip("/"), UID, UID)
    proc = subprocess.run(["chroot", f"--userspec={UID}:{UID}", str(model_root), *copy_c["command"]],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ckpt = tmp_path / "ckpt"
    copied = model_root / COPY_TO.strip("/")
    assert {p.name: p.read_bytes() for p in copied.iterdir()} == {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert all(p.stat().st_uid == UID for p in copied.iterdir())
