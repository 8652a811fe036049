"""The remote step cache: committed step outputs shared through an OCI registry (``--cache-remote oci://HOST/REPO``).

A step output is an OCI artifact in the repository, tagged ``step-<key>`` (the key is 64 hex digits, so the
tag is unique per key and a legal tag: ≤128 of ``[A-Za-z0-9_.-]``):

- ``artifactType`` ``application/vnd.forge.step.v1`` (not runnable, never an image);
- the config blob is the entry's ``manifest.json``, byte for byte (media type ``CONFIG_TYPE``): the key
  material, the output file digests and the step's facts;
- one layer per output file, uncompressed, titled (``org.opencontainers.image.title``) with its path
  relative to the step's ``out/``.

Push sends every blob first and the manifest PUT by tag last: Distribution refuses a manifest that names
a missing blob, so the PUT is the commit point and a half-pushed entry is never visible. Pull fetches the
config (checked against its digest), streams every layer to the store's staging directory while hashing it
(never whole in memory), checks each file against the layer digest *and* the step manifest, recomputes the
output digest from the pulled files as the runner does (every file but the step's volatile ones) and
checks it against the manifest's, and commits with the store's one rename; a blob whose bytes do not match,
or files that do not make the output digest the manifest claims, are refused (``RemoteCacheCorrupt``, exit 5)
and nothing is committed.

Two writers of one key: Distribution 2.8 ignores ``If-None-Match`` on manifest PUTs (last writer wins), so
``share`` checks the tag before pushing (the runner checked it before building, too) and again right
before the manifest PUT, and reads the tag back a second after it (a writer whose check came just before
our PUT has landed its own by then: the loser deletes its manifest, so one artifact is left). When another
writer's artifact is there first,
forge adopts it: same output digest → nothing is pushed (the local entry already holds the same files);
a different output digest → the step is not reproducible: a warning, and the remote output replaces the
local entry (so what this build uses and publishes is what others may already have used), recorded under
``remote.non_reproducible`` in the local manifest. The remote tag is never overwritten knowingly.

A registry that cannot be reached (or refuses us) raises ``RemoteUnavailable``: the runner warns once and
builds locally (a cache that is down never fails a build). Credentials, TLS and plain HTTP for loopback
hosts are those of publishing (``forge.oci.client``).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from forge.core.digests import FileEntry, tree_digest
from forge.core.errors import ToolError, UsageError
from forge.oci.layout import MANIFEST, manifest_bytes, sha256_bytes
from forge.oci.client import Client, Remote
from forge.store.local import MANIFEST as MANIFEST_FILE, MANIFEST_VERSION, Entry, Store
from forge.steps.graph import volatile

__all__ = ["RemoteCache", "RemoteUnavailable", "RemoteCacheCorrupt", "Shared", "MODES",
           "ARTIFACT_TYPE", "CONFIG_TYPE", "LAYER_TYPE"]

MODES = ("readwrite", "read")
ARTIFACT_TYPE = "application/vnd.forge.step.v1"
CONFIG_TYPE = "application/vnd.forge.step.manifest.v1+json"
LAYER_TYPE = "application/vnd.forge.step.file.v1"
TITLE = "org.opencontainers.image.title"
_CONFIG_MAX = 64 << 20          # a step manifest is JSON: refuse a config blob bigger than this
_STREAM = 4 << 20

Reporter = Callable[..., None]
_down: set[str] = set()          # remotes found unreachable in this process: not asked again
_up: set[str] = set()            # remotes that answered this process's probe
_PROBE_TIMEOUT = (5, 30)         # connect, read (s)
_SETTLE_S = 1.0                  # after our manifest PUT, wait this long before reading the tag back


def _quiet(*a, **k) -> None:
    return None


class RemoteUnavailable(ToolError):
    """The registry could not be reached or refused a request: the build goes on without the remote cache."""


class RemoteCacheCorrupt(ToolError):
    """What the registry served does not match its digest or the step manifest: refused, nothing committed."""


@dataclass(frozen=True)
class Shared:
    """What ``share`` did with a step built here: the entry to use from now on and how it relates to the remote."""
    entry: Entry
    outcome: str                 # "pushed" | "adopted" (same output was there) | "non-reproducible" (remote's adopted)
    manifest: str                # digest of the manifest the tag names
    warning: str | None = None


@dataclass(frozen=True)
class RemoteCache:
    remote: Remote
    mode: str = "readwrite"

    @classmethod
    def parse(cls, url: str, mode: str = "readwrite") -> "RemoteCache":
        """``oci://HOST[:PORT]/REPO`` and ``readwrite`` | ``read``; anything else is a usage error (exit 2)."""
        if mode not in MODES:
            raise UsageError(f"--cache-remote-mode {mode!r} is not one of {', '.join(MODES)}",
                             hint="read: pull only (untrusted builds); readwrite: pull, and push what this build makes.")
        try:
            remote = Remote.parse(url)
        except UsageError:
            raise UsageError(f"--cache-remote {url!r} is not oci://HOST[:PORT]/REPOSITORY",
                             hint="For example --cache-remote oci://registry.example.com/forge-cache "
                                  "(or FORGE_CACHE_REMOTE); the tags are chosen by forge.") from None
        return cls(remote, mode)

    @property
    def url(self) -> str:
        return self.remote.url()

    @property
    def writable(self) -> bool:
        return self.mode == "readwrite"

    @property
    def available(self) -> bool:
        """False once this process found the registry unreachable (it is not asked again)."""
        return self.url not in _down

    @staticmethod
    def tag(key: str) -> str:
        return f"step-{key[:64]}"

    # ------------------------------------------------------------------ reading
    def has(self, key: str) -> bool:
        return self._tagged(self._client(), key) is not None

    def pull(self, store: Store, key: str, report: Reporter = _quiet, *, step: str | None = None) -> Entry | None:
        """Fetch the key's output into ``store`` and commit it; None when the remote does not have it (or holds
        another step's output under it, when ``step`` names the step the key was computed for).
        The caller holds ``store.lock(key)`` when it may race another local builder (``run_step`` does)."""
        if (entry := store.get(key)) is not None:
            return entry
        return self._pull(self._client(), store, key, report, expect_step=step)

    def _pull(self, client: Client, store: Store, key: str, report: Reporter, *, replace: bool = False,
              note: dict | None = None, expect_step: str | None = None) -> Entry | None:
        tagged = self._tagged(client, key)
        if tagged is None:
            return None
        digest, manifest = tagged
        where = f"{self.url}:{self.tag(key)}"
        step = self._config(client, manifest, where)
        if step.get("manifest_version") != MANIFEST_VERSION or step.get("key") != key:
            return None    # another forge's format or a foreign artifact: not ours to trust, build instead
        if expect_step is not None and step.get("step") != expect_step:
            return None
        layers = self._layers(manifest, step, where)
        total, done = sum(layer["size"] for _, layer in layers), 0
        pulled: dict[str, FileEntry] = {}
        with store.staging(key) as staged:
            for rel, layer in layers:
                dest = staged / "out" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                pulled[rel], done = self._download(client, layer, dest, rel, where, report, done, total)
            report(f"pulled {where}", completed=total, total=total, unit="B")
            self._check_output_digest(step, pulled, where)
            kept = {k: v for k, v in step.items() if k not in ("manifest_version", "key", "remote")}
            kept["remote"] = {"from": where, "manifest": digest, **(note or {})}
            return store.commit(key, staged, kept, replace=replace)

    def _layers(self, manifest: dict, step: dict, where: str) -> list[tuple[str, dict]]:
        """(relative path, layer) for every output file; the layers must name exactly the manifest's files."""
        files = step.get("output", {}).get("files", {})
        out: dict[str, dict] = {}
        for layer in manifest.get("layers", []):
            rel = (layer.get("annotations") or {}).get(TITLE, "")
            norm = posixpath.normpath(rel) if rel else ""
            if not rel or rel != norm or norm.startswith(("/", "../")) or norm in (".", ".."):
                raise RemoteCacheCorrupt(f"remote step cache {where}: layer {layer.get('digest')} has title {rel!r}, "
                                         "not a relative path inside the step's output; refused, nothing committed",
                                         hint="Delete that tag from the registry: forge only pushes relative titles.")
            want = files.get(rel)
            if want is None or layer.get("digest") != f"sha256:{want['sha256']}" or layer.get("size") != want["size"]:
                raise RemoteCacheCorrupt(f"remote step cache {where}: layer {rel} ({layer.get('digest')}) does not match "
                                         "the step manifest's output files; refused, nothing committed",
                                         hint=f"Delete the tag {where} from the registry; the next build pushes it again.")
            out[rel] = layer
        if missing := sorted(set(files) - set(out)):
            raise RemoteCacheCorrupt(f"remote step cache {where}: no layer for {', '.join(missing[:5])}; "
                                     "refused, nothing committed",
                                     hint=f"Delete the tag {where} from the registry; the next build pushes it again.")
        return sorted(out.items())

    @staticmethod
    def _check_output_digest(step: dict, pulled: dict[str, FileEntry], where: str) -> None:
        """The output digest recomputed from the pulled files as the runner computes it (``tree_digest`` over
        every file but the step's volatile ones, ``forge.steps.graph.volatile``) must be the manifest's: the
        digest is what every downstream key and the registry record name, so a manifest whose files are not
        that output is refused (``RemoteCacheCorrupt``, nothing committed)."""
        skip = volatile(str(step.get("step")))
        actual = tree_digest({rel: e for rel, e in pulled.items() if rel not in skip})
        want = (step.get("output") or {}).get("digest")
        if actual != want:
            raise RemoteCacheCorrupt(
                f"remote step cache {where}: its files make output digest {actual}, but its step manifest says "
                f"{want}; refused, nothing committed",
                hint=f"Delete the tag {where} from the registry (it was not pushed by forge as it is); the next "
                     "build pushes it again.")

    def _download(self, client: Client, layer: dict, dest, rel: str, where: str, report: Reporter,
                  done: int, total: int) -> tuple[FileEntry, int]:
        """Stream one layer to dest, hashing as it goes; refuse it when its bytes are not its digest."""
        h, size, want = hashlib.sha256(), 0, layer["size"]
        with open(dest, "wb") as f, self._talking(f"pulling {rel}"):
            for chunk in client.stream_blob(layer["digest"], _STREAM):
                size += len(chunk)
                if size > want:
                    break
                h.update(chunk)
                f.write(chunk)
                report(f"pulling {rel}", completed=done + size, total=total, unit="B")
        actual = "sha256:" + h.hexdigest()
        if size != want or actual != layer["digest"]:
            got = f"{size} bytes" if size != want else f"content hashing to {actual}"
            raise RemoteCacheCorrupt(
                f"remote step cache {where}: file {rel} (blob {layer['digest']}) was served as {got}; "
                "refused, nothing committed",
                hint="The registry's copy is corrupt or was tampered with: delete that tag (or blob) from the registry, "
                     "then rebuild; the next push uploads it again.")
        return FileEntry(size, actual.removeprefix("sha256:")), done + size

    def _config(self, client: Client, manifest: dict, where: str) -> dict:
        desc = manifest.get("config") or {}
        if manifest.get("artifactType") != ARTIFACT_TYPE or desc.get("mediaType") != CONFIG_TYPE:
            raise RemoteCacheCorrupt(f"remote step cache {where} is not a forge step output "
                                     f"(artifactType {manifest.get('artifactType')!r})",
                                     hint="Point --cache-remote at a repository that only forge writes step outputs to.")
        if not 0 <= desc.get("size", -1) <= _CONFIG_MAX:
            raise RemoteCacheCorrupt(f"remote step cache {where}: config blob of {desc.get('size')} bytes refused")
        with self._talking("reading a step manifest"):
            data = client.get_blob(desc["digest"])
        if sha256_bytes(data) != desc["digest"]:
            raise RemoteCacheCorrupt(f"remote step cache {where}: step manifest (config blob {desc['digest']}) was served "
                                     f"as content hashing to {sha256_bytes(data)}; refused, nothing committed",
                                     hint="The registry's copy is corrupt or was tampered with: delete that tag.")
        return json.loads(data)

    def _tagged(self, client: Client, key: str) -> tuple[str, dict] | None:
        """(manifest digest, manifest) the key's tag names, or None."""
        with self._talking(f"looking up {self.tag(key)[:17]}…"):
            got = client.get_manifest(self.tag(key))
        if got is None:
            return None
        return sha256_bytes(got[0]), json.loads(got[0])

    # ------------------------------------------------------------------ writing
    def push(self, store: Store, entry: Entry, report: Reporter = _quiet) -> str:
        """Upload the entry (blobs first, the manifest PUT by tag last: the commit point) unless the tag
        appeared meanwhile. Returns the digest of the manifest the tag names afterwards (ours, or the
        first writer's)."""
        return self._push(self._client(), entry, report)[1]

    def _push(self, client: Client, entry: Entry, report: Reporter) -> tuple[str, str]:
        """(digest of our manifest, digest the tag names after the push)."""
        if not self.writable:
            raise UsageError(f"the remote step cache {self.url} is read-only here (--cache-remote-mode read)")
        config = entry.path / MANIFEST_FILE
        config_bytes = config.read_bytes()
        files = entry.manifest["output"]["files"]
        blobs = [(rel, entry.out / rel, f"sha256:{f['sha256']}", f["size"]) for rel, f in sorted(files.items())]
        blobs.append((MANIFEST_FILE, config, sha256_bytes(config_bytes), len(config_bytes)))
        manifest = manifest_bytes({
            "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": blobs[-1][2], "size": blobs[-1][3]},
            "layers": [{"mediaType": LAYER_TYPE, "digest": d, "size": n, "annotations": {TITLE: rel}}
                       for rel, _, d, n in blobs[:-1]],
            "annotations": {"dev.forge.step": entry.step, "dev.forge.step.key": entry.key,
                            "dev.forge.step.output": entry.output_digest}})
        ours = sha256_bytes(manifest)
        where = f"{self.url}:{self.tag(entry.key)}"
        total, done = sum(n for *_, n in blobs), 0
        with self._talking(f"pushing {entry.step}"):
            for rel, path, digest, size in blobs:
                report(f"pushing {rel}", completed=done, total=total, unit="B")
                client.put_blob(path, digest, size)
                done += size
            report(f"pushed blobs to {where}", completed=total, total=total, unit="B")
            if (there := self._tagged(client, entry.key)) is not None:   # a writer got there first: keep theirs
                return ours, there[0]
            client.put_manifest(manifest, MANIFEST, self.tag(entry.key))
            time.sleep(_SETTLE_S)   # a writer that checked the tag just before our PUT lands its own PUT in this time
            after = self._tagged(client, entry.key)
        if after is not None and after[0] != ours:    # another writer's PUT landed after ours: theirs stands
            self._forget(client, ours)
        return ours, after[0] if after else ours

    def _forget(self, client: Client, digest: str) -> None:
        """Best effort: delete our manifest that lost the race (a registry without deletes keeps it untagged)."""
        try:
            with self._talking("cleaning up"):
                client.delete_manifest(digest)
        except RemoteUnavailable:
            pass

    def share(self, store: Store, entry: Entry, report: Reporter = _quiet) -> Shared:
        """Publish a step built here, or adopt what another writer published under its key first (see the
        module doc). The caller holds ``store.lock(entry.key)``."""
        client = self._client()
        tagged = self._tagged(client, entry.key)
        if tagged is None:
            ours, named = self._push(client, entry, report)
            if named == ours:
                return Shared(entry, "pushed", ours)
            tagged = self._tagged(client, entry.key)
            if tagged is None:
                return Shared(entry, "pushed", ours)
        digest, manifest = tagged
        where = f"{self.url}:{self.tag(entry.key)}"
        theirs = self._config(client, manifest, where).get("output", {}).get("digest")
        if theirs == entry.output_digest:
            return Shared(entry, "adopted", digest)
        warning = (f"step {entry.step} is not reproducible: this build made output {entry.output_digest[:19]}…, "
                   f"but {where} already holds {str(theirs)[:19]}… for the same key; using the remote output "
                   "(what others may already use) and leaving the registry as it is")
        note = {"non_reproducible": {"local_output": entry.output_digest, "remote_output": theirs}}
        adopted = self._pull(client, store, entry.key, report, replace=True, note=note, expect_step=entry.step)
        if adopted is None:   # the tag vanished or changed format between two reads: keep ours, say so
            return Shared(entry, "pushed", digest, warning + " (the remote entry could not be read back)")
        return Shared(adopted, "non-reproducible", digest, warning)

    # ------------------------------------------------------------------ plumbing
    def _client(self) -> Client:
        with self._talking("connecting"):
            client = Client(self.remote)
            if self.url not in _up:
                _probe(client)
                _up.add(self.url)
            return client

    @contextmanager
    def _talking(self, doing: str) -> Iterator[None]:
        """Registry trouble (unreachable, HTTP errors, auth refused) → RemoteUnavailable; this remote is then
        not asked again by this process."""
        import requests

        try:
            yield
        except (RemoteUnavailable, RemoteCacheCorrupt):
            raise
        except (ToolError, ValueError, OSError, requests.RequestException) as e:
            if isinstance(e, OSError) and not isinstance(e, requests.RequestException) and e.filename:
                raise   # a local file problem is not the registry's
            _down.add(self.url)
            message = _reason(getattr(e, "message", None) or str(e))
            raise RemoteUnavailable(f"remote step cache {self.url}: {doing} failed: {message}",
                                    hint="Is the registry up and are the credentials right "
                                         "(FORGE_REGISTRY_USER/FORGE_REGISTRY_PASSWORD or auth.json)?") from None


def _probe(client: Client) -> None:
    """GET /v2/ once, with a timeout: an unreachable registry is found in seconds (the oras client retries
    a refused connection for minutes). Any HTTP answer, 401 included, means it is up."""
    import requests

    requests.get(f"{client.reg.prefix}://{client.remote.host}/v2/", timeout=_PROBE_TIMEOUT,
                 verify=not client.remote.insecure)


def _reason(message: str) -> str:
    """The gist of a requests/urllib3 error ("Connection refused"), not its three nested reprs."""
    import re

    if found := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", message):
        return found.group(1).strip()
    return message if len(message) <= 300 else message[:300] + "…"
