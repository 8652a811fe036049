"""Environment variables: read only through forge/core/options.py, every one declared there and documented in the README."""
from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO

from forge.core import options as env

FORGE = REPO / "forge"


def _sources():
    for path in sorted(FORGE.rglob("*.py")):
        yield path, path.read_text()


def test_no_module_but_env_reads_the_environment():
    offenders = []
    for path, text in _sources():
        if path == FORGE / "core" / "options.py":
            continue
        for node in ast.walk(ast.parse(text)):
            # os.environ / os.getenv / os.putenv, or `from os import environ, getenv`
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    {a.name for a in node.names} & {"environ", "getenv", "environb"}:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], "read environment variables through forge.core.options (declare them there):\n" + "\n".join(offenders)


def _reads(tree) -> list[tuple[int, str]]:
    """(line, NAME) of every ``get("NAME")`` / ``flag("NAME")`` call, bare or as an attribute of any module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.args[0].value):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("get", "flag") and (isinstance(func, ast.Name) or isinstance(func.value, ast.Name)):
                out.append((node.lineno, node.args[0].value))
    return out


def test_the_environment_is_read_in_the_options_module_only():
    """Options are read from the environment in one place and passed down: outside forge/core/options.py there is
    no ``env.get("NAME")`` (the typed ``Options`` fields are what modules read)."""
    outside = [f"{path.relative_to(REPO)}:{line}: {name}" for path, text in _sources()
               if path != FORGE / "core" / "options.py" for line, name in _reads(ast.parse(text))
               if name in env.VARS]
    assert outside == [], "read these through forge.core.options.current() instead:\n" + "\n".join(outside)


def test_every_name_forge_asks_for_is_declared():
    asked = {name for _, name in _reads(ast.parse((FORGE / "core" / "options.py").read_text()))}
    assert asked, "the scan found no get calls in forge/core/options.py: it is broken"
    assert asked - set(env.VARS) == set()
    # typer options read these through envvar= (the forge/cli/ package's modules): declared as well
    envvars = {name for _, text in _sources() for name in re.findall(r'envvar="([A-Z_]+)"', text)}
    assert envvars, "the scan found no envvar= options: it is broken"
    assert envvars - set(env.VARS) == set()


def test_readme_documents_exactly_the_declared_variables():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", section, flags=re.M)
    assert sorted(documented) == sorted(env.VARS), "README's environment table and forge/core/options.py differ"


def test_undeclared_name_is_a_bug_and_defaults_apply(monkeypatch):
    with pytest.raises(KeyError):
        env.get("FORGE_NO_SUCH_VARIABLE")
    monkeypatch.delenv("FORGE_BUILDAH_STORAGE_DRIVER", raising=False)
    assert env.get("FORGE_BUILDAH_STORAGE_DRIVER") == "auto"
    monkeypatch.setenv("FORGE_DEBUG", "0")
    assert env.flag("FORGE_DEBUG") is False
    monkeypatch.setenv("FORGE_DEBUG", "1")
    assert env.flag("FORGE_DEBUG") is True


def test_quiet_libraries_keeps_a_users_own_setting(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    env.quiet_libraries()
    assert env.get("TQDM_DISABLE") == "0" and env.get("TRANSFORMERS_VERBOSITY") == "error"


def test_servers_started_from_images_keep_this_hosts_thread_limits(monkeypatch):
    """A server forge starts beside other work (smoke test, image eval) gets the host's OpenMP/MKL thread limits:
    with one thread per host core in each of several processes on a small machine, torch's spinning threads made
    forward passes 3-9x slower. A value the caller sets for the container wins; an unset limit is not invented."""
    from forge.image.builders import _thread_limits

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert _thread_limits({}) == [("OMP_NUM_THREADS", "1")]
    assert _thread_limits({"OMP_NUM_THREADS": "4"}) == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _thread_limits({}) == []
