"""The smoke test of a built image, against its running server: /health, GET /v1/models, one chat completion, and
where the engine exports metrics that forge deploy scales on, GET of its metrics path holding those series.

``smoke_test`` serves the image with its builder (forge.image.builders) and runs ``check_server``, which speaks HTTP
only, so a test can point it at any server. ``serving`` is that same path held open: the eval step evaluates the
image through it (``eval.candidate: image``), after the same checks. A failure is a SmokeTestError (exit 6) whose message carries the HTTP
status, the response body and the tail of the server's log; the transcript and the log are kept.
"""
from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client.parser import text_string_to_metric_families

from forge.image.builders import free_port, load_image, start_server, unload_image
from forge.core.errors import SmokeTestError, UsageError
from forge.core.host import cpu_isa, isa_at_least, local_gpus
from forge.engines import get
from forge.gpu.catalog import gpus

if TYPE_CHECKING:
    from forge.image.containers import ImageSpec

__all__ = ["smoke_test", "check_server", "serving", "Served", "TRANSCRIPT", "SERVER_LOG", "SMOKE_QUESTION"]

TRANSCRIPT, SERVER_LOG = "smoke-test.json", "server.log"
SMOKE_QUESTION = "What is the capital of France?"


def _http(method: str, url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """(status, body text) of one request; an HTTP error status is an answer too. Connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def check_server(url: str, model: str, report, *, exited, keep: Path, timeout_s: float = 300,
                 context: dict | None = None, health_route: str = "/health", chat: bool = True,
                 metrics: tuple[str, tuple] | None = None) -> dict:
    """The smoke test proper, against a server at url whose output goes to keep/server.log: /health answers 200,
    GET /v1/models lists model, a chat completion by that id answers (``chat``: False when this image's smoke test
    already asked it), and ``metrics`` ((path, Serving.scaled_on's series)): each series with its labels is on
    the metrics path. exited() is the server's exit code (None while it runs). Any failure writes
    keep/smoke-test.json (status, body, log tail) and raises SmokeTestError."""
    t: dict = {**(context or {}), "url": url, "model": model, "question": SMOKE_QUESTION, "passed": False}

    def fail(stage: str, problem: str, status: int | None = None, body: str | None = None):
        tail = _log_tail(keep / SERVER_LOG)
        t["failure"] = {"stage": stage, "problem": problem, "status": status, "body": body, "log_tail": tail}
        (keep / TRANSCRIPT).write_text(json.dumps(t, indent=2) + "\n")
        shown = f"\n  response body: {body.strip()[:2000]}" if body and body.strip() else ""
        raise SmokeTestError(
            f"smoke test of {t.get('image', url)} failed at {stage}: {problem}{shown}\n"
            f"  server log, last lines ({keep / SERVER_LOG}):\n" + "\n".join(f"    {x}" for x in tail.splitlines())
            + f"\n  kept in {keep}/ ({TRANSCRIPT}, {SERVER_LOG})",
            hint="The image was built but does not serve as promised: read the server log above. "
                 "`container.smoke_test: false` in the recipe skips this check.")

    t0 = time.monotonic()
    report(f"smoke test: waiting for {health_route} on {url}")
    last = None
    while True:
        if (code := exited()) is not None:
            fail("start", f"the server exited with {code} before answering {health_route}")
        try:
            status, text = _http("GET", f"{url}{health_route}", timeout=2)
            if status == 200:
                break
            last = (status, text)
        except OSError:
            pass
        if time.monotonic() - t0 > timeout_s:
            fail(f"GET {health_route}", f"no 200 from {health_route} within {timeout_s:.0f} s"
                 + (f" (last answer: HTTP {last[0]})" if last else " (no answer)"), *(last or (None, None)))
        time.sleep(1)
    t["health_seconds"] = round(time.monotonic() - t0, 1)

    report("smoke test: GET /v1/models")
    status, text = _request_or_fail(fail, "GET /v1/models", "GET", f"{url}/v1/models")
    try:
        t["models"] = [m["id"] for m in json.loads(text)["data"]]
    except (ValueError, KeyError, TypeError):
        fail("GET /v1/models", "the answer is not an OpenAI model list", status, text)
    if model not in t["models"]:
        fail("GET /v1/models", f"the served model {model!r} is not listed (listed: {t['models']})", status, text)

    if not chat:
        t["passed"] = True
        return t
    report("smoke test: one chat completion")
    status, text = _request_or_fail(fail, "POST /v1/chat/completions", "POST", f"{url}/v1/chat/completions",
                                    {"model": model, "messages": [{"role": "user", "content": SMOKE_QUESTION}],
                                     "max_tokens": 24, "temperature": 0})
    try:
        reply = json.loads(text)
        answer = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        fail("POST /v1/chat/completions", "the answer is not an OpenAI chat completion", status, text)
    t.update(answer=answer, response=reply)
    if not (answer and answer.strip()):
        fail("POST /v1/chat/completions", f"the server answered {SMOKE_QUESTION!r} with nothing", status, text)
    if metrics and metrics[1]:
        t["metrics"] = _check_metrics(url, *metrics, report, fail)
    t["passed"] = True
    return t


def _check_metrics(url: str, path: str, wanted: tuple, report, fail) -> dict:
    """GET the engine's metrics path (after the chat, so per-model series exist) and find each series forge deploy
    scales on with its labels; what was found is returned for the transcript. A missing series, or an answer that
    is not Prometheus text, fails: the Deployment's autoscaling would query a series that is never there."""
    report(f"smoke test: GET {path} (the series forge deploy scales on)")
    status, text = _request_or_fail(fail, f"GET {path}", "GET", f"{url}{path}")
    try:
        samples = [(s.name, s.labels) for fam in text_string_to_metric_families(text) for s in fam.samples]
    except ValueError as e:
        fail(f"GET {path}", f"the answer is not Prometheus text format: {e}", status, text[:2000])
    found: dict[str, list[dict]] = {}
    for series, labels in wanted:
        found[series] = [lab for name, lab in samples if name == series]
        if not any(dict(labels).items() <= lab.items() for lab in found[series]):
            want = f"{series}{{{','.join(f'{k}={v!r}' for k, v in labels)}}}"
            seen = ", ".join(sorted({n for n, _ in samples if n.split(":")[0] == series.split(":")[0]})[:12]) or "none"
            fail(f"GET {path}", f"{want} is not exported (series of that prefix: {seen}); forge deploy's autoscaling "
                 "(KEDA ScaledObject, HPA) queries it", status, text[:2000])
    return {"path": path, "series": found}


def _request_or_fail(fail, stage: str, method: str, url: str, body: dict | None = None) -> tuple[int, str]:
    try:
        status, text = _http(method, url, body)
    except OSError as e:
        fail(stage, f"no answer: {e}")
    if status != 200:
        fail(stage, f"HTTP {status}", status, text)
    return status, text


# ------------------------------------------------------------------ an image's smoke test


def why_not_here(engine_name: str, gpu: str, builder: str, scheme: str | None = None) -> str | None:
    """Why an image of ``engine_name`` for ``gpu`` cannot be smoke-tested on this machine (None: it can). A GPU
    image runs where its GPU model is (nvidia-smi names it) and a builder can hand it the GPU (docker, podman). An
    engine's CPU build runs where the CPU has the target's ISA, and the checkpoint's ``scheme`` at speed."""
    engine = get(engine_name)
    target = gpus().get(gpu)
    if target is not None and target.is_cpu and engine.cpu_kernels:   # the engine's CPU build (vLLM's)
        here = cpu_isa()
        if target.cpu_isa and not isa_at_least(here, target.cpu_isa):
            return (f"not smoke-tested: target {gpu} runs on {target.cpu_isa.upper()}; this host's CPU has "
                    f"{(here or 'neither AVX2 nor AVX-512').upper()}")
        row = engine.cpu_kernels.get(scheme or "")
        slow = row.slow_here() if row is not None and row.slow_here is not None else None
        return f"not smoke-tested: {slow}" if slow else None
    if engine.smoke_test:
        return None
    if engine.cpu:
        return f"not smoke-tested: {engine.name} images cannot be smoke-tested here (its engine says so)"
    names = gpus()[gpu].smi if gpu in gpus() else ()
    if not any(g.name in names for g in local_gpus()):
        return f"not smoke-tested: no {gpu} here"
    if builder == "buildah":
        return (f"not smoke-tested: the {gpu} is here, but buildah cannot give a container a GPU "
                "(container.builder: podman with the NVIDIA CDI spec, or docker with the NVIDIA runtime)")
    return None


def smoke_test(tag: str, spec: "ImageSpec", report, *, keep: Path, builder: str = "buildah", timeout_s: float = 300,
               layout: tuple[Path, str] | None = None, mounts=(), skip: str | None = None) -> dict:
    """Serve from the image, check it (check_server: health route, /v1/models, one chat), stop everything.
    keep: where the server log goes, and where it stays with the transcript when the check fails (removed
    when it passes). layout: (OCI layout, ref) to load the image from into the builder's storage first; it is
    removed again afterwards (the layout is the artifact: no second copy of the weights stays behind).
    mounts: (host path, container path) read-only binds (a weights-free serving image's model image at /models).
    skip: why it cannot be served here (the caller's decision: the package step's memory check or
    ``why_not_here``), recorded instead of a verdict."""
    if skip is not None:   # never failed, never passed
        return {"passed": None, "skipped": skip, "answer": None, "health_seconds": None, "models": None}
    gpu_image = spec.base.cuda is not None   # runs here only because its GPU is here
    with serving(tag, spec.engine_args, spec.served_name, report, keep=keep, builder=builder, timeout_s=timeout_s,
                 layout=layout, health_route=spec.health_route, gpus=gpu_image, mounts=mounts,
                 metrics=scaled_on(spec)) as served:
        transcript = served.transcript
    shutil.rmtree(keep, ignore_errors=True)
    return transcript


def scaled_on(spec: "ImageSpec") -> tuple[str, tuple] | None:
    """(metrics path, series) of the image's engine at its base's version that forge deploy scales on; None for an
    engine that declares no deployment facts (a plugin's)."""
    try:
        srv = get(spec.base.engine).serving(spec.base.engine_version)
    except UsageError:
        return None
    return (srv.metrics_path, srv.scaled_on(spec.served_name)) if srv.metrics_path else None


@dataclass(frozen=True)
class Served:
    """An image's server while ``serving`` holds it up: where it answers, what its smoke check saw, whether it ran."""
    url: str                          # http://127.0.0.1:<port>
    transcript: dict                  # check_server's: health seconds, models listed, the one chat answer
    exited: Callable[[], int | None]  # the server's exit code (None while it runs)
    log: Path                         # its output


@contextmanager
def serving(tag: str, entrypoint, served_name: str, report, *, keep: Path, builder: str = "buildah",
            timeout_s: float = 300, layout: tuple[Path, str] | None = None, health_route: str = "/health",
            gpus: bool = False, mounts=(), env=(), command: bool = False, chat: bool = True,
            metrics: tuple[str, tuple] | None = None) -> Iterator[Served]:
    """Serve the image ``tag`` (loaded first from ``layout``, (OCI layout, ref), and unloaded afterwards), check it
    as the smoke test does (``check_server``), and yield it while it runs; then stop the whole process group.
    The smoke test and ``eval.candidate: image`` (forge.steps.evaluate) serve images through this one path.
    ``mounts``/``env``/``command``: forge.image.builders.start_server's; ``chat``/``metrics``: check_server's. A
    server that does not come up or does not answer raises SmokeTestError (exit 6) with the log's tail; ``keep``
    holds its log."""
    if layout is not None:
        report("loading the image into the builder's storage")
        load_image(builder, layout[0], layout[1], tag)
    try:
        keep.mkdir(parents=True, exist_ok=True)
        port = free_port()
        with open(keep / SERVER_LOG, "wb") as log:
            server, args, stop = start_server(builder, tag, entrypoint, port, log, gpus=gpus, mounts=mounts, env=env,
                                              command=command)
            try:
                url = f"http://127.0.0.1:{port}"
                transcript = check_server(url, served_name, report, exited=server.poll, keep=keep, timeout_s=timeout_s,
                                          context={"image": tag, "command": args}, health_route=health_route,
                                          chat=chat, metrics=metrics)
                yield Served(url, transcript, server.poll, keep / SERVER_LOG)
            finally:
                stop()
    finally:
        if layout is not None:
            unload_image(builder, tag)
