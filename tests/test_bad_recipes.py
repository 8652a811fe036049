"""Every bad recipe gives a located, actionable message, exit 2, no traceback, and runs nothing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import forge_cli

SCENARIOS = Path(__file__).parent / "bad_recipes"


def _materialize(scenario: Path, tmp_path: Path) -> Path:
    work = tmp_path / scenario.name
    shutil.copytree(scenario, work)
    for fixture in sorted(work.rglob("*.fixture")):  # weight-named files (corrupt on purpose) are not kept in git
        fixture.rename(fixture.with_suffix(""))
    files = work / "files.txt"
    if files.exists():  # fixtures that must not live in git (pickle-named files)
        for line in files.read_text().splitlines():
            rel, _, content = line.partition("=")
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(content)
    links = work / "links.txt"
    if links.exists():  # symlinks (a loop, a dangling link) made here: git and tools walking the repo stay clear of them
        for line in links.read_text().splitlines():
            rel, _, target = line.partition("=")
            (work / rel).symlink_to(target)
    return work


@pytest.mark.parametrize("scenario", sorted(p.name for p in SCENARIOS.iterdir()), ids=str)
@pytest.mark.parametrize("command", ["validate", "build"])
def test_bad_recipe(scenario, command, tmp_path):
    work = _materialize(SCENARIOS / scenario, tmp_path)
    extra = (work / "args.txt").read_text().split() if (work / "args.txt").exists() else []
    cache = tmp_path / "cache"
    proc = forge_cli(command, "recipe.yaml", *extra, cache=cache, cwd=work)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for expected in (work / "expected.txt").read_text().splitlines():
        assert expected in proc.stderr, f"missing {expected!r} in:\n{proc.stderr}"
    # nothing executed: no object constructed from a tag, no step output in the cache
    assert not (work / "pwned").exists()
    assert not (cache / "steps").exists() or not any((cache / "steps").iterdir())


def test_all_problems_reported_together(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("apiVersion: forge/v1\nname: Bad Name\nmodel: {source: x, colour: red}\n"
                      "target: {gpu: L4, max_num_seqs: 0}\n")
    proc = forge_cli("validate", str(recipe), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{recipe}:2:1: name: String should match pattern" in proc.stderr
    assert f"{recipe}:3:20: model.colour: unknown key 'colour'" in proc.stderr
    assert f"{recipe}:4:19: target.max_num_seqs: Input should be greater than 0; found 0" in proc.stderr


def test_unpinned_hf_is_a_warning_outside_ci(tmp_path):
    (tmp_path / "r.yaml").write_text((SCENARIOS / "unpinned-hf-ci" / "recipe.yaml").read_text())
    proc = forge_cli("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "is a branch or tag, not a commit" in proc.stderr


def test_missing_recipe_file(tmp_path):
    proc = forge_cli("validate", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.yaml: recipe file not found" in proc.stderr
