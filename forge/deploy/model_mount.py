"""How a pod gets the model image's files at /models (records built with ``container.weights: image``).

Two ways, chosen by ``--model-mount`` and the cluster's Kubernetes version (``choose``):

- **image-volume** (Kubernetes >= 1.35, where image volumes are on by default; 1.33-1.34 only when the cluster runs
  with the ``ImageVolume`` feature gate): the kubelet pulls the model image and mounts it read-only at /models
  (``volumes: - image: {reference: REPO@sha256:…, pullPolicy: IfNotPresent}``; KEP-4639). Nothing is copied: the
  node stores the shards once, as image layers shared by every pod and model that names them, and the server
  starts reading as soon as the pod starts. The node's runtime must mount image volumes (CRI-O >= 1.31, containerd
  >= 2.1); one that does not can mount an empty directory without an error, so an init container from the serving
  image (``model-check``) fails the pod, saying so, when /models has no config.json.
- **copy** (every version; the default below 1.35): the model image has no shell and no libraries, so it cannot
  run a copy of its own, and a sidecar sharing the process namespace (KServe's modelcar: the server reads
  ``/proc/<pid>/root/models``) would need a process that never exits inside it, and ties the server to that
  process's life. Instead, two init containers over emptyDirs:

    1. ``forge-tools`` (the serving image, which has a shell): copies its own ``cp``, every library ``ldd`` names
       for it, and the dynamic loader (as ``ld.so``) into the ``forge-tools`` emptyDir;
    2. ``model-copy`` (the model image): runs ``/forge-tools/ld.so --library-path /forge-tools /forge-tools/cp -R
       /models/. /forge-model/``. The loader is self-contained (it needs no interpreter), so it runs ``cp`` in an
       image that has no libc; the files land in the ``model`` emptyDir.

  Init containers run in order, each to completion, before the server starts, so the server never sees a half
  copy; a failed copy fails the pod (and is retried) instead of serving. The server mounts ``model`` read-only at
  /models. The cost: node disk for the copy (the emptyDir's sizeLimit, requested as ephemeral-storage so the
  scheduler picks a node with room) and its time, which the rollout's progress deadline budgets
  (``forge.deploy.sizing``). The serving image must have /bin/sh, cp and ldd (every Debian/Ubuntu-based base has).

The reference is the model image's repository (the serving image's, tagged ``<tag>-model``) pinned by digest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from forge.core.errors import UsageError
from forge.image.model_image import MODELS_DIR

__all__ = ["MODES", "ModelMount", "choose", "mount", "kube_minor", "TOOLS", "COPY_TO", "MODEL_VOLUME"]

MODES = ("auto", "image-volume", "copy")
BETA, ON_BY_DEFAULT = 33, 35          # Kubernetes 1.33: beta behind the ImageVolume gate; 1.35: on by default
MODEL_VOLUME = "model"
TOOLS_VOLUME = "forge-tools"
TOOLS = "/forge-tools"                # the copy binary, its libraries and the loader, from the serving image
COPY_TO = "/forge-model"              # where model-copy writes (its own /models is the model image's)
RUNTIMES = "CRI-O >= 1.31 or containerd >= 2.1"
GIB = 1 << 30

# forge-tools: `cp`, the libraries it links and the dynamic loader, so that cp runs in an image without libc.
# ldd prints "lib => /path (addr)" per library and "/path/to/ld-linux… (addr)" for the loader; a library it cannot
# find ("=> not found") makes `cp -L not` fail, and so the pod: nothing half-copied ever serves.
TOOLS_SCRIPT = (f'set -eu; cp -L /bin/cp {TOOLS}/cp; ldd /bin/cp | while read -r lib arrow path rest; do '
                f'if [ "$arrow" = "=>" ]; then cp -L "$path" {TOOLS}/; '
                f'else case "$lib" in /*) cp -L "$lib" {TOOLS}/ld.so;; esac; fi; done; '
                f'{TOOLS}/ld.so --library-path {TOOLS} {TOOLS}/cp --version >/dev/null')
COPY_COMMAND = (f"{TOOLS}/ld.so", "--library-path", TOOLS, f"{TOOLS}/cp", "-R", f"{MODELS_DIR}/.", f"{COPY_TO}/")
CHECK_SCRIPT = (f"test -s {MODELS_DIR}/config.json || {{ echo 'forge: the model image volume at {MODELS_DIR} is "
                f"empty: the node runtime does not mount image volumes ({RUNTIMES} do); redeploy with "
                f"forge deploy --model-mount copy' >&2; exit 1; }}")


@dataclass(frozen=True)
class ModelMount:
    how: str                          # image-volume | copy
    volumes: tuple[dict, ...]
    init_containers: tuple[dict, ...]
    server_mount: dict                # the server container's volumeMount at /models
    copy_bytes: int                   # bytes copied onto the node before the server starts (0: mounted)
    ephemeral_storage: str | None     # node disk the copy needs (the server container requests it)


def kube_minor(kube_version: str) -> int:
    major, _, minor = kube_version.partition(".")
    return int(minor.split(".")[0]) if major == "1" else 99


def choose(mode: str, kube_version: str) -> tuple[str, str | None]:
    """(how the model is mounted, a note for the user or None) for ``--model-mount mode`` on ``kube_version``."""
    if mode not in MODES:
        raise UsageError(f"--model-mount {mode}: not a way to mount the model", hint=f"One of {', '.join(MODES)}.")
    minor = kube_minor(kube_version)
    if mode == "copy":
        return "copy", None
    if minor >= ON_BY_DEFAULT:
        return "image-volume", (f"the model is an image volume: the nodes' runtime must mount image volumes ({RUNTIMES})"
                                f"; where it does not, the model-check init container fails the pod and says so")
    if mode == "auto":
        gate = ("; if the cluster runs with the ImageVolume feature gate on (kube-apiserver and every kubelet), "
                "--model-mount image-volume mounts it without a copy" if minor >= BETA else "")
        return "copy", (f"Kubernetes {kube_version}: image volumes are not on by default before 1.35, so the model is "
                        f"copied from its image into an emptyDir by init containers{gate}")
    if minor < BETA:
        raise UsageError(f"--model-mount image-volume on Kubernetes {kube_version}: image volumes are beta from 1.33 "
                         "(alpha before, with another API behaviour)",
                         hint="Use --model-mount copy (init containers copy the model into an emptyDir), or give "
                              "--kube-version of a cluster at 1.33 or later.")
    return "image-volume", (f"Kubernetes {kube_version}: image volumes are beta and OFF by default: the cluster must "
                            "run with --feature-gates=ImageVolume=true on kube-apiserver and on every kubelet (without "
                            f"it the API server drops the volume's image source and refuses the Deployment), and the "
                            f"nodes' runtime must mount them ({RUNTIMES})")


def _size(nbytes: int) -> str:
    return f"{max(1, math.ceil(nbytes * 1.05 / GIB))}Gi"   # 5 %: filesystem blocks and the tar headers' slack


def mount(how: str, model_ref: str, serving_image: str, model_bytes: int, user: tuple[int, int]) -> ModelMount:
    """The pod's volumes and init containers for the model image ``model_ref`` (REPO@sha256:…)."""
    uid, gid = user

    def security() -> dict:   # a fresh one per container (one shared object would be a YAML anchor)
        return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}

    def small() -> dict:
        return {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "64Mi"}}

    server_mount = {"name": MODEL_VOLUME, "mountPath": MODELS_DIR, "readOnly": True}
    if how == "image-volume":
        check = {"name": "model-check", "image": serving_image, "imagePullPolicy": "IfNotPresent",
                 "command": ["/bin/sh", "-c", CHECK_SCRIPT], "resources": small(), "securityContext": security(),
                 "volumeMounts": [dict(server_mount)]}
        volume = {"name": MODEL_VOLUME, "image": {"reference": model_ref, "pullPolicy": "IfNotPresent"}}
        return ModelMount(how, (volume,), (check,), server_mount, 0, None)
    size = _size(model_bytes)
    tools = {"name": "forge-tools", "image": serving_image, "imagePullPolicy": "IfNotPresent",
             "command": ["/bin/sh", "-c", TOOLS_SCRIPT], "resources": small(), "securityContext": security(),
             "volumeMounts": [{"name": TOOLS_VOLUME, "mountPath": TOOLS}]}
    copy = {"name": "model-copy", "image": model_ref, "imagePullPolicy": "IfNotPresent", "command": list(COPY_COMMAND),
            # cp holds little, but what it writes passes through the page cache charged to this container
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
            "securityContext": security(),
            "volumeMounts": [{"name": TOOLS_VOLUME, "mountPath": TOOLS, "readOnly": True},
                             {"name": MODEL_VOLUME, "mountPath": COPY_TO}]}
    volumes = ({"name": MODEL_VOLUME, "emptyDir": {"sizeLimit": size}},
               {"name": TOOLS_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}})
    return ModelMount(how, volumes, (tools, copy), server_mount, model_bytes, size)
