"""Calibration data: a local JSONL (field ``text``) or plain-text file, packed into token windows.

Texts are concatenated (separated by the tokenizer's EOS) and cut into windows of exactly
``max_seq_len`` tokens, the way GPTQ and AWQ calibrate best: every sample is full length. The windows
are shuffled with the recipe's seed and the first ``samples`` are used.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from forge.core.errors import RecipeError, ToolError


def read_texts(path: Path) -> list[str]:
    """Texts of a calibration file; errors name the file and line."""
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError([f"{path}:{n}: not JSON ({e.msg})"], hint="Each line of a .jsonl file is one JSON object with a 'text' field.") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RecipeError([f"{path}:{n}: each line needs a string field 'text'"])
            texts.append(obj["text"])
        return texts
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def check_size(path: Path, *, samples: int, max_seq_len: int, where: str) -> None:
    """Validate-time check, without a tokenizer: a token is at least one byte of text on average in any
    tokenizer forge supports, so fewer bytes than samples × max_seq_len can never fill the windows."""
    texts = read_texts(path)
    if not texts:
        raise RecipeError([f"{where}: calibration file {path} holds no text"])
    size = sum(len(t.encode()) for t in texts)
    if size < samples * max_seq_len:
        raise RecipeError([f"{where}: calibration file {path} has {size} bytes of text: too short for "
                           f"{samples} samples × {max_seq_len} tokens"],
                          hint="Lower quantize.calibration.samples or max_seq_len, or add text to the file.")


_HF = re.compile(r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<rev>[\w./-]+)$")


def parse_hf_dataset(data: str) -> tuple[str, str, bool] | None:
    """(repo, revision, pinned) for hf://datasets/<org>/<name>@<revision>; None for a local file."""
    m = _HF.match(data)
    if m is None:
        return None
    return m["repo"], m["rev"], bool(re.fullmatch(r"[0-9a-f]{40}", m["rev"]))


def calibration_texts(loaded, cal) -> list[str]:
    hf = parse_hf_dataset(cal.data)
    if hf is None:
        return read_texts(loaded.resolve_path(cal.data))
    repo, rev, _ = hf
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, revision=rev, split=cal.split)
    except Exception as e:  # offline without a cached copy, no such split, auth
        raise ToolError(f"calibration dataset {repo}@{rev} (split {cal.split}) could not be loaded: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="It needs the Hugging Face Hub, or a copy in the local datasets cache when HF_HUB_OFFLINE=1; "
                             "or use a local .jsonl file.") from None
    if cal.text_field not in ds.column_names:
        raise RecipeError([f"{loaded.where('quantize', 'calibration', 'text_field')}: {repo} has no column "
                           f"{cal.text_field!r}; columns: {', '.join(ds.column_names)}"])
    return [t for t in ds[cal.text_field] if isinstance(t, str) and t.strip()]


def windows(texts: list[str], tokenizer, *, samples: int, max_seq_len: int, seed: int, where: str,
            source: str = "calibration") -> list[list[int]]:
    """Token windows for calibration; a RecipeError (before any weight is loaded) when there are too few."""
    path = source
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    available = len(stream) // max_seq_len
    if available < samples:
        raise RecipeError([f"{where}: calibration data {path} tokenizes to {len(stream)} tokens: "
                           f"{available} window(s) of max_seq_len {max_seq_len}, but samples is {samples}"],
                          hint="Lower quantize.calibration.samples or max_seq_len, or add text to the file.")
    chunks = [stream[i * max_seq_len:(i + 1) * max_seq_len] for i in range(available)]
    random.Random(seed).shuffle(chunks)
    return chunks[:samples]
