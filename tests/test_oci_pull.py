"""forge's own pull (forge.oci.client.Client.pull_image) from the real Distribution registry on 127.0.0.1: a model
image's blobs a few at a time, byte for byte; a transfer cut mid-blob resumes with a Range request; bytes that do not
hash to their digest are never taken in."""
from __future__ import annotations

import json
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from forge.core.errors import ToolError
from forge.image.model_image import write_model_image
from forge.oci.client import Client, Remote
from forge.oci.layout import Layout

SHARD = 3_000_000


def _checkpoint(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    for i, byte in enumerate(b"ACD"):
        (root / f"model-0000{i + 1}-of-00003.safetensors").write_bytes(bytes([byte]) * SHARD + b"%d" % i)
    return root


def _files(layout: Layout, digest: str) -> dict[str, bytes]:
    out = {}
    for layer in json.loads(layout.read(digest))["layers"]:
        with tarfile.open(layout.blob_path(layer["digest"])) as tf:
            out.update({m.name: tf.extractfile(m).read() for m in tf if m.isfile()})
    return out


class Proxy:
    """A TCP relay to the registry that can cut the first ``cuts`` connections once ``cut_after`` bytes went down
    them, or rewrite b"AAAAAAAA" to b"AAAAAAAB" on the way down (a shard's bytes; never a header or a digest)."""

    def __init__(self, upstream: str, *, cut_after: int = 0, cuts: int = 0, corrupt: bool = False):
        self.upstream = upstream.rsplit(":", 1)
        self.cut_after, self.cuts, self.corrupt = cut_after, cuts, corrupt
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            threading.Thread(target=self._up, args=(client, up), daemon=True).start()
            threading.Thread(target=self._down, args=(up, client), daemon=True).start()

    def _up(self, client, up) -> None:
        try:
            while data := client.recv(1 << 16):
                with self.lock:
                    self.requests.append(data)
                up.sendall(data)
        except OSError:
            pass

    def _down(self, up, client) -> None:
        sent = 0
        try:
            while data := up.recv(1 << 16):
                if self.corrupt:
                    data = data.replace(b"AAAAAAAA", b"AAAAAAAB")
                sent += len(data)
                with self.lock:
                    cut = self.cuts > 0 and sent > self.cut_after
                    self.cuts -= cut
                if cut:
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, up):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def pushed(tmp_path, oci_registry):
    layout = Layout(tmp_path / "oci")
    mi = write_model_image(_checkpoint(tmp_path / "ckpt"), layout, "m:1", annotations={})
    Client(Remote.parse(f"oci://{oci_registry}/models/pull")).push_image(layout, mi.manifest_digest, "1-model")
    return layout, mi


def test_pull_fetches_every_blob_concurrently_and_byte_for_byte(tmp_path, oci_registry, pushed):
    layout, mi = pushed
    client = Client(Remote.parse(f"oci://{oci_registry}/models/pull"))
    into = Layout(tmp_path / "pulled")
    seen = []
    digest, hows = client.pull_image("1-model", into, ref_name="m:1-model", done=lambda d, n, how: seen.append(d))
    assert digest == mi.manifest_digest and sorted(hows.values()) == ["fetched"] * 5   # config + 4 layers
    assert sorted(seen) == sorted(hows)
    assert _files(into, digest) == _files(layout, mi.manifest_digest)
    assert not list((into.root / "blobs" / "sha256").glob(".tmp-*"))
    proc = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{into.root}:m:1-model"], capture_output=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["layers"] == json.loads(layout.read(digest))["layers"]
    # again: nothing is fetched that the layout has; by digest the same
    assert set(client.pull_image(digest, into)[1].values()) == {"present"}


def test_a_transfer_cut_mid_blob_resumes_where_it_stopped(tmp_path, oci_registry, pushed):
    _, mi = pushed
    proxy = Proxy(oci_registry, cut_after=SHARD // 3, cuts=2)
    try:
        into = Layout(tmp_path / "pulled")
        digest, hows = Client(Remote.parse(f"oci://{proxy.host}/models/pull")).pull_image(mi.manifest_digest, into,
                                                                                         workers=2)
    finally:
        proxy.close()
    assert set(hows.values()) == {"fetched"} and proxy.cuts == 0
    for layer in json.loads(into.read(digest))["layers"]:
        assert into.verify(layer["digest"]) is None
    ranges = [r for r in proxy.requests if b"\r\nRange: bytes=" in r]
    assert ranges and all(b"bytes=0-" not in r for r in ranges)   # resumed, not started over


def test_bytes_that_do_not_hash_to_their_digest_are_never_taken_in(tmp_path, oci_registry, pushed):
    _, mi = pushed
    proxy = Proxy(oci_registry, corrupt=True)
    into = Layout(tmp_path / "pulled")
    try:
        with pytest.raises(ToolError, match="not pulled after 2 attempts: .* hashing to sha256:"):
            Client(Remote.parse(f"oci://{proxy.host}/models/pull")).pull_image(mi.manifest_digest, into, attempts=2)
    finally:
        proxy.close()
    shard = next(la["digest"] for la in mi.layers if la["files"].startswith("model-00001"))
    assert not into.has(shard) and not into.has(mi.manifest_digest)
    assert not list((into.root / "blobs" / "sha256").glob(".tmp-*"))


def test_an_unknown_reference_is_a_clear_error(tmp_path, oci_registry, pushed):
    with pytest.raises(ToolError, match="no such manifest"):
        Client(Remote.parse(f"oci://{oci_registry}/models/pull")).pull_image("nope", Layout(tmp_path / "x"))


def test_a_large_shard_goes_up_as_one_streamed_put_and_comes_back(tmp_path, oci_registry):
    """Above 16 MiB a blob is one PUT whose body the kernel sends (sendfile), not 64 MiB PATCHes through Python."""
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"Z" * (17 << 20))
    layout = Layout(tmp_path / "oci")
    mi = write_model_image(ckpt, layout, "big:1", annotations={})
    proxy = Proxy(oci_registry)   # a plain relay here: it only watches
    try:
        hows = Client(Remote.parse(f"oci://{proxy.host}/models/big")).push_image(layout, mi.manifest_digest, "1")
    finally:
        proxy.close()
    assert set(hows.values()) == {"sent"}
    shard = mi.layers[0]
    sent = b"".join(proxy.requests)
    assert b"PATCH " not in sent and f"Content-Length: {shard['size']}".encode() in sent
    into = Layout(tmp_path / "pulled")
    Client(Remote.parse(f"oci://{oci_registry}/models/big")).pull_image("1", into)
    assert into.read(shard["digest"]) == layout.read(shard["digest"])
