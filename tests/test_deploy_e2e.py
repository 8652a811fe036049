"""The CPU demo's manifests, run here: the demo image started the way its Deployment says (same command,
user, env, writable emptyDirs), the routes of its startup, readiness and liveness probes answer 200
within the startup budget, and the official openai client is served by it (model list, chat, streaming
chat). No cluster here: buildah runs the container (host network, so the command's
port is swapped for a free one, as the package step's smoke test does)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import REPO, gate_verdict
from test_deploy import _result

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("demo")]   # one worker builds the demo
DEMO = REPO / "recipes" / "smollm2-135m-demo.yaml"


@pytest.fixture(scope="module")
def demo_image(demo_build):
    """The demo's image as `forge build` made it (shared with the other e2e tests)."""
    steps = {name: (out, demo_build["digests"][name]) for name, out in demo_build["steps"].items()}
    return {"recipe": demo_build["recipe"], "steps": steps, "env": demo_build["env"]}


def _validated(demo_image, reg, tmp_path):
    """A validated record of the real demo image (the gate and scan recorded as passed, as on a machine with
    an eval run and Trivy)."""
    from conftest import resolved
    from forge.registry import publish

    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "verdict.json").write_text(gate_verdict(True))
    (tmp_path / "scan").mkdir()
    facts = {"status": "scanned", "passed": True, "summary": "0 findings"}
    (tmp_path / "scan" / "verdict.json").write_text(json.dumps(facts))
    (tmp_path / "scan" / "trivy-report.json").write_text('{"SchemaVersion": 2, "Results": []}')
    steps = demo_image["steps"]
    results = {name: _result(out, {}, digest) for name, (out, digest) in steps.items()}
    results["gate"] = _result(tmp_path / "gate", {"passed": True, "failed": []}, "sha256:" + "22" * 32)
    results["scan"] = _result(tmp_path / "scan", facts, "sha256:" + "44" * 32)
    return publish(resolved(demo_image["recipe"]), results, registry=reg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except OSError:
        return 0


def test_demo_image_runs_as_its_deployment_says_and_its_probes_answer(demo_image, tmp_path, monkeypatch):
    from forge import deploy
    from forge.deploy.kustomize import read_dir
    from forge.registry import LocalRegistry
    from forge.image.builders import buildah

    monkeypatch.setenv("FORGE_BUILDAH_ROOT", demo_image["env"]["FORGE_BUILDAH_ROOT"])
    reg = LocalRegistry(tmp_path / "registry")
    rec = _validated(demo_image, reg, tmp_path)
    out = tmp_path / "manifests"
    deploy.write(deploy.generate(reg, [rec]), out)
    assert deploy.check(out, reg) == (3, [])
    d = next(o for o in read_dir(out) if o["kind"] == "Deployment")
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    port = _free_port()
    command = [str(port) if a == str(c["ports"][0]["containerPort"]) else a for a in c["command"] + c.get("args", [])]
    sc = c["securityContext"]
    mounts = [x for m in c["volumeMounts"] for x in ("--mount", f"type=tmpfs,destination={m['mountPath']}")]
    envs = [x for e in c.get("env", []) for x in ("--env", f"{e['name']}={e['value']}")]

    image = json.loads((demo_image["steps"]["package"][0] / "image.json").read_text())
    from forge.image.builders import load_image, storage_flags

    load_image("buildah", demo_image["steps"]["package"][0] / "oci", image["oci_ref"], image["tag"])  # the layout is the artifact
    ctr = buildah("from", "--pull=never", image["tag"]).stdout.strip().splitlines()[-1]
    argv = ["buildah", *storage_flags(), "run", "--isolation", "chroot", "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}",
            *mounts, *envs, ctr, "--", *command]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        startup = c["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        t0 = time.monotonic()
        while _get(port, startup["httpGet"]["path"]) != 200:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() - t0 < budget, f"no answer on {startup['httpGet']['path']} within {budget}s"
            time.sleep(2)
        started = time.monotonic() - t0
        for probe in ("readinessProbe", "livenessProbe"):
            assert _get(port, c[probe]["httpGet"]["path"]) == 200, probe
        # the server runs as the Deployment's user, not root
        rows = [line.split(None, 3) for line in subprocess.run(["ps", "-eo", "pid=,pgid=,uid=,args="], capture_output=True,
                                                               text=True).stdout.splitlines()]
        served = [r for r in rows if len(r) == 4 and r[1] == str(server.pid) and " serve " in f" {r[3]} "
                  and not r[3].startswith("buildah")]
        assert served and {r[2] for r in served} == {str(sc["runAsUser"])}, served
        print(f"startup {started:.1f}s of a {budget}s budget")
        _openai_client_is_served(port)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        buildah("rm", ctr, check=False)
    assert server.poll() is not None   # the whole process group is gone


def _openai_client_is_served(port: int) -> None:
    """The official openai client against the running image: the model list names the served model, chat and
    streaming chat answer by that id."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    models = [m.id for m in client.models.list()]
    assert models == ["smollm2-135m-demo"], models
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=models[0], messages=question, max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    stream = client.chat.completions.create(model=models[0], messages=question, max_tokens=24, temperature=0,
                                            stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 1 and "Paris" in "".join(chunks)
