"""The remote step cache against a real OCI Distribution registry (Debian's docker-registry on 127.0.0.1):
push what a build makes, pull it into a fresh cache with every digest checked, refuse tampered blobs, keep one
artifact per key when two builders race, never push in read mode, and keep building when the registry is down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, SECRETS, forge_cli, free_port, write_recipe

from forge.orchestrate.build import execute_one as execute
from forge.store.remote import ARTIFACT_TYPE, RemoteCache, RemoteCacheCorrupt
from forge.core.digests import sha256_file, tree_digest
from forge.executors.process import ProcessExecutor
from conftest import resolved
from forge.store.local import Store

STEPS = ["resolve", "quantize"]


@pytest.fixture
def recipe(tmp_path, tiny_llama) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", str(tiny_llama))


@pytest.fixture
def remote(tmp_path, oci_registry) -> str:
    """A repository of its own in the session's registry, per test."""
    return f"oci://{oci_registry}/cache/{tmp_path.name.lower()}"


def _tags(url: str) -> list[str]:
    host, _, repo = url.removeprefix("oci://").partition("/")
    try:
        with urllib.request.urlopen(f"http://{host}/v2/{repo}/tags/list", timeout=10) as r:
            return sorted(json.load(r).get("tags") or [])
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise


def _manifest(url: str, tag: str) -> dict:
    host, _, repo = url.removeprefix("oci://").partition("/")
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def _blob_file(tmp_path_factory, digest: str) -> Path:
    """The data file of a blob in the session registry's storage directory."""
    hexd = digest.removeprefix("sha256:")
    found = list(tmp_path_factory.getbasetemp().glob(
        f"oci-registry[0-9]*/data/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"))
    assert len(found) == 1, found
    return found[0]


def _build_json(recipe: Path, cache: Path, *args: str, env: dict | None = None, check: int | None = 0):
    proc = forge_cli("build", str(recipe), "--json", *args, cache=cache, env=env, check=check)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 else None)


def _steps(doc: dict) -> dict[str, tuple[str, str, str]]:
    return {s["step"]: (s["status"], s["key"], s["output_digest"]) for s in doc["steps"]}


def test_a_fresh_cache_pulls_every_step_with_identical_digests(recipe, remote, tmp_path):
    # cache A builds and pushes: one artifact per step, tagged by its key
    _, a = _build_json(recipe, tmp_path / "A", "--cache-remote", remote)
    a_steps = _steps(a)
    assert [s for s, (status, *_) in a_steps.items() if status == "BUILT"] == STEPS
    assert _tags(remote) == sorted(f"step-{key}" for _, key, _ in a_steps.values())
    m = _manifest(remote, f"step-{a_steps['resolve'][1]}")
    assert m["artifactType"] == ARTIFACT_TYPE
    titles = {layer["annotations"]["org.opencontainers.image.title"] for layer in m["layers"]}
    assert "model.safetensors" in titles

    # a fresh cache B (the variable, as a CI runner sets it): every step a remote HIT, the same keys and digests
    proc, b = _build_json(recipe, tmp_path / "B", env={"FORGE_CACHE_REMOTE": remote})
    assert {s: v[0] for s, v in _steps(b).items()} == dict.fromkeys(STEPS, "REMOTE"), proc.stderr
    assert {s: v[1:] for s, v in _steps(b).items()} == {s: v[1:] for s, v in a_steps.items()}
    store_a, store_b = Store(tmp_path / "A"), Store(tmp_path / "B")
    for _, key, _ in a_steps.values():
        ea, eb = store_a.get(key), store_b.get(key)
        assert eb.manifest["output"] == ea.manifest["output"]
        assert eb.manifest["remote"]["from"] == f"{remote}:step-{key}"
        for rel, f in eb.manifest["output"]["files"].items():   # the bytes on disk, not only the manifest
            assert sha256_file(eb.out / rel) == f["sha256"]
    assert not any((tmp_path / "B" / "staging").iterdir())
    # the human output says where each step came from
    text = forge_cli("build", str(recipe), cache=tmp_path / "C", env={"FORGE_CACHE_REMOTE": remote}, check=0).stdout
    assert text.count("REMOTE") == 2 and "BUILT" not in text
    # and a rebuild of B is a plain local HIT
    _, again = _build_json(recipe, tmp_path / "B", "--cache-remote", remote)
    assert {s: v[0] for s, v in _steps(again).items()} == dict.fromkeys(STEPS, "HIT")


def test_the_remote_travels_with_the_request_to_worker_processes(recipe, remote, tmp_path):
    cache = RemoteCache.parse(remote)
    built = execute(resolved(recipe), Store(tmp_path / "A"), remote=cache)
    pulled = execute(resolved(recipe), Store(tmp_path / "B"), remote=cache, executor=ProcessExecutor())
    assert [r.status for r in built.results] == ["BUILT", "BUILT"]
    assert [r.status for r in pulled.results] == ["REMOTE", "REMOTE"]
    assert [(r.key, r.output_digest) for r in pulled.results] == [(r.key, r.output_digest) for r in built.results]


def test_a_tampered_blob_is_refused_exit_5_and_nothing_is_committed(recipe, remote, tmp_path, tmp_path_factory):
    _, a = _build_json(recipe, tmp_path / "A", "--cache-remote", remote)
    key = _steps(a)["resolve"][1]
    layer = next(layer for layer in _manifest(remote, f"step-{key}")["layers"]
                 if layer["annotations"]["org.opencontainers.image.title"] == "model.safetensors")
    data = _blob_file(tmp_path_factory, layer["digest"])
    original = data.read_bytes()
    raw = bytearray(original)
    raw[len(raw) // 2] ^= 0xFF                       # one flipped byte, same size
    data.write_bytes(bytes(raw))
    try:
        proc = forge_cli("build", str(recipe), cache=tmp_path / "B", env={"FORGE_CACHE_REMOTE": remote})
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert "model.safetensors" in proc.stderr and layer["digest"] in proc.stderr.replace("\n", ""), proc.stderr
        assert "Traceback" not in proc.stderr
        store = Store(tmp_path / "B")
        assert store.entries() == [] and not any((tmp_path / "B" / "staging").iterdir())

        # the API says the same to a library caller (D's workers): RemoteCacheCorrupt, exit 5, nothing committed
        with pytest.raises(RemoteCacheCorrupt) as info:
            RemoteCache.parse(remote).pull(Store(tmp_path / "C"), key)
        assert info.value.exit_code == 5 and "model.safetensors" in info.value.message
        assert Store(tmp_path / "C").get(key) is None
    finally:
        data.write_bytes(original)   # blobs are shared by every repository of the registry: leave it whole


def test_two_concurrent_writers_leave_one_artifact_and_the_same_output(recipe, remote, tmp_path, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    procs = [subprocess.Popen([sys.executable, "-m", "forge", "build", str(recipe), "--json", "--cache-remote", remote],
                              env={**env, "FORGE_CACHE_DIR": str(tmp_path / name), "HF_HUB_OFFLINE": "1"}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("A", "B")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = (_steps(json.loads(out)) for out, _ in outs)
    assert {s: v[1:] for s, v in a.items()} == {s: v[1:] for s, v in b.items()}    # same keys, same outputs
    # one artifact per key: one tag, naming a manifest whose output is what both builds committed
    assert _tags(remote) == sorted(f"step-{key}" for _, key, _ in a.values())
    repo = remote.removeprefix("oci://").partition("/")[2]
    revisions = list(tmp_path_factory.getbasetemp().glob(
        f"oci-registry[0-9]*/data/docker/registry/v2/repositories/{repo}/_manifests/revisions/sha256/*/link"))
    assert len(revisions) == len(a), revisions     # no second manifest left behind by the writer that lost
    for step, (_, key, output) in a.items():
        assert _manifest(remote, f"step-{key}")["annotations"]["dev.forge.step.output"] == output
        for cache in ("A", "B"):
            assert Store(tmp_path / cache).get(key).output_digest == output


def test_a_step_that_differs_from_the_remote_is_reported_and_the_remote_kept(recipe, remote, tmp_path):
    """Another writer published different bytes under the same key (a non-reproducible step): forge adopts the
    remote output locally, says so, records it, and never overwrites the registry."""
    cache = RemoteCache.parse(remote)
    loaded = resolved(recipe)
    first = execute(loaded, Store(tmp_path / "A"))            # built here, not pushed
    mine = first.by_name["resolve"].entry
    # the other writer: the same key, one file different
    other = Store(tmp_path / "other")
    with other.staging(mine.key) as staged:
        for rel in mine.manifest["output"]["files"]:
            (staged / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / "out" / rel).write_bytes((mine.out / rel).read_bytes())
        (staged / "out" / "config.json").write_text('{"theirs": true}')
        files = other.memo.tree(staged / "out")
        manifest = {k: v for k, v in mine.manifest.items() if k not in ("key", "manifest_version")}
        manifest["output"] = {"digest": tree_digest(files),
                              "files": {r: {"size": f.size, "sha256": f.sha256} for r, f in files.items()}}
        theirs = other.commit(mine.key, staged, manifest)
    tagged = cache.push(other, theirs)

    again = execute(loaded, Store(tmp_path / "A"), force={"resolve"}, remote=cache)
    pulled = again.by_name["resolve"]
    assert pulled.status == "REMOTE" and pulled.output_digest == theirs.output_digest
    assert any("not reproducible" in w and "resolve" in w for w in again.warnings), again.warnings
    local = Store(tmp_path / "A").get(mine.key)
    assert (local.out / "config.json").read_text() == '{"theirs": true}'
    assert local.manifest["remote"]["non_reproducible"] == {"local_output": mine.output_digest,
                                                            "remote_output": theirs.output_digest}
    assert cache.push(other, theirs) == tagged                # the tag still names the first writer's artifact


def test_read_mode_pulls_but_never_pushes(recipe, remote, tmp_path):
    read = RemoteCache.parse(remote, mode="read")
    built = execute(resolved(recipe), Store(tmp_path / "A"), remote=read)
    assert [r.status for r in built.results] == ["BUILT", "BUILT"]
    assert _tags(remote) == []
    forge_cli("build", str(recipe), "--cache-remote", remote, "--cache-remote-mode", "read", cache=tmp_path / "B",
              check=0)
    assert _tags(remote) == []
    execute(resolved(recipe), Store(tmp_path / "C"), remote=RemoteCache.parse(remote))   # a trusted writer
    pulled = execute(resolved(recipe), Store(tmp_path / "D"), remote=read)
    assert [r.status for r in pulled.results] == ["REMOTE", "REMOTE"]


def test_an_unreachable_cache_warns_once_and_the_build_goes_on(recipe, tmp_path):
    down = f"oci://127.0.0.1:{free_port()}/cache"
    proc = forge_cli("build", str(recipe), "--cache-remote", down, cache=tmp_path / "A", check=0)
    assert proc.stdout.count("BUILT") == 2
    assert proc.stderr.count("warning:") == 1 and "building without the remote step cache" in proc.stderr, proc.stderr
    assert down in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--cache-remote", "http://127.0.0.1:5000/cache"], "is not oci://HOST[:PORT]/REPOSITORY"),
    (["--cache-remote", "oci://127.0.0.1:5000"], "is not oci://HOST[:PORT]/REPOSITORY"),
    (["--cache-remote", "oci://127.0.0.1:5000/cache", "--cache-remote-mode", "write"], "is not one of readwrite, read"),
])
def test_a_bad_remote_is_a_usage_error_before_anything_runs(recipe, tmp_path, args, message):
    proc = forge_cli("build", str(recipe), *args, cache=tmp_path / "A")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list((tmp_path / "A" / "steps").glob("*"))


def test_a_large_blob_streams_through_without_being_held_in_memory(remote, tmp_path):
    store = Store(tmp_path / "A")
    key = "5a" * 32
    size = 96 << 20
    with store.staging(key) as staged:
        with open(staged / "out" / "weights.bin", "wb") as f:
            for i in range(size >> 20):
                f.write(bytes([i]) * (1 << 20))
        files = store.memo.tree(staged / "out")
        entry = store.commit(key, staged, {"step": "quantize", "facts": {}, "output": {
            "digest": tree_digest(files), "files": {r: {"size": e.size, "sha256": e.sha256} for r, e in files.items()}}})
    cache = RemoteCache.parse(remote)
    cache.push(store, entry)
    tracemalloc.start()
    try:
        pulled = cache.pull(Store(tmp_path / "B"), key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pulled.output_digest == entry.output_digest
    assert sha256_file(pulled.out / "weights.bin") == entry.manifest["output"]["files"]["weights.bin"]["sha256"]
    assert peak < 24 << 20, f"pulling a {size >> 20} MiB blob peaked at {peak >> 20} MiB of Python memory"


def test_the_ci_example_sharing_the_cache_passes_actionlint(tmp_path):
    from test_ci import _actionlint, _project

    workflow = (REPO / "examples" / "ci" / "github" / "forge-remote-cache.yml").read_text()
    assert "cache-remote: ${{ vars.FORGE_CACHE_REMOTE }}" in workflow and "FORGE_CACHE_REMOTE_MODE" in workflow
    root = _project(tmp_path, workflow)
    proc = subprocess.run([_actionlint(), "-no-color"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # negative control: actionlint reads the action, so a misspelt input of it fails
    (root / ".github" / "workflows" / "forge.yml").write_text(workflow.replace("cache-remote:", "cache-remotes:"))
    proc = subprocess.run([_actionlint(), "-no-color"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 1 and 'input "cache-remotes" is not defined' in proc.stdout


def _crafted(store: Store, key: str, step: str, files: dict[str, bytes], digest: str | None = None):
    """An entry committed as the runner would, except that ``digest`` (when given) replaces its output digest:
    a manifest edited before it was pushed."""
    from forge.steps.graph import volatile

    with store.staging(key) as staged:
        for rel, data in files.items():
            (staged / "out" / rel).write_bytes(data)
        tree = store.memo.tree(staged / "out")
        real = tree_digest({r: e for r, e in tree.items() if r not in volatile(step)})
        return store.commit(key, staged, {"step": step, "facts": {}, "output": {
            "digest": digest or real, "files": {r: {"size": e.size, "sha256": e.sha256} for r, e in tree.items()}}})


def test_files_that_do_not_make_the_manifests_output_digest_are_refused(recipe, remote, tmp_path):
    cache = RemoteCache.parse(remote)
    a = Store(tmp_path / "A")
    other = tree_digest({"model.safetensors": a.memo.file(recipe)})          # some other output's digest
    lying = _crafted(a, "6b" * 32, "resolve", {"config.json": b"{}", "model.safetensors": b"W" * 100}, other)
    cache.push(a, lying)
    with pytest.raises(RemoteCacheCorrupt) as e:
        cache.pull(Store(tmp_path / "B"), lying.key)
    assert e.value.exit_code == 5 and f"its step manifest says {other}" in e.value.message
    assert "refused, nothing committed" in e.value.message
    assert Store(tmp_path / "B").get(lying.key) is None and not any((tmp_path / "B" / "staging").iterdir())

    # the step's volatile files (the quantize reports: timings) are not part of its digest, as in the runner
    q = _crafted(a, "7c" * 32, "quantize", {"model.safetensors": b"Q" * 64, "quantize-report.json": b'{"seconds": 1}'})
    cache.push(a, q)
    assert cache.pull(Store(tmp_path / "B"), q.key, step="quantize").output_digest == q.output_digest
    # a pull for another step than the one the key was computed for finds nothing to trust: it builds instead
    assert cache.pull(Store(tmp_path / "C"), q.key, step="resolve") is None

    # through the CLI: a fresh cache pulling a real step's key whose manifest lies is exit 5, nothing committed
    built = execute(resolved(recipe), Store(tmp_path / "D")).by_name["resolve"].entry
    evil = Store(tmp_path / "evil")
    cache.push(evil, _crafted(evil, built.key, "resolve", {rel: (built.out / rel).read_bytes()
                                                            for rel in built.manifest["output"]["files"]}, other))
    proc = forge_cli("build", str(recipe), cache=tmp_path / "E", env={"FORGE_CACHE_REMOTE": remote})
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "output digest" in proc.stderr and "Traceback" not in proc.stderr
    assert Store(tmp_path / "E").entries() == [] and not any((tmp_path / "E" / "staging").iterdir())
