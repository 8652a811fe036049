"""Calibration data: a local JSONL (field ``text``) or plain-text file, packed into token windows.

Texts are concatenated (separated by the tokenizer's EOS) and cut into windows of exactly
``max_seq_len`` tokens, the way GPTQ and AWQ calibrate best: every sample is full length. The windows
are shuffled with the recipe's seed and the first ``samples`` are used.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from forge.errors import RecipeError


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


def windows(path: Path, tokenizer, *, samples: int, max_seq_len: int, seed: int, where: str) -> list[list[int]]:
    """Token windows for calibration; a RecipeError (before any weight is loaded) when there are too few."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in read_texts(path):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    available = len(stream) // max_seq_len
    if available < samples:
        raise RecipeError([f"{where}: calibration data {path} tokenizes to {len(stream)} tokens: "
                           f"{available} window(s) of max_seq_len {max_seq_len}, but samples is {samples}"],
                          hint="Lower quantize.calibration.samples or max_seq_len, or add text to the file.")
    chunks = [stream[i * max_seq_len:(i + 1) * max_seq_len] for i in range(available)]
    random.Random(seed).shuffle(chunks)
    return chunks[:samples]
