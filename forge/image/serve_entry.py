"""forge's entrypoint in a weights-free serving image (``container.weights: image``). Not imported by forge: the
package step copies this file into the serving image, where the image's own Python runs it (standard library only).

The serving image holds the engine and this file, nothing of any model; the model is mounted read-only at
``$FORGE_MODEL_DIR`` (``/models``): the model image, as a Kubernetes image volume, a modelcar's shared directory, or
the bind mount forge's smoke test makes. The model image's ``.forge/serve.json`` says how the engine serves it:

    {"engine": "cpu", "argv": [...], "port": 8000, "served_name": "...", "env": {...}, "files": {...}, "links": {...}}

This file checks that it names this image's engine (``$FORGE_ENGINE``) and executable (``$FORGE_ENGINE_EXE``), sets
the env it names (``HF_*`` and ``TRANSFORMERS_*`` only), writes the engine's runtime files and links (under /tmp
only: the root filesystem is read-only in a pod), and replaces itself with the engine. ``$FORGE_PORT`` (set by
forge's smoke test, which shares the host network) moves the server to another port. Anything wrong is one line on
stderr and exit 78 (EX_CONFIG), before the engine starts.
"""
import json
import os
import sys

SERVE_FILE = os.path.join(".forge", "serve.json")
ENV_PREFIXES = ("HF_", "TRANSFORMERS_")
RUNTIME_ROOT = "/tmp/"


def fail(message):
    sys.stderr.write("forge entrypoint: " + message + "\n")
    sys.exit(78)


def _under_tmp(path):
    real = os.path.realpath(os.path.dirname(path)) + "/"
    if not os.path.isabs(path) or not real.startswith(RUNTIME_ROOT):
        fail("%s: a model image may only ask for runtime files under %s" % (path, RUNTIME_ROOT))
    return path


def read_spec(models):
    path = os.path.join(models, SERVE_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        fail("no model at %s (%s: %s): mount the model image there read-only (a Kubernetes image volume, or "
             "the modelcar fallback forge deploy writes)" % (models, path, e.strerror))
    except ValueError as e:
        fail("%s is not JSON (%s): the model image was not written by forge" % (path, e))
    if not isinstance(spec, dict):
        fail("%s is not a JSON object" % path)
    return spec


def command(spec, engine, exe, port):
    """The engine's argv from the spec, checked against this image; the port moved when asked."""
    if spec.get("engine") != engine:
        fail("the model at %s is packaged for the %r engine; this serving image runs %r"
             % (os.environ.get("FORGE_MODEL_DIR", "/models"), spec.get("engine"), engine))
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        fail("serve.json has no argv (a list of strings)")
    if argv[0] != exe:
        fail("serve.json runs %r; this serving image runs only %r" % (argv[0], exe))
    if port:
        argv = [port if a == str(spec.get("port")) else a for a in argv]
    return argv


def prepare(spec):
    env = spec.get("env") or {}
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIXES) or not isinstance(value, str):
            fail("serve.json sets %s: a model image may set only %s variables (strings)" % (key, "/".join(ENV_PREFIXES)))
        os.environ[key] = value
    for path, text in sorted((spec.get("files") or {}).items()):
        os.makedirs(os.path.dirname(_under_tmp(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    for path, target in sorted((spec.get("links") or {}).items()):
        os.makedirs(os.path.dirname(_under_tmp(path)), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)


def main(args):
    models = os.environ.get("FORGE_MODEL_DIR", "/models")
    spec = read_spec(models)
    argv = command(spec, os.environ.get("FORGE_ENGINE"), os.environ.get("FORGE_ENGINE_EXE"),
                   os.environ.get("FORGE_PORT"))
    prepare(spec)
    sys.stdout.flush()
    os.execvp(argv[0], argv + list(args))


if __name__ == "__main__":
    main(sys.argv[1:])
