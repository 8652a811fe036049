"""Regenerate evals/data/calib-pydoc.jsonl: forge's default calibration set.

Source: the plain-text documentation that `pydoc` renders for a fixed list of Python standard
library modules (Python Software Foundation License; text shipped with every CPython). It is
technical English prose with code, offline by construction, and disjoint from forge's eval task
data (written separately for evals/, see evals/data/README.md).

    python scripts/make_calibration_set.py   # writes evals/data/calib-pydoc.jsonl
"""
from __future__ import annotations

import importlib
import json
import pydoc
import re
import sys
from pathlib import Path

MODULES = ["argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "contextlib",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob",
           "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "io", "ipaddress", "itertools", "json",
           "logging", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "queue", "random", "re",
           "sched", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct",
           "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "typing",
           "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib"]
CHUNK = 2400


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "evals" / "data" / "calib-pydoc.jsonl"
    rows = []
    for name in MODULES:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        text = re.sub(r"\n{3,}", "\n\n", text)
        text = re.sub(r"/\S*/lib/python3\.\d+/", "/usr/lib/python3/", text)  # no machine paths
        for i in range(0, min(len(text), 6 * CHUNK), CHUNK):
            piece = text[i:i + CHUNK].strip()
            if len(piece) > 400:
                rows.append({"text": piece, "source": f"pydoc:{name}", "python": sys.version.split()[0]})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} samples, {out.stat().st_size} bytes to {out}")


if __name__ == "__main__":
    main()
