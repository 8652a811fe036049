"""The container tools forge drives (buildah, podman, docker, skopeo): each call with a scrubbed environment
and a failure shown as exit 5, image build, load and unload, OCI layout reading, and an image's server started
and stopped as a process group (`buildah run` leaves servers behind otherwise).

The package and base_image steps build with these, the smoke test (forge.image.smoketest) serves with them, and the
tests use them to run what forge built.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from forge.core import options as fenv
from forge.image.containers import PORT
from forge.core.errors import ToolError
from forge.core.host import Unprobed, probes_allowed
from forge.oci.layout import member_path

CONTAINERFILE = "Containerfile"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "REGISTRY_PASSWORD", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG",
              "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN")


TOOL_VERSIONS = "tool-versions.json"   # the memo of tool_version, in the root of the step cache it serves


@lru_cache(maxsize=None)  # asked for by several steps' keys in one build
def tool_version(tool: str, cache_dir: Path | None) -> str:
    """`tool --version`, remembered by the binary's (path, size, mtime) in ``cache_dir`` (the root of the step
    cache whose keys it enters; None: in this process only, never in another cache): a no-op rebuild runs
    no subprocess."""
    path = shutil.which(tool)
    if path is None:
        return "absent"
    st = os.stat(path)
    ident = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    memo = Path(cache_dir) / TOOL_VERSIONS if cache_dir is not None else None
    try:
        known = json.loads(memo.read_text()) if memo is not None else {}
    except (OSError, ValueError):
        known = {}
    if ident in known:
        return known[ident]
    if not probes_allowed():
        raise Unprobed(f"`{tool} --version` (not remembered yet)")
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    version = out.splitlines()[0] if out else "unknown"
    if memo is None:
        return version
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, ident: version}))
        tmp.replace(memo)
    except OSError:
        pass
    return version


def clean_env() -> dict:
    clean = fenv.passthrough(SECRET_ENV, ("HF_", "AWS_"))
    clean.setdefault("BUILDAH_ISOLATION", "chroot")
    return clean


def storage_flags() -> list[str]:
    """buildah's storage options, shared by every buildah call forge makes (FORGE_BUILDAH_* pick them)."""
    opts = fenv.current()
    root = opts.buildah_root
    driver = opts.buildah_storage_driver
    if driver == "auto":
        driver = storage_driver(Path(root) if root else default_storage_root())
    flags = ["--storage-driver", driver]
    return flags + (["--root", root, "--runroot", root + "-run"] if root else [])


def default_storage_root() -> Path:
    """Where buildah keeps images when no --root is given (containers-storage's defaults, root and rootless)."""
    if os.geteuid() == 0:
        return Path("/var/lib/containers/storage")
    return fenv.current().data_home / "containers" / "storage"


@lru_cache(maxsize=None)
def storage_driver(root: Path) -> str:
    """FORGE_BUILDAH_STORAGE_DRIVER=auto: the driver a storage root already holds images with (containers-storage
    keeps ``<driver>-images`` per driver, and refuses another driver on the same root), else overlay where this
    process can mount an overlay filesystem on the root's filesystem, else vfs. overlay shares the base image's
    files between layers and containers; vfs copies the whole root filesystem for each (forge's CPU base is 1.4
    GB unpacked; bench/results/storage-driver.json: a package build's buildah work in 0.68x vfs's time, half the
    disk). Both write the same layers, so the same image digests. forge decides rather than leaving the flag out:
    buildah 1.28, given no driver, takes overlay even on a root that holds vfs images, and sees none of them."""
    for driver in ("overlay", "vfs"):
        if (root / f"{driver}-images").is_dir():
            return driver
    return "overlay" if _overlay_mounts(root) else "vfs"


def _overlay_mounts(root: Path) -> bool:
    """Mount, then unmount, a one-directory overlay beside ``root`` (on its filesystem): what the overlay driver
    needs. Only as root (rootless overlay needs a user namespace, which forge does not set up)."""
    import tempfile

    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".forge-overlay-probe-", dir=root) as tmp:
            dirs = {d: Path(tmp) / d for d in ("lower", "upper", "work", "merged")}
            for d in dirs.values():
                d.mkdir()
            opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
            mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
                                     capture_output=True, timeout=30).returncode == 0
            if mounted:
                subprocess.run(["umount", str(dirs["merged"])], capture_output=True, timeout=30)
            return mounted
    except (OSError, subprocess.TimeoutExpired):
        return False


def buildah(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    if shutil.which("buildah") is None:
        raise ToolError("buildah is not on PATH: the package step cannot build images",
                        hint="Install it (Debian/Ubuntu: apt-get install buildah; `make setup-tools` does it here), "
                             "or remove the container section to stop before packaging.")
    return _run(["buildah", *storage_flags(), *args], shown=("buildah", *args[:3]), check=check, **kw)


def _run(argv: list[str], *, shown: tuple[str, ...], check: bool = True, env: dict | None = None,
         **kw) -> subprocess.CompletedProcess:
    """Run a container tool with the scrubbed environment; a failure is exit 5 showing the command's start."""
    proc = subprocess.run(argv, capture_output=True, text=True, env={**clean_env(), **(env or {})}, **kw)
    if check and proc.returncode != 0:
        raise ToolError(f"`{' '.join(shown)} …` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def load_image(builder: str, layout: Path, ref: str, tag: str) -> None:
    """Make ``tag`` in the builder's storage the image in the OCI layout (what the smoke test and a user run)."""
    if builder == "buildah":
        pull_layout(layout, ref, tag)
    elif builder == "podman":
        image_id = _tool("podman", "pull", "--quiet", f"oci:{layout}:{ref}").stdout.strip().splitlines()[-1]
        _tool("podman", "tag", image_id, tag)
    else:
        _tool("skopeo", "copy", "--quiet", f"oci:{layout}:{ref}", f"docker-daemon:{tag}")


def unload_image(builder: str, tag: str) -> None:
    if builder == "buildah":
        buildah("rmi", "--force", tag, check=False)
    else:
        subprocess.run([builder, "rmi", "--force", tag], capture_output=True, env=clean_env())


def pull_layout(layout: Path, ref: str, tag: str) -> None:
    """buildah pull of an OCI layout as ``tag``. buildah names a pulled oci: image after its path, which must then
    be a valid reference (no '.cache' components): pull through a plain, lower-case symlink, then drop that name
    (left behind, it kept every image a smoke test loaded in the user's storage after the tag was removed)."""
    import tempfile

    link = Path(tempfile.gettempdir()) / f"forge-oci-{uuid.uuid4().hex}"
    link.symlink_to(layout)
    try:
        image_id = buildah("pull", "--quiet", f"oci:{link}:{ref}").stdout.strip().splitlines()[-1]
    finally:
        link.unlink()
    buildah("tag", image_id, tag)
    buildah("rmi", f"localhost{link}:latest")   # one of its two names: the image stays, as tag


def choose_builder(loaded, base) -> str:
    """container.builder resolved: auto takes buildah, then podman, then docker, whichever is on PATH.
    forge's own bases live in buildah's storage, so they are built on with buildah."""
    want = loaded.recipe.container.builder
    if base.built:   # resolve_base refused any other builder for it
        return "buildah"
    order = ("buildah", "podman", "docker") if want == "auto" else (want,)
    for tool in order:
        if shutil.which(tool):
            return tool
    raise ToolError(f"no image builder on PATH (container.builder: {want}; looked for {', '.join(order)})",
                    hint="Install buildah (`make setup-tools`), podman or docker.")


def _tool(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return _run(list(argv), shown=argv[:3], env=env)


def build_image(builder: str, context: Path, tag: str, layout: Path, ref: str, *, local_base: bool) -> None:
    """Build the Containerfile in context as tag, then export it as an OCI layout (what Trivy and the registry read).
    forge's own base is in local storage already; a published one is pulled once (by digest when locked)."""
    cf = str(context / CONTAINERFILE)
    if builder == "buildah":
        buildah("bud", "--isolation", "chroot", "--timestamp", "0", "--layers=false",
                "--pull=never" if local_base else "--pull=missing", "-f", cf, "-t", tag, str(context))
        buildah("push", "--quiet", tag, f"oci:{layout}:{ref}")
    elif builder == "podman":
        _tool("podman", "build", "--timestamp", "0", "--layers=false", "--pull=missing", "-f", cf, "-t", tag, str(context))
        _tool("podman", "push", "--quiet", tag, f"oci:{layout}:{ref}")
    else:  # docker: BuildKit honours SOURCE_DATE_EPOCH for the image's timestamps; the archive goes through skopeo
        _tool("docker", "build", "--build-arg", "SOURCE_DATE_EPOCH=0", "-f", cf, "-t", tag, str(context),
              env={"SOURCE_DATE_EPOCH": "0", "DOCKER_BUILDKIT": "1"})
        archive = layout.parent / f".{ref}.docker.tar"
        try:
            _tool("docker", "save", "-o", str(archive), tag)
            if shutil.which("skopeo") is None:
                raise ToolError("skopeo is not on PATH: forge converts docker's archive to an OCI layout with it",
                                hint="apt-get install skopeo")
            _tool("skopeo", "copy", "--quiet", f"docker-archive:{archive}", f"oci:{layout}:{ref}")
        finally:
            archive.unlink(missing_ok=True)


def describe_layout(layout: Path, ref: str) -> dict:
    """Manifest digest, config digest, and layer digests of one image in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    desc = next((m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref), index["manifests"][0])
    manifest = json.loads(blob_path(layout, desc["digest"]).read_text())
    layers = [layer["digest"] for layer in manifest["layers"]]
    return {"manifest_digest": desc["digest"], "config_digest": manifest["config"]["digest"], "layers": layers,
            "weights_layer": layers[-1], "oci_ref": ref}


def image_entrypoint(layout: Path, ref: str) -> list[str]:
    """What the image in the layout runs when started: its config's Entrypoint then Cmd (as docker run does)."""
    desc = describe_layout(layout, ref)
    config = json.loads(blob_path(layout, desc["config_digest"]).read_text()).get("config") or {}
    argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    if not argv:
        raise ToolError(f"the image {ref} in {layout} has no Entrypoint or Cmd: nothing to serve")
    return argv


def blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def file_digests_in_layer(layout: Path, layer_digest: str) -> dict[str, str]:
    """sha256 of every regular file in one layer blob (for checking the weights layer against the model)."""
    import tarfile

    out = {}
    with tarfile.open(blob_path(layout, layer_digest)) as tf:
        for m in tf:
            if m.isfile():
                out[member_path(m.name)] = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
    return out


# ------------------------------------------------------------------ serving an image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GPU_FLAGS = {"docker": ("--gpus", "all"), "podman": ("--device", "nvidia.com/gpu=all")}   # NVIDIA runtime / CDI


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def start_server(builder: str, tag: str, engine_args, port: int, log, *, gpus: bool = False,
                 mounts: Sequence[tuple[Path, str]] = (), env: Sequence[tuple[str, str]] = (), command: bool = False):
    """Start the image's server (engine_args: its entrypoint) reachable on 127.0.0.1:port, its output to log;
    ``gpus``: with this machine's NVIDIA GPUs (docker, podman); ``mounts``: (host path, container path) bind mounts,
    read-only; ``env``: variables set in the container; ``command``: docker/podman run engine_args instead of the
    image's own ENTRYPOINT (an image that has none, e.g. a base image). Returns (process, args, stop). stop() ends
    the whole process group and removes the container."""
    volumes = [x for src, dst in mounts for x in ("-v", f"{src}:{dst}:ro")]
    env = [*env, *_thread_limits(dict(env))]
    envs = [x for k, v in env for x in ("--env", f"{k}={v}")]
    if builder == "buildah":  # no port mapping: the server shares the host network, so it listens on port
        args = [a if a != str(PORT) else str(port) for a in engine_args]
        envs += ["--env", f"FORGE_PORT={port}"]   # a weights-free serving image's entrypoint moves the engine there
        ctr = buildah("from", "--pull=never", tag).stdout.strip().splitlines()[-1]
        server = subprocess.Popen(["buildah", *storage_flags(), "run", "--isolation", "chroot", *volumes, *envs, ctr,
                                   "--", *args],
                                  stdout=log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)

        def stop() -> None:
            _stop_group(server)   # buildah run leaves the server behind: stop the whole group
            buildah("rm", ctr, check=False)
        return server, args, stop
    name = f"forge-smoke-{uuid.uuid4().hex[:12]}"
    entry = ["--entrypoint", engine_args[0], tag, *engine_args[1:]] if command else [tag]
    server = subprocess.Popen([builder, "run", "--rm", "--name", name, *(GPU_FLAGS[builder] if gpus else ()),
                               *volumes, *envs, "-p", f"127.0.0.1:{port}:{PORT}", *entry],
                              stdout=log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)

    def stop() -> None:
        subprocess.run([builder, "rm", "-f", name], capture_output=True, env=clean_env())
        _stop_group(server)
    return server, list(engine_args), stop


def _thread_limits(given: dict) -> list[tuple[str, str]]:
    """This process's thread limits (OMP_NUM_THREADS, MKL_NUM_THREADS), set in the container too unless given: a
    server started beside other work (a CI runner, parallel test workers) keeps to the cores it was given instead
    of spinning one OpenMP thread per host core, which on a busy 2-core machine made each forward pass 3-9x slower."""
    return [(k, v) for k in THREAD_VARS if (v := fenv.get(k)) and k not in given]


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
