"""Safetensors files checked from their header and their size alone: the weights are never read.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes
of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the tensors' bytes back to back. Offsets count from the end of the header, and safetensors' own
loader refuses a file whose tensors leave a gap, overlap, or do not end exactly at the end of the file:
so a file's length must be 8 + N + the end of the last tensor. A truncated download or copy fails that
check in microseconds, where loading it would fail (or worse, mmap garbage) minutes into a build.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

# bits per element of every dtype safetensors 0.8 knows
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER = 100_000_000   # safetensors' own limit on the header length
_MAX_PER_FILE = 3          # problems reported per file (one is usually enough to know it is damaged)


def check_file(path: Path, shown: str | None = None) -> list[str]:
    """What is wrong with one safetensors file, as messages naming it (empty when it is sound)."""
    name = shown or str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                return [f"{name} is {size} bytes: too short to be safetensors (it starts with an 8-byte header length)"]
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                return [f"{name}: its first 8 bytes give a header of {n:,} bytes (safetensors allows at most "
                        f"{MAX_HEADER:,}): the file is corrupt or not safetensors"]
            if 8 + n > size:
                return [f"{name} is truncated: its header alone is {n:,} bytes but the file has only {size:,}"]
            raw = f.read(n)
    except OSError as e:
        return [f"{name} cannot be read: {e.strerror}"]
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return [f"{name}: the header is not UTF-8 (byte {e.start + 8}): the file is corrupt"]
    except json.JSONDecodeError as e:
        return [f"{name}: the header is not valid JSON ({e.msg} at byte {e.pos + 8}): the file is corrupt"]
    if not isinstance(header, dict):
        return [f"{name}: the header is JSON but not an object: the file is corrupt or not safetensors"]
    problems = _metadata_problems(name, header.pop("__metadata__", {}))
    spans = []
    for tensor, info in header.items():
        span, problem = _tensor_span(tensor, info)
        if problem:
            problems.append(f"{name}: tensor {tensor!r} {problem}")
        else:
            spans.append(span)
    if problems:
        return problems[:_MAX_PER_FILE]
    end = 0
    for begin, stop, tensor in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin < end:
            problems.append(f"{name}: tensor {tensor!r} (bytes {begin:,}-{stop:,}) overlaps the tensor before it "
                            f"(which ends at {end:,}): the header is corrupt")
        elif begin > end:
            problems.append(f"{name}: {begin - end:,} bytes before tensor {tensor!r} belong to no tensor "
                            "(safetensors' loader refuses gaps): the header is corrupt")
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        tensors = f"{len(spans)} tensor" + "s" * (len(spans) != 1)
        problems.append(f"{name} is truncated: its header describes {expected:,} bytes ({tensors}), "
                        f"the file has {size:,} ({expected - size:,} missing)")
    elif size > expected:
        problems.append(f"{name} has {size - expected:,} bytes after the end of its last tensor (its header "
                        f"describes {expected:,} bytes): the file is corrupt")
    return problems[:_MAX_PER_FILE]


def _metadata_problems(name: str, meta) -> list[str]:
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return [f"{name}: __metadata__ must map strings to strings: the header is corrupt"]
    return []


def _tensor_span(tensor: str, info) -> tuple[tuple[int, int, str] | None, str | None]:
    """(begin, end, name), or a message saying what is wrong with the tensor's entry."""
    if not isinstance(info, dict):
        return None, "is not described by an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        return None, f"has unknown dtype {dtype!r} (safetensors knows {', '.join(DTYPE_BITS)})"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None, f"has shape {shape!r}; a shape is a list of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        return None, f"has data_offsets {offsets!r}; they are [begin, end] with 0 <= begin <= end"
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        return None, (f"is {dtype} {shape}, which is {bits / 8:,g} bytes, but its data_offsets span {end - begin:,} "
                      "bytes: the header is corrupt")
    return (begin, end, tensor), None


def check_tree(root: Path, files: list[str]) -> list[str]:
    """Problems of every ``*.safetensors`` among ``files`` (paths relative to ``root``), each naming root/file."""
    problems: list[str] = []
    for rel in files:
        if rel.endswith(".safetensors"):
            problems.extend(check_file(root / rel, str(root / rel)))
    return problems
