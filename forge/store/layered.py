"""The step stores a step runner talks to, as one: the local step cache first, then a remote one behind it.

Like Bazel's combined disk + remote cache: a lookup asks the local layer, then the remote (pulling what it has into
the local layer); what a step builds is committed locally and written through to the remote when it is writable
(``readwrite``; ``read`` only pulls, for untrusted builds). The runner never knows which layer answered beyond the
status it reports (HIT, REMOTE or BUILT). A remote that cannot be reached is a warning, once per process, and the
build goes on with the local layer alone: a cache that is down never fails a build. A remote that serves bytes
which do not match their digests is refused (``RemoteCacheCorrupt``, exit 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from forge.store.local import Entry, Store
from forge.store.remote import RemoteCache, RemoteUnavailable

__all__ = ["Stores", "Found"]

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Found:
    entry: Entry
    status: str        # HIT (local), REMOTE (pulled, or a remote build adopted) or BUILT


@dataclass(frozen=True)
class Stores:
    local: Store
    remote: RemoteCache | None = None

    @classmethod
    def of(cls, local: Store, url: str | None, mode: str = "readwrite") -> "Stores":
        """The stores a request names: the local cache and, with ``url``, the remote step cache behind it."""
        return cls(local, RemoteCache.parse(url, mode) if url else None)

    def find(self, key: str, step: str, report, warn: Warn, *, local: bool = True) -> Found | None:
        """The committed entry of ``key``: the local layer's (unless ``local`` is False: a forced rebuild), else
        the remote's, pulled and committed locally. None when no layer has it."""
        if local and (entry := self.local.get(key)) is not None:
            return Found(entry, "HIT")
        if self.remote is None or not local:
            return None
        entry = self._remotely(warn, lambda: self.remote.pull(self.local, key, report, step=step))
        return Found(entry, "REMOTE") if entry is not None else None

    def written(self, entry: Entry, report, warn: Warn) -> Found:
        """A step built here: written through to a writable remote. When another writer's different output holds
        the key there (a step that is not reproducible), that one is adopted locally and used from now on."""
        if self.remote is None or not self.remote.writable:
            return Found(entry, "BUILT")
        shared = self._remotely(warn, lambda: self.remote.share(self.local, entry, report))
        if shared is None:
            return Found(entry, "BUILT")
        if shared.warning:
            warn(shared.warning)
        return Found(shared.entry, "REMOTE" if shared.outcome == "non-reproducible" else "BUILT")

    def _remotely(self, warn: Warn, call):
        """Run a remote-cache call; a registry that is down is a warning (once per process), never a failed build."""
        if not self.remote.available:
            return None
        try:
            return call()
        except RemoteUnavailable as e:
            warn(f"{e.message}; building without the remote step cache")
            return None
