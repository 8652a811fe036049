"""The resolve step's checks of what it is given: safetensors headers against the file (never the weights),
symlink loops and broken links in a model directory, and damaged HF cache snapshots, each a located exit 2.
(One bad local directory per scenario with its exact message lives in tests/bad_recipes/.)"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from conftest import REPO, forge_cli, write_recipe

from forge.core.digests import list_files
from forge.core.errors import UsageError
from forge.model.safetensors_check import check_file


def _write(path: Path, header: dict | bytes, data: bytes = b"", *, pad: bytes = b"") -> Path:
    raw = (header if isinstance(header, bytes) else json.dumps(header).encode()) + pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# (header, data, what check_file must say or None when the file is sound)
CASES = {
    "sound": ({"a": _t("BF16", [2, 3], 0, 12), "b": _t("F32", [2], 12, 20)}, 20, None),
    "metadata-scalar-and-empty-tensors": ({"__metadata__": {"format": "pt"}, "s": _t("F32", [], 0, 4),
                                           "e": _t("I64", [0, 5], 4, 4), "f4": _t("F4", [4], 4, 6)}, 6, None),
    "no-tensors": ({}, 0, None),
    "truncated": ({"a": _t("F32", [4, 4], 0, 64)}, 40, "is truncated: its header describes 137 bytes (1 tensor), the file has 113 (24 missing)"),
    "trailing-bytes": ({"a": _t("F32", [2], 0, 8)}, 12, "has 4 bytes after the end of its last tensor"),
    "gap": ({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, 12, "4 bytes before tensor 'b' belong to no tensor"),
    "overlap": ({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, 12, "tensor 'b' (bytes 4-12) overlaps the tensor before it"),
    "shape-and-size-disagree": ({"a": _t("F32", [5], 0, 16)}, 16, "tensor 'a' is F32 [5], which is 20 bytes, but its data_offsets span 16 bytes"),
    "half-a-byte": ({"a": _t("F4", [3], 0, 2)}, 2, "tensor 'a' is F4 [3], which is 1.5 bytes"),
    "unknown-dtype": ({"a": _t("F12", [1], 0, 2)}, 2, "tensor 'a' has unknown dtype 'F12'"),
    "negative-dim": ({"a": _t("F32", [-1], 0, 4)}, 4, "tensor 'a' has shape [-1]; a shape is a list of non-negative integers"),
    "offsets-backwards": ({"a": _t("F32", [1], 4, 0)}, 4, "tensor 'a' has data_offsets [4, 0]"),
    "metadata-not-strings": ({"__metadata__": {"step": 3}, "a": _t("F32", [1], 0, 4)}, 4, "__metadata__ must map strings to strings"),
    "header-not-json": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', 4, "the header is not valid JSON"),
    "header-not-an-object": (b'[1, 2]', 0, "the header is JSON but not an object"),
    "header-not-utf8": (b'{"\xff": 1}', 0, "the header is not UTF-8 (byte 10)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_header_check_agrees_with_the_safetensors_loader(case, tmp_path):
    """Every file forge refuses, safetensors' own loader refuses too (and forge says why); every sound one loads."""
    from safetensors import safe_open

    header, n_data, expected = CASES[case]
    path = _write(tmp_path / "m.safetensors", header, bytes(n_data))
    problems = check_file(path, "m.safetensors")
    try:
        with safe_open(path, "np") as f:
            list(f.keys())
        loads = True
    except Exception:   # safetensors raises SafetensorError, or a JSON error from its own parser
        loads = False
    if expected is None:
        assert problems == [] and loads
    else:
        assert len(problems) == 1 and expected in problems[0] and problems[0].startswith("m.safetensors")
        assert not loads


def test_header_padding_and_framing(tmp_path):
    sound = {"a": _t("U8", [3], 0, 3)}
    assert check_file(_write(tmp_path / "pad.safetensors", sound, b"xyz", pad=b"    ")) == []   # writers pad with spaces
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x05\x00")
    assert check_file(short, "short") == ["short is 2 bytes: too short to be safetensors (it starts with an 8-byte header length)"]
    cut = _write(tmp_path / "cut.safetensors", sound, b"xyz")
    cut.write_bytes(cut.read_bytes()[:20])
    assert "is truncated: its header alone is" in check_file(cut)[0]
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert "first 8 bytes give a header of 1,099,511,627,776 bytes" in check_file(huge)[0]


def test_only_the_header_is_read(tmp_path):
    """A 64 GiB shard (sparse: no disk used) is checked in milliseconds: its size and header are enough."""
    big = 64 << 30
    path = _write(tmp_path / "big.safetensors", {"w": _t("U8", [big], 0, big)})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + big)
    t0 = time.perf_counter()
    assert check_file(path) == []
    assert time.perf_counter() - t0 < 0.5
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    assert "(1 missing)" in check_file(path)[0]


# ------------------------------------------------------------------ links in a model directory


def test_symlink_loops_and_broken_links_are_named(tmp_path):
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    outside = tmp_path / "weights.safetensors"
    outside.write_bytes(b"w")
    (root / "linked.safetensors").symlink_to(outside)        # a link to a file is followed (HF snapshots are made of them)
    assert list_files(root) == ["config.json", "linked.safetensors"]
    cases = [("self.safetensors", "self.safetensors", "is a symlink loop (-> self.safetensors)"),
             ("sub/up", "..", "is a symlink loop (-> ..): it points to a directory that contains it"),
             ("here", ".", "is a symlink loop (-> .)"),
             ("gone.safetensors", "nowhere.safetensors", "is a broken symlink (-> nowhere.safetensors)")]
    for rel, target, message in cases:
        (root / rel).symlink_to(target)
        with pytest.raises(UsageError, match=rf"^{root / rel} {message.replace('(', '[(]').replace(')', '[)]')}"):
            list_files(root)
        (root / rel).unlink()
    (root / ".cache").mkdir()
    (root / ".cache" / "loop").symlink_to("loop")
    assert list_files(root, skip_hidden=True) == ["config.json", "linked.safetensors"]   # not walked (nor copied)
    with pytest.raises(UsageError, match="loop is a symlink loop"):
        list_files(root)                                                                  # but digested


def test_two_link_cycle_in_a_model_dir_exits_2_at_validate_and_build(tmp_path, tiny_llama):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    os.symlink("b.safetensors", model / "a.safetensors")
    os.symlink("a.safetensors", model / "b.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", "./model")
    for command in ("validate", "build"):
        proc = forge_cli(command, str(recipe), cache=tmp_path / "cache")
        assert proc.returncode == 2, proc.stderr
        assert f"{recipe}:5:5: model.source: {model}/a.safetensors is a symlink loop (-> b.safetensors)" in proc.stderr
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the resolve step: sources validate cannot see


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_snapshot(hf_home: Path, model: Path) -> Path:
    """model as huggingface_hub caches it: blobs, a snapshot of symlinks to them, refs/main."""
    repo = hf_home / "hub" / "models--forge-test--tiny"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in model.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def test_truncated_shard_in_the_hf_cache_fails_the_resolve_step(tmp_path, tiny_llama):
    hf_home = tmp_path / "hf"
    snap = _hf_snapshot(hf_home, tiny_llama)
    shard = (snap / "model.safetensors").resolve()
    size = shard.stat().st_size
    os.truncate(shard, size - 1000)                          # an interrupted copy of the cache
    recipe = write_recipe(tmp_path / "r.yaml", f"hf://forge-test/tiny@{COMMIT}")
    env = {"HF_HOME": str(hf_home)}
    assert forge_cli("validate", str(recipe), env=env).returncode == 0   # validate reads no HF cache
    proc = forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"{recipe}:5:5: model.source: {snap}/model.safetensors is truncated: its header describes {size:,} bytes"
            in proc.stderr), proc.stderr
    assert f"(1,000 missing); remove {snap} from the HF cache" in proc.stderr
    assert not any((tmp_path / "cache" / "steps").glob("*/out"))   # nothing committed
    os.truncate(shard, size)                                   # the same bytes length again (zeros): sound framing
    assert forge_cli("build", str(recipe), cache=tmp_path / "cache", env=env).returncode == 0


# ------------------------------------------------------------------ hints give paths as the recipe must write them


def test_calibration_hint_is_a_path_relative_to_a_nested_recipe(tmp_path, tiny_llama):
    nested = tmp_path / "team" / "recipes" / "llama"
    nested.mkdir(parents=True)
    recipe = write_recipe(nested / "r.yaml", str(tiny_llama), quantize={"method": "gptq", "group_size": 64})
    proc = forge_cli("validate", str(recipe))
    assert proc.returncode == 2
    expected = os.path.relpath(REPO / "evals" / "data" / "calib-pydoc.jsonl", nested)
    assert expected.startswith("../../../") and (nested / expected).is_file()
    hint = f"`calibration: {{data: {expected}, samples: 128, max_seq_len: 512}}` (path relative to the recipe)"
    assert hint in proc.stderr, proc.stderr
    # written as the hint says, the recipe is valid
    write_recipe(recipe, str(tiny_llama), quantize={"method": "gptq", "group_size": 64, "calibration": {
        "data": expected, "samples": 8, "max_seq_len": 64}})
    assert forge_cli("validate", str(recipe)).returncode == 0

