"""The OCI Distribution registry client forge uses to publish, pull and share step outputs (``oci://host[:port]/repo``).

- The image goes blob by blob, each as it is (large ones as one streamed PUT whose body the kernel sends from
  the page cache, ``sendfile``; the oras client's chunked upload where that is refused), and its manifest as the
  exact bytes recorded, so the remote digest is the one recorded and the uncompressed weights layer stays
  uncompressed (a skopeo copy to a registry gzips it). Pulls use ``skopeo copy --preserve-digests``, or
  ``Client.pull_image``: the manifest, then its blobs a few at a time, each streamed to disk while hashed, resumed
  where a broken transfer stopped (HTTP Range), and taken in only under the digest it hashes to.
- Each piece of evidence is an OCI image manifest with ``artifactType`` and ``subject`` → the image,
  uploaded with the oras client (blobs) and PUT as the exact bytes forge hashed; the digest the registry
  answers (Docker-Content-Digest) must equal it.
- Referrers: a registry with the referrers API indexes them itself. One without it (Distribution 2.8
  answers 404) gets the referrers tag schema the distribution spec asks of clients: an image index
  tagged ``sha256-<hex of the subject>`` listing every referrer, which forge reads, extends and rewrites.
- Credentials: ``FORGE_REGISTRY_USER``/``FORGE_REGISTRY_PASSWORD`` if set (handed to skopeo through
  a private temporary auth file, never on a command line), otherwise the standard auth files
  (containers auth.json, ~/.docker/config.json) that skopeo and oras read themselves. Nothing
  forge prints or records contains them.
- Plain HTTP only for loopback hosts, or hosts listed in ``FORGE_INSECURE_REGISTRIES``.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from forge.core import options
from forge.core.errors import ToolError, UsageError
from forge.oci.layout import INDEX, MANIFEST, Layout, manifest_bytes, sha256_bytes

ACCEPT = ", ".join([MANIFEST, INDEX, "application/vnd.docker.distribution.manifest.v2+json"])
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class Remote:
    host: str          # host[:port]
    repo: str

    @classmethod
    def parse(cls, url: str) -> "Remote":
        rest = url.removeprefix("oci://")
        host, _, repo = rest.partition("/")
        if not url.startswith("oci://") or not host or not repo or "@" in repo or ":" in repo:
            raise UsageError(f"registry {url!r} is not oci://HOST[:PORT]/REPOSITORY",
                             hint="For example publish: {registry: oci://127.0.0.1:5000/forge}; tags are chosen by forge.")
        return cls(host, repo.rstrip("/"))

    @property
    def insecure(self) -> bool:
        return insecure_host(self.host)

    def ref(self, tag_or_digest: str) -> str:
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.host}/{self.repo}{sep}{tag_or_digest}"

    def url(self) -> str:
        return f"oci://{self.host}/{self.repo}"


def insecure_host(host: str) -> bool:
    """Plain HTTP (no TLS verification) only for loopback hosts and those listed in FORGE_INSECURE_REGISTRIES."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    extra = options.current().insecure_registries
    return name in _LOOPBACK or host in extra or name in extra


# ---------------------------------------------------------------------- credentials

def _env_creds() -> tuple[str, str] | None:
    opts = options.current()
    user, password = opts.registry_user, opts.registry_password
    return (user, password) if user and password else None


@contextmanager
def _skopeo_auth(remote: Remote) -> Iterator[list[str]]:
    creds = _env_creds()
    if creds is None:
        yield []  # skopeo reads the standard auth files itself
        return
    with tempfile.TemporaryDirectory(prefix="forge-auth-") as d:
        path = Path(d) / "auth.json"
        token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {remote.host: {"auth": token}}}, f)
        yield ["--authfile", str(path)]


def _scrub(text: str) -> str:
    if (creds := _env_creds()) is not None:
        text = text.replace(creds[1], "***")
    return text


# ---------------------------------------------------------------------- skopeo

def skopeo(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("skopeo")
    if exe is None:
        raise ToolError("skopeo is not on PATH; publishing to an OCI registry needs it",
                        hint="`make setup-tools` (or apt-get install skopeo) installs it.")
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError(f"skopeo {args[0]} failed (exit {proc.returncode}): {_scrub(proc.stderr.strip())[-1500:]}",
                        hint="Is the registry up and reachable, and are the credentials right?")
    return proc


def _tls(remote: Remote, flag: str) -> list[str]:
    return [f"--{flag}-tls-verify=false"] if remote.insecure else []


def fetch_image(remote: Remote, digest: str, layout: Path, ref: str) -> None:
    with _skopeo_auth(remote) as auth:
        skopeo("copy", "--quiet", "--preserve-digests", "--dest-oci-accept-uncompressed-layers", *auth,
               *_tls(remote, "src"), f"docker://{remote.ref(digest)}", f"oci:{layout}:{ref}")


# ---------------------------------------------------------------------- oras

_CHUNK = 64 << 20   # blobs above this are uploaded in chunks of this size (PATCH), never read whole
_PULL_CHUNK = 8 << 20   # bytes read, hashed and written at a time while pulling
_STREAM_FROM = 16 << 20   # blobs above this go up as one PUT with sendfile (no copy through Python)

class Client:
    """The oras registry client for one remote, plus the few calls oras-py lacks (exact-bytes manifest
    PUT with any media type, the referrers API)."""

    def __init__(self, remote: Remote):
        import oras.container
        import oras.provider

        self.remote = remote
        self.reg = oras.provider.Registry(hostname=remote.host, insecure=remote.insecure)
        self.container = oras.container.Container(remote.ref("latest"))
        if (creds := _env_creds()) is not None:
            self.reg.auth.set_basic_auth(*creds)
        else:
            configs = [p for p in _auth_files() if p.exists()]
            self.reg.auth.load_configs(self.container, configs=[str(p) for p in configs])
        self.base = f"{self.reg.prefix}://{remote.host}/v2/{remote.repo}"

    def _request(self, method: str, path: str, **kw):
        import requests

        self._reachable()
        try:
            return self.reg.do_request(f"{self.base}/{path}", method, **kw)
        except requests.RequestException as e:
            raise ToolError(f"registry {self.remote.url()} unreachable: {_scrub(str(e))}",
                            hint="Is the registry up? Is publish.registry right?") from None

    _pinged = False

    def _reachable(self) -> None:
        """One plain request to the registry's API root before the first real one: oras retries a failed request
        five times over about two minutes, which is right for a registry that hiccups and wrong for one that is
        not there (connection refused, no such host): that is an error now."""
        if self._pinged:
            return
        import requests

        try:
            requests.get(f"{self.reg.prefix}://{self.remote.host}/v2/", timeout=10,
                         verify=not self.remote.insecure)
        except requests.RequestException as e:
            raise ToolError(f"registry {self.remote.url()} unreachable: {_scrub(str(e))}",
                            hint="Is the registry up? Is publish.registry right?") from None
        self._pinged = True

    def put_blob(self, path: Path, digest: str, size: int, mount_from: tuple[str, ...] = ()) -> str:
        """Upload a blob as it is (never recompressed); large ones in chunks, never whole in memory. A blob the
        registry has is never sent again: HEAD first, then a cross-repository mount from each of ``mount_from``
        (repositories on the same registry that hold it). Returns how: "present", "mounted" or "sent"."""
        if self._request("HEAD", f"blobs/{digest}").status_code == 200:
            return "present"
        for repo in mount_from:
            if repo == self.remote.repo:
                continue
            r = self._request("POST", f"blobs/uploads/?mount={digest}&from={repo}")
            if r.status_code == 201:
                return "mounted"
            if r.status_code == 202 and (where := r.headers.get("Location")):   # an upload began instead: drop it
                self.reg.do_request(where if "://" in where else f"{self.reg.prefix}://{self.remote.host}{where}",
                                    "DELETE")
        if size > _STREAM_FROM and self._put_streamed(path, digest, size):
            return "sent"
        r = self.reg.upload_blob(str(path), self.container, {"digest": digest, "size": size},
                                 do_chunked=size > _CHUNK, chunk_size=_CHUNK)
        if r.status_code not in (200, 201, 202):
            raise ToolError(f"registry refused blob {digest}: HTTP {r.status_code} {r.text[:300]}")
        return "sent"

    def _put_streamed(self, path: Path, digest: str, size: int) -> bool:
        """A monolithic upload (POST, then one PUT with the whole blob as its body, OCI distribution spec) whose body
        the kernel sends straight from the page cache: Python never touches the bytes, which leaves the CPU to the
        hashing on both ends. True when the registry stored it; False (nothing stored) to fall back to oras."""
        import ssl
        from urllib.parse import urlencode, urlsplit

        r = self._request("POST", "blobs/uploads/", headers={"Content-Length": "0"})
        where = r.headers.get("Location")
        if r.status_code != 202 or not where:
            return False
        url = urlsplit(where if "://" in where else f"{self.reg.prefix}://{self.remote.host}{where}")
        query = "&".join(q for q in (url.query, urlencode({"digest": digest})) if q)
        if url.scheme == "https":
            ctx = ssl.create_default_context()
            if self.remote.insecure:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(url.netloc, timeout=120, context=ctx)
        else:
            conn = http.client.HTTPConnection(url.netloc, timeout=120)
        auth = self.reg.auth   # what oras negotiated for the POST (a bearer token), or the basic credentials
        token, basic = getattr(auth, "token", None), getattr(auth, "_basic_auth", None)
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream",
                   **({"Authorization": f"Bearer {token}"} if token else
                      {"Authorization": f"Basic {basic}"} if basic else {})}
        try:
            conn.putrequest("PUT", f"{url.path}?{query}", skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            with open(path, "rb") as f:
                conn.sock.sendfile(f, 0, size)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return resp.status == 201

    def put_blobs(self, blobs: list[tuple[Path, str, int]], *, workers: int = 4, mount_from: tuple[str, ...] = (),
                  done: Callable[[str, int, str], None] | None = None) -> dict[str, str]:
        """``put_blob`` for many blobs, ``workers`` at a time (each on its own connection, each streamed): a model
        image's shards go up in parallel. ``done(digest, size, how)`` after each. Returns digest -> how."""
        from concurrent.futures import ThreadPoolExecutor

        self._reachable()
        local = threading.local()

        def one(blob: tuple[Path, str, int]) -> tuple[str, str]:
            if not hasattr(local, "client"):
                local.client = Client(self.remote)
                local.client._pinged = True
            how = local.client.put_blob(*blob, mount_from=mount_from)
            if done is not None:
                done(blob[1], blob[2], how)
            return blob[1], how

        unique = list({b[1]: b for b in blobs}.values())
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
            return dict(pool.map(one, unique))

    def push_image(self, layout: Layout, digest: str, reference: str, *, mount_from: tuple[str, ...] = (),
                   done: Callable[[str, int, str], None] | None = None) -> dict[str, str]:
        """An image (or artifact) manifest of ``layout`` and the blobs it names (in parallel, none sent twice), the
        manifest last and as its exact bytes, under ``reference``. Returns digest -> how each blob went up."""
        data = layout.read(digest)
        m = json.loads(data)
        blobs = [m["config"], *m.get("layers", [])]
        hows = self.put_blobs([(layout.blob_path(b["digest"]), b["digest"], b["size"]) for b in blobs],
                              mount_from=mount_from, done=done)
        self.put_manifest(data, m.get("mediaType", MANIFEST), reference)
        return hows

    def put_manifest(self, data: bytes, media_type: str, reference: str) -> str:
        r = self._request("PUT", f"manifests/{reference}", data=data, headers={"Content-Type": media_type})
        if r.status_code not in (200, 201):
            raise ToolError(f"registry refused manifest {reference}: HTTP {r.status_code} {r.text[:300]}",
                            hint="The registry may not accept OCI artifacts with a subject; see `forge registry --help`.")
        stored = r.headers.get("Docker-Content-Digest")
        if stored and stored != sha256_bytes(data):
            raise ToolError(f"registry stored manifest {reference} as {stored}, not {sha256_bytes(data)}")
        return sha256_bytes(data)

    def get_manifest(self, reference: str) -> tuple[bytes, str] | None:
        r = self._request("GET", f"manifests/{reference}", headers={"Accept": ACCEPT})
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise ToolError(f"registry GET manifest {reference}: HTTP {r.status_code} {r.text[:300]}")
        return r.content, r.headers.get("Content-Type", "").split(";")[0]

    def get_blob(self, digest: str) -> bytes:
        r = self._request("GET", f"blobs/{digest}")
        if r.status_code != 200:
            raise ToolError(f"registry GET blob {digest}: HTTP {r.status_code}")
        return r.content

    def stream_blob(self, digest: str, chunk: int = 4 << 20) -> Iterator[bytes]:
        """The blob's bytes as the registry serves them, in chunks: never whole in memory (the caller hashes them)."""
        r = self._request("GET", f"blobs/{digest}", stream=True)
        with r:
            if r.status_code != 200:
                raise ToolError(f"registry GET blob {digest}: HTTP {r.status_code}")
            yield from r.iter_content(chunk)

    def pull_image(self, reference: str, layout: Layout, *, ref_name: str | None = None, workers: int = 4,
                   attempts: int = 4, done: Callable[[str, int, str], None] | None = None) -> tuple[str, dict[str, str]]:
        """An image (or artifact) manifest, by tag or digest, and every blob it names, into ``layout``: ``workers``
        blobs at a time, each on its own connection, streamed to a temporary file while hashed, renamed in only when
        it hashes to its digest. A transfer that breaks resumes where it stopped (an HTTP Range request), up to
        ``attempts`` tries per blob; a blob the layout has is not fetched. ``ref_name``: also name the manifest in
        the layout's index. Returns (manifest digest, digest -> "present" | "fetched")."""
        from concurrent.futures import ThreadPoolExecutor

        got = self.get_manifest(reference)
        if got is None:
            raise ToolError(f"{self.remote.ref(reference)}: no such manifest in the registry")
        data, media_type = got
        digest = sha256_bytes(data)
        if reference.startswith("sha256:") and digest != reference:
            raise ToolError(f"{self.remote.ref(reference)}: the registry served a manifest that hashes to {digest}")
        m = json.loads(data)
        if "layers" not in m or "config" not in m:
            raise ToolError(f"{self.remote.ref(reference)} is a {media_type or 'manifest'} without config and layers "
                            "(an index?): forge pulls one image manifest", hint="Name the platform's manifest digest.")
        layout.init()
        blobs = list({b["digest"]: b for b in [m["config"], *m["layers"]]}.values())
        local = threading.local()

        def one(blob: dict) -> tuple[str, str]:
            if layout.has(blob["digest"]):
                how = "present"
            else:
                if not hasattr(local, "client"):
                    local.client = Client(self.remote)
                    local.client._pinged = True
                local.client._fetch_blob(blob["digest"], int(blob["size"]), layout, attempts)
                how = "fetched"
            if done is not None:
                done(blob["digest"], int(blob["size"]), how)
            return blob["digest"], how

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(blobs)))) as pool:
            hows = dict(pool.map(one, blobs))
        layout.put_bytes(data, digest)   # last: a layout names no manifest whose blobs it lacks
        if ref_name is not None:
            layout.add_to_index([{"mediaType": media_type or MANIFEST, "digest": digest, "size": len(data),
                                  "annotations": {"org.opencontainers.image.ref.name": ref_name}}])
        return digest, hows

    def _fetch_blob(self, digest: str, size: int, layout: Layout, attempts: int) -> None:
        """One blob into ``layout``, streamed, resumed after a broken transfer, refused unless it hashes to digest."""
        import requests
        import urllib3

        tmp = layout.root / "blobs" / "sha256" / f".tmp-pull-{uuid.uuid4().hex}"
        h, have, why = hashlib.sha256(), 0, ""
        buf = memoryview(bytearray(_PULL_CHUNK))   # one buffer: received into, hashed and written from, no copies
        try:
            with open(tmp, "wb", buffering=0) as f:
                for attempt in range(attempts):
                    if attempt:
                        time.sleep(min(8.0, 0.5 * 2 ** attempt))
                    try:
                        try:
                            r = self._request("GET", f"blobs/{digest}", stream=True,
                                              headers={"Range": f"bytes={have}-"} if have else {})
                        except ToolError as e:   # unreachable: the network, perhaps for a moment
                            raise _Transient(e.message) from None
                        with r:
                            if r.status_code == 200 and have:   # the registry ignored the range: start again
                                h, have = hashlib.sha256(), 0
                                f.seek(0)
                                f.truncate()
                            elif r.status_code >= 500:
                                raise _Transient(f"HTTP {r.status_code}")
                            elif r.status_code not in (200, 206):   # 404, 401: trying again changes nothing
                                raise ToolError(f"registry {self.remote.url()}: GET blob {digest}: HTTP {r.status_code}")
                            read = getattr(getattr(r.raw, "_fp", None), "readinto", None)   # http.client's
                            while n := (read(buf) if read else _copy_into(buf, r.raw.read(len(buf), decode_content=False))):
                                h.update(buf[:n])
                                view = buf[:n]
                                while view:
                                    view = view[f.write(view):]
                                have += n
                    except (_Transient, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                        why = _scrub(str(e)) or type(e).__name__
                        continue
                    if have < size:
                        why = f"the transfer stopped at {have} of {size} bytes"
                        continue
                    if have == size and "sha256:" + h.hexdigest() == digest:
                        break
                    why = f"{have} bytes hashing to sha256:{h.hexdigest()}, not the {size} bytes of {digest}"
                    h, have = hashlib.sha256(), 0   # wrong bytes: none of them is kept
                    f.seek(0)
                    f.truncate()
                else:
                    raise ToolError(f"registry {self.remote.url()}: blob {digest} not pulled after {attempts} "
                                    f"attempts: {why}", hint="Is the registry (or the network to it) healthy?")
            os.replace(tmp, layout.blob_path(digest))
        finally:
            tmp.unlink(missing_ok=True)

    def delete_manifest(self, digest: str) -> bool:
        """DELETE a manifest by digest; False when the registry does not allow deletes."""
        return self._request("DELETE", f"manifests/{digest}").status_code in (200, 202)

    def blob_digest(self, digest: str) -> str | None:
        """sha256 of the blob the registry serves under digest (streamed), None if it has none."""
        import hashlib

        r = self._request("GET", f"blobs/{digest}", stream=True)
        if r.status_code != 200:
            return None
        h = hashlib.sha256()
        for chunk in r.iter_content(4 << 20):
            h.update(chunk)
        return "sha256:" + h.hexdigest()

    def referrers(self, subject: str) -> tuple[list[dict], str]:
        """(descriptors of the manifests that refer to subject, "api" or "tag-schema")."""
        r = self._request("GET", f"referrers/{subject}", headers={"Accept": INDEX})
        if r.status_code == 200 and r.headers.get("Content-Type", "").startswith(INDEX):
            return r.json().get("manifests", []), "api"
        got = self.get_manifest(_fallback_tag(subject))
        return (json.loads(got[0]).get("manifests", []) if got else []), "tag-schema"

    def add_referrers(self, subject: str, descriptors: list[dict]) -> str:
        """Make descriptors findable as referrers of subject; returns how ("api" or "tag-schema")."""
        current, how = self.referrers(subject)
        if how == "api":
            return how
        have = {d["digest"] for d in current}
        merged = current + [d for d in descriptors if d["digest"] not in have]
        if len(merged) != len(current) or not current:
            index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": merged}
            self.put_manifest(manifest_bytes(index), INDEX, _fallback_tag(subject))
        return how


def _copy_into(buf: memoryview, data: bytes) -> int:
    buf[:len(data)] = data
    return len(data)


class _Transient(Exception):
    """A failed transfer worth trying again (the network, a 5xx)."""


def _fallback_tag(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return f"{algo}-{hexd}"


def _auth_files() -> list[Path]:
    return list(options.current().registry_auth_files)


def parse_ref(ref: str) -> tuple[Remote, str]:
    """oci://host/repo:tag or oci://host/repo@sha256:… → (remote, tag or digest)."""
    body = ref.removeprefix("oci://")
    if "@" in body:
        repo_part, _, what = body.partition("@")
    else:
        host, _, path = body.partition("/")
        path, sep, what = path.rpartition(":")
        if not sep:
            raise UsageError(f"{ref!r} names no tag or digest", hint="Use oci://HOST/REPO:TAG or oci://HOST/REPO@sha256:….")
        repo_part = f"{host}/{path}"
    return Remote.parse("oci://" + repo_part), what
