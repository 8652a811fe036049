"""Recipe loading in named stages: parse (safe YAML with positions) → validate (schema) → complete
(checks against the world: files, model source, GPU catalog) → a frozen ``LoadedRecipe``.

Every problem is reported as ``file:line:col: key.path: what was found; what would be valid`` and
all problems are collected and raised together as one RecipeError (exit 2).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from forge.core.errors import RecipeError, UsageError
from forge.recipe.schema import API_VERSION, Recipe, VARIANT_SECTIONS
from forge.recipe.complete import complete

# A recipe is a few dozen nodes. Aliases that expand past this are an attack or a mistake.
MAX_EXPANDED_NODES = 10_000
MAX_RECIPE_BYTES = 1 << 20
_YAML_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {_YAML_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}

PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus what is needed to point back into its file."""

    path: Path
    recipe: Recipe
    positions: dict[PathKey, tuple[int, int]] = field(repr=False)
    digest: str
    ci: bool = False
    warnings: tuple[str, ...] = ()
    variant: str | None = None        # the recipe's variant this is (its overrides merged in), or None
    overrides: dict = field(default_factory=dict)   # programmatic overrides on top (e.g. a method: auto trial)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def where(self, *keys: str | int) -> str:
        """``file:line:col: key.path`` for a key path (the nearest known position when absent)."""
        return _located(self.path, self.positions, tuple(keys))

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


@lru_cache(maxsize=16)
def _parsed(path: str, text: str) -> tuple[dict, dict]:
    """The YAML's data and key positions, parsed once per process for the same text: a build loads its recipe once
    per variant and per question (has it variants? which?), and parsing is most of a load."""
    return _parse(Path(path), text)


def load_recipe(path: str | Path, *, ci: bool = False, variant: str | None = None,
                overrides: dict | None = None) -> LoadedRecipe:
    """Load and check a recipe. ``variant``: one of its ``variants:``, whose overrides are merged over the
    shared sections; ``overrides``: {section: {key: value}} merged on top (how ``method: auto`` builds a
    trial). The result is validated and completed as a whole recipe; ``digest`` stays the file's."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"], hint="Pass the path of a recipe YAML, e.g. recipes/smollm2-135m-demo.yaml")
    raw = path.read_bytes()
    overrides = dict(overrides or {})
    recipe, positions = _schema_stage(path, raw, variant, overrides)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    loaded = LoadedRecipe(path=path, recipe=recipe, positions=positions, digest=digest, ci=ci, variant=variant,
                          overrides=overrides)

    try:
        warnings = complete(loaded)
    except RecipeError as e:
        if variant is None and not overrides:
            raise
        what = f"variant {variant!r}" if variant is not None else f"overrides {overrides}"
        raise RecipeError([f"{p} (in {what})" for p in e.problems], hint=e.hint) from None
    return LoadedRecipe(path=loaded.path, recipe=recipe, positions=positions, digest=digest, ci=ci,
                        warnings=tuple(warnings), variant=variant, overrides=overrides)


# A quantize override that changes the method drops these method parameters of the shared section
# (bits: 4 of a shared GPTQ section means nothing to an fp8 variant); calibration, ignore, kv_cache stay.
_METHOD_PARAMS = ("bits", "group_size", "symmetric", "actorder", "fp8_scheme", "backend")


def load_sections(path: str | Path, raw: bytes, *, variant: str | None = None) -> Recipe:
    """The sections of a recipe given as bytes (``path`` only names it in messages), parsed, validated and the
    variant merged, but not checked against this machine: what a build elsewhere decided, as ``forge deploy``
    reads it from a record's recipe evidence (the model directory and data files it names need not exist here)."""
    return _schema_stage(Path(path), raw, variant, {})[0]


def _schema_stage(path: Path, raw: bytes, variant: str | None, overrides: dict) -> tuple[Recipe, dict]:
    """parse → validate → merge the variant and overrides → validate again: (recipe, key positions)."""
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{path}: recipe is {len(raw)} bytes; the limit is {MAX_RECIPE_BYTES}"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    data, positions = copy.deepcopy(_parsed(str(path), text))   # callers may merge into them
    recipe = _validate(path, data, positions)
    if variant is not None or overrides:
        data, positions = _merged(path, data, positions, recipe, variant, overrides)
        try:
            recipe = _validate(path, data, positions)
        except RecipeError as e:
            what = f"variant {variant!r}" if variant is not None else f"overrides {overrides}"
            raise RecipeError([f"{p} (in {what})" for p in e.problems], hint=e.hint) from None
    return recipe, positions


def _merged(path: Path, data: dict, positions: dict, recipe: Recipe, variant: str | None,
            overrides: dict) -> tuple[dict, dict]:
    """The recipe's data with a variant's overrides (and then ``overrides``) merged key by key into the
    shared sections; positions of overridden keys point at the variant's lines."""
    merged = copy.deepcopy(data)
    pos = dict(positions)

    def put(section: str, values: dict, src: PathKey | None) -> None:
        current = merged.get(section)
        current = dict(current) if isinstance(current, dict) else {}
        if section == "quantize" and "method" in values and values["method"] != current.get("method", "none"):
            for k in _METHOD_PARAMS:
                if k not in values:
                    current.pop(k, None)
        for k, v in values.items():
            current[k] = v
            if src is not None:
                for key, p in positions.items():
                    if key[:len(src) + 1] == src + (k,):
                        pos[(section,) + key[len(src):]] = p
        merged[section] = current

    if variant is not None:
        names = [v.name for v in recipe.variants]
        if variant not in names:
            raise UsageError(f"{path}: no variant named {variant!r}; "
                             + (f"its variants: {', '.join(names)}" if names else "the recipe declares no variants"),
                             hint="Pass one of the recipe's variant names, or leave --variant out to build them all.")
        i = names.index(variant)
        for section in VARIANT_SECTIONS:
            if values := data["variants"][i].get(section):
                put(section, values, ("variants", i, section))
    for section, values in overrides.items():
        put(section, dict(values), None)
    return merged, pos


# ---------------------------------------------------------------- parse


def _parse(path: Path, text: str) -> tuple[Any, dict[PathKey, tuple[int, int]]]:
    yaml = YAML(typ="safe", pure=True)
    try:
        root = yaml.compose(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise RecipeError([f"{path}:{line}:{col}: YAML syntax error: {problem}"],
                          hint="Fix the YAML syntax at that line (indentation, quotes, brackets).") from None
    except YAMLError as e:
        raise RecipeError([f"{path}: YAML error: {e}"]) from None
    if root is None:
        raise RecipeError([f"{path}:1:1: the recipe is empty"], hint=_EXAMPLE_HINT)

    problems: list[str] = []
    _check_tags(path, root, problems, set())
    if problems:
        raise RecipeError(problems, hint="Recipes are plain YAML: remove the tag; forge never constructs objects from YAML.")
    _check_expansion(path, root)

    positions: dict[PathKey, tuple[int, int]] = {}
    constructor = yaml.constructor
    data = _build(path, root, (), positions, constructor, problems)
    if problems:
        raise RecipeError(problems)
    if not isinstance(data, dict):
        raise RecipeError([f"{path}:1:1: a recipe is a mapping of keys (apiVersion, name, model, ...); found a {type(data).__name__}"],
                          hint=_EXAMPLE_HINT)
    return data, positions


_EXAMPLE_HINT = f"Start from recipes/smollm2-135m-demo.yaml; a recipe begins with `apiVersion: {API_VERSION}`."


def _pos(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_tags(path: Path, node: Node, problems: list[str], seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    tag = node.tag if isinstance(node.tag, str) else getattr(node.tag, "value", str(node.tag))
    if tag not in _ALLOWED_TAGS and not (tag == _YAML_CORE + "merge"):
        line, col = _pos(node)
        shown = tag.replace(_YAML_CORE, "!!")
        problems.append(f"{path}:{line}:{col}: YAML tag {shown} is not allowed (found it on this value)")
        return
    if isinstance(node, MappingNode):
        for k, v in node.value:
            _check_tags(path, k, problems, seen)
            _check_tags(path, v, problems, seen)
    elif isinstance(node, SequenceNode):
        for v in node.value:
            _check_tags(path, v, problems, seen)


def _check_expansion(path: Path, root: Node) -> None:
    """Compute the size of the document with every alias expanded, without expanding it."""
    sizes: dict[int, int] = {}

    def size(node: Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # cycle guard (recursive aliases)
        total = 1
        if isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, SequenceNode):
            total += sum(size(v) for v in node.value)
        sizes[id(node)] = total
        return total

    if size(root) <= MAX_EXPANDED_NODES:
        return
    # Point at the smallest value that alone exceeds the limit: that is where the bomb is.
    node, at = root, ()
    while True:
        if isinstance(node, MappingNode):
            children = [(getattr(k, "value", "?"), v) for k, v in node.value]
        elif isinstance(node, SequenceNode):
            children = list(enumerate(node.value))
        else:
            children = []
        big = [(k, c) for k, c in children if sizes.get(id(c), 0) > MAX_EXPANDED_NODES]
        if not big:
            break
        key, node = big[0]
        at = at + (key,)
    line, col = _pos(node)
    raise RecipeError(
        [f"{path}:{line}:{col}: {_dotted(at) or '<top>'}: YAML aliases expand to more than {MAX_EXPANDED_NODES} "
         f"values (found {size(root)}); refusing to load (alias bomb?)"],
        hint="Write the values out, or use fewer nested aliases (&anchor / *alias).")


def _build(path: Path, node: Node, at: PathKey, positions: dict, constructor, problems: list[str]) -> Any:
    if isinstance(node, ScalarNode):
        return constructor.construct_object(node, deep=True)
    if isinstance(node, SequenceNode):
        out = []
        for i, item in enumerate(node.value):
            positions[at + (i,)] = _pos(item)
            out.append(_build(path, item, at + (i,), positions, constructor, problems))
        return out
    if isinstance(node, MappingNode):
        out: dict = {}
        for k, v in node.value:
            line, col = _pos(k)
            if k.tag == _YAML_CORE + "merge" or (isinstance(k, ScalarNode) and k.value == "<<"):
                problems.append(f"{path}:{line}:{col}: {_dotted(at) or '<top>'}: YAML merge keys (<<) are not supported; write the keys out")
                continue
            if not isinstance(k, ScalarNode):
                problems.append(f"{path}:{line}:{col}: {_dotted(at) or '<top>'}: keys must be plain strings")
                continue
            key = str(constructor.construct_object(k, deep=True))
            if key in out:
                first = positions.get(at + (key,), (0, 0))[0]
                problems.append(f"{path}:{line}:{col}: {_dotted(at + (key,))}: duplicate key (first set on line {first}); keep one")
                continue
            positions[at + (key,)] = (line, col)
            out[key] = _build(path, v, at + (key,), positions, constructor, problems)
        return out
    return None


# ---------------------------------------------------------------- validate


def _validate(path: Path, data: dict, positions: dict) -> Recipe:
    if "apiVersion" not in data:
        raise RecipeError([f"{path}:1:1: apiVersion: required key is missing; add `apiVersion: {API_VERSION}` as the first line"])
    if data["apiVersion"] != API_VERSION:
        raise RecipeError([f"{_located(path, positions, ('apiVersion',))}: unsupported apiVersion {data['apiVersion']!r}; "
                           f"this forge reads {API_VERSION!r}"], hint="Upgrade forge, or set apiVersion: forge/v1.")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe(path, positions, data, err) for err in e.errors(include_url=False)]
        raise RecipeError(sorted(set(problems), key=_line_of), hint="See `forge schema` for every key and its type.") from None


def _line_of(problem: str) -> tuple[int, str]:
    parts = problem.split(":")
    try:
        return int(parts[1]), problem
    except (IndexError, ValueError):
        return 0, problem


def _describe(path: Path, positions: dict, data: dict, err: dict) -> str:
    loc = _data_path(data, err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        valid = _valid_keys(parent)
        guess = difflib.get_close_matches(str(key), valid, n=1)
        did = f" Did you mean {guess[0]!r}?" if guess else ""
        return (f"{_located(path, positions, loc)}: unknown key {key!r}.{did} "
                f"Valid keys here: {', '.join(valid)}")
    if kind == "missing":
        missing = tuple(err["loc"])[len(loc):] or loc[-1:]
        full = loc + tuple(x for x in missing if x not in loc)
        return f"{_located(path, positions, loc, shown=full)}: required key {str(full[-1])!r} is missing"
    found = _value_at(data, loc)
    msg = err["msg"].removeprefix("Value error, ")
    return f"{_located(path, positions, loc)}: {msg}; found {found!r}"


def _data_path(data: Any, loc: tuple) -> PathKey:
    """The longest prefix of a pydantic error location that exists in the data (drops union tags)."""
    out: list = []
    node = data
    for part in loc:
        if part == "apiVersion" or part == "api_version":
            part = "apiVersion"
        if isinstance(node, dict) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            out.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not out[-1:] == [part]:
            # a missing or extra key: keep it as the last element and stop
            out.append(part)
            break
        # else: a union member name such as 'int' or 'function-after[...]': skip it
    return tuple(out)


def _value_at(data: Any, loc: PathKey) -> Any:
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _model_fields_at(parent: PathKey) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in parent:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field_name = next((n for n, f in model.model_fields.items() if n == part or f.alias == part), None)
        if field_name is None:
            return None
        model = _find_model(model.model_fields[field_name].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _find_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _find_model(arg)
            if found is not None:
                return found
    return None


def _valid_keys(parent: PathKey) -> list[str]:
    model = _model_fields_at(parent)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _dotted(keys: PathKey) -> str:
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _located(path: Path, positions: dict, keys: PathKey, *, shown: PathKey | None = None) -> str:
    probe = tuple(keys)
    while probe and probe not in positions:
        probe = probe[:-1]
    line, col = positions.get(probe, (1, 1))
    return f"{path}:{line}:{col}: {_dotted(shown or keys) or '<top>'}"
