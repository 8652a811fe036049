"""forge's SQLite files (the cache's digest memo, the registry's index) are opened by concurrent processes: two CI
jobs building on one cache, two publishes into one registry. Switching a new file to WAL takes a lock SQLite's busy
timeout does not wait for, so two first opens of a fresh file raced: the loser failed with "database is locked", an
internal error that failed a build (CI, test_concurrent_builds_share_one_result)."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

ATTEMPTS = 60   # two openers met on 18 of 100 fresh files before the fix: 60 miss it with odds of ~1 in 10^5


def _open_memo(target: str, go, old_file: str) -> None:
    from forge.core.digests import DigestMemo
    go.wait()
    memo = DigestMemo(Path(target))
    memo.file(Path(old_file))   # a lookup while the other opens
    memo.close()


def _open_registry(target: str, go, old_file: str) -> None:
    from forge.registry.local import LocalRegistry
    go.wait()
    LocalRegistry(Path(target))


@pytest.mark.parametrize("opener, name, db", [(_open_memo, "digests.sqlite", "."),
                                              (_open_registry, "registry", "index.sqlite")])
def test_two_processes_opening_a_fresh_database_at_once_both_succeed(tmp_path, opener, name, db):
    old_file = tmp_path / "weights.bin"
    old_file.write_bytes(b"x" * 4096)
    ctx = mp.get_context("fork")   # starts in milliseconds, so the two openers meet
    failed = []
    for attempt in range(ATTEMPTS):
        target = tmp_path / str(attempt) / name
        target.parent.mkdir()
        go = ctx.Event()
        procs = [ctx.Process(target=opener, args=(str(target), go, str(old_file))) for _ in range(2)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(120)
        failed += [attempt for p in procs if p.exitcode != 0]
        with sqlite3.connect(target / db if db != "." else target) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not failed, f"an opener failed on fresh file(s) {failed} (its traceback is in the captured stderr)"
