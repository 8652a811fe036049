"""forge deploy: Kubernetes manifests for validated registry records, and their offline validation.

Public surface: ``generate`` (records -> objects, validated), ``write`` (a kustomize-ready directory,
atomically), ``check`` (re-validate a directory, e.g. after editing), ``Options``.

    gather.py     record + image config + recipe + model config -> Artifact (nothing re-derived)
    engines.py    engine facts by engine and version (the seam to the engine registry)
    sizing.py     probe budget, requests, concurrency, drain time: stated rules
    workload.py   Deployment, Service, PodDisruptionBudget
    model_mount.py  the model image at /models: an image volume, or init containers copying it (older clusters)
    autoscale.py  KEDA ScaledObject / HPA on the engine's queue, ServiceMonitor
    validate.py   schemas (Kubernetes, KEDA and Prometheus Operator CRDs) + cross-object checks
    kustomize.py  the directory: kustomization.yaml + one file per object

forge.image is imported for the model image's constants (MODELS_DIR) only.

May import: forge.core, forge.model, forge.oci, forge.gpu, forge.engines, forge.recipe, forge.registry, forge.image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.deploy.validate import KUBE_VERSION, Pinned, problems, require_version
from forge.core.errors import StepError, UsageError
from forge.deploy import autoscale, model_mount, workload
from forge.deploy.engines import serving
from forge.deploy.gather import gather, image_config
from forge.deploy.kustomize import read_dir, write_dir
from forge.deploy.labels import names
from forge.deploy.sizing import size, with_model_pull

__all__ = ["Options", "Generated", "generate", "write", "check", "KUBE_VERSION", "MODEL_MOUNTS"]

MODEL_MOUNTS = model_mount.MODES


@dataclass(frozen=True)
class Options:
    replicas: int = 1
    max_replicas: int | None = None     # default: 4 x replicas
    autoscale: str = "auto"             # auto | keda | hpa | none (auto: keda where the engine has a queue metric)
    namespace: str | None = None
    kube_version: str = KUBE_VERSION
    recipe: Path | None = None          # the recipe file, when it is not where the record says
    accept_proxy_eval: bool = False     # also a proxy-validated record (its gate ran on another engine/device)
    model_mount: str = "auto"           # auto | image-volume | copy: how a model image reaches /models (model_mount.py)


@dataclass(frozen=True)
class Generated:
    objects: tuple[dict, ...]
    notes: tuple[str, ...]              # what the user must know (e.g. the image was never pushed)
    namespace: str | None = None


def generate(reg, records: list, opts: Options = Options()) -> Generated:
    """The objects for each record (one workload per record: variants each get theirs), validated."""
    require_version(opts.kube_version)
    if opts.replicas < 1:
        raise UsageError(f"--replicas {opts.replicas}: at least 1", hint="Scale to zero is not offered: a replica takes "
                         "minutes to load its weights, so the first request would wait that long.")
    max_replicas = opts.max_replicas or 4 * opts.replicas
    if max_replicas < opts.replicas:
        raise UsageError(f"--max-replicas {max_replicas} is below --replicas {opts.replicas}")
    model_mount.choose(opts.model_mount, opts.kube_version)   # a bad --model-mount is refused before anything is read
    objects, notes, images = [], [], {}
    for rec in records:
        art = gather(reg, rec, opts.recipe if len(records) == 1 else None, accept_proxy_eval=opts.accept_proxy_eval)
        srv = serving(rec.engine, rec.engine_version)
        how = autoscale.choose(opts.autoscale, srv)
        sz = size(art, srv)
        n = names(art, variant=len(records) > 1)
        if any(o["metadata"]["name"] == n.name for o in objects):
            raise UsageError(f"two records would both be deployed as {n.name}",
                             hint="Deploy one record per GPU (variants differ by their target GPU).")
        mount = None
        if art.model_image is not None:
            mount_how, note = model_mount.choose(opts.model_mount, opts.kube_version)
            mount = model_mount.mount(mount_how, art.model_image, art.image, art.weights_layer_bytes, art.user)
            sz = with_model_pull(sz, art.weights_layer_bytes, mount.copy_bytes)
            if note and note not in notes:
                notes.append(note)
        elif opts.model_mount != "auto":
            raise UsageError(f"--model-mount {opts.model_mount}: {rec.name} {rec.short()} has its weights in its serving "
                             "image (container.weights: baked): there is no model image to mount",
                             hint="Leave --model-mount out, or deploy a record built with container.weights: image.")
        images[rec.id] = Pinned(rec.image_digest, art.command, art.args,
                                rec.model_image_digest if rec.weights == "image" else None)
        prestop = int(opts.kube_version.split(".")[1]) >= 30    # the preStop sleep action
        objects += [workload.deployment(art, srv, sz, n, opts.replicas, opts.namespace, prestop, mount),
                    workload.service(art, n, opts.namespace),
                    workload.pod_disruption_budget(n, opts.namespace)]
        if how == "keda":
            objects.append(autoscale.scaled_object(art, srv, sz, n, opts.replicas, max_replicas, opts.namespace))
        elif how == "hpa":
            objects.append(autoscale.hpa(srv, sz, n, opts.replicas, max_replicas, opts.namespace))
        if srv.metrics_path:
            objects.append(autoscale.service_monitor(srv, n, opts.namespace))
        if not art.pushed:
            notes.append(f"{rec.name} {rec.short()} was never pushed to an OCI registry: its image is named "
                         f"{art.image.split('@')[0]}; push it (forge build --publish-to oci://HOST/REPO) or point the "
                         f"manifests at your copy: kustomize edit set image {art.image.split('@')[0]}=HOST/REPO"
                         + (" (and edit the model image volume's reference: kustomize rewrites container images only)"
                            if mount is not None and mount.how == "image-volume" else ""))
        if how == "none" and srv.queue is None and opts.autoscale == "auto":
            notes.append(f"{rec.name}: the {srv.engine} engine exposes no queue metric: no autoscaler, "
                         f"{opts.replicas} replica(s)")

    def image_of(rid: str):
        return images[rid]

    if found := problems(objects, image_of, opts.kube_version):
        raise StepError("forge generated manifests that do not validate (a bug in forge): " + "; ".join(found))
    return Generated(tuple(objects), tuple(notes), opts.namespace)


def write(generated: Generated, out: Path) -> list[Path]:
    return write_dir(list(generated.objects), out, generated.namespace)


def check(out: Path, reg, kube_version: str = KUBE_VERSION) -> tuple[int, list[str]]:
    """(number of objects, every problem) of a kustomize directory forge wrote, perhaps edited since."""
    objects = read_dir(out)

    def image_of(rid: str):
        rec = reg.resolve(rid)
        if rec.image_digest is None:
            raise UsageError(f"record {rid[:12]} has no image")
        cfg = image_config(reg, rec.image_digest).get("config") or {}
        return Pinned(rec.image_digest, tuple(cfg.get("Entrypoint") or ()), tuple(cfg.get("Cmd") or ()),
                      rec.model_image_digest if rec.weights == "image" else None)

    return len(objects), problems(objects, image_of, kube_version)
