"""The 'complete' stage of loading: checks of a schema-valid recipe against the world.

The engine and backend names are registered (plugins included), files named by the recipe exist, the model
source is well-formed, pinned (a warning, an error under --ci) and safe, the target GPU is in the catalog, the
eval tasks load and the gate's rules fit them. Collects every problem, raises one RecipeError. What the recipe
implies (backend, format, base image, capability, fit) is the resolution stage's (forge.recipe.resolve).
"""
from __future__ import annotations

import difflib
from forge.gpu.catalog import gpus
from forge.core.errors import RecipeError
from forge.model.sources import (SOURCE_FORMS, GgufSource, HfSource, LocalDirSource, local_dir_problems,
                           parse_source)
from forge import backends, engines
from forge.core.plugins import UnknownName
from forge.evaluation.tasks import check_gate, load_tasks
from forge.model.calibration import parse_hf_dataset


def complete(loaded) -> list[str]:
    """``loaded``: the ``forge.recipe.load.LoadedRecipe`` being loaded (the loader calls this stage)."""
    r = loaded.recipe
    problems: list[str] = []
    warnings: list[str] = []

    for registry, keys in ((engines.REGISTRY, ("target", "engine")), (backends.REGISTRY, ("quantize", "backend"))):
        value = r.target.engine if keys[0] == "target" else r.quantize.backend
        if value == "auto" and keys[0] == "quantize":
            continue
        try:
            registry.check(value)
        except UnknownName as e:
            problems.append(f"{loaded.where(*keys)}: {e}")
    if problems:
        raise RecipeError(problems, hint="See `forge schema` for every key and its type.")

    catalog = gpus()
    if r.target.gpu not in catalog:
        guess = difflib.get_close_matches(r.target.gpu, list(catalog), n=1, cutoff=0.4)
        did = f" Did you mean {guess[0]!r}?" if guess else ""
        problems.append(f"{loaded.where('target', 'gpu')}: unknown GPU {r.target.gpu!r}.{did} "
                        f"Known: {', '.join(catalog)}")
    elif catalog[r.target.gpu].is_cpu:
        serves_on_cpu = lambda e: e.cpu or bool(e.cpu_kernels)   # noqa: E731
        if not serves_on_cpu(engines.get(r.target.engine)):
            on_cpu = [n for n in engines.names() if serves_on_cpu(engines.get(n))]
            problems.append(f"{loaded.where('target', 'engine')}: target.gpu {r.target.gpu} is a CPU; it needs an "
                            f"engine that serves on CPU ({', '.join(on_cpu)}); found {r.target.engine!r}")

    try:
        source = parse_source(r.model.source, loaded.base_dir)
    except ValueError as e:
        problems.append(f"{loaded.where('model', 'source')}: {e}. Valid forms: {', '.join(SOURCE_FORMS)}")
        source = None

    if isinstance(source, HfSource) and not source.pinned:
        msg = (f"{loaded.where('model', 'source')}: revision {source.revision!r} is a branch or tag, not a commit; "
               f"the build is not reproducible. Pin it: hf://{source.repo}@<40-hex commit sha>")
        (problems if loaded.ci else warnings).append(msg)
    elif isinstance(source, LocalDirSource):
        if not source.path.is_dir():
            problems.append(f"{loaded.where('model', 'source')}: directory {source.path} does not exist")
        else:
            problems.extend(f"{loaded.where('model', 'source')}: {p}" for p in local_dir_problems(
                source.path, allow_pickle=r.model.allow_pickle, trust_remote_code=r.model.trust_remote_code))
    elif isinstance(source, GgufSource) and not source.path.is_file():
        problems.append(f"{loaded.where('model', 'source')}: GGUF file {source.path} does not exist")

    cal = r.quantize.calibration
    hf_cal = parse_hf_dataset(cal.data) if cal is not None else None
    if hf_cal is not None and not hf_cal[2]:
        msg = (f"{loaded.where('quantize', 'calibration', 'data')}: dataset revision {hf_cal[1]!r} is not a commit; "
               f"pin it: hf://datasets/{hf_cal[0]}@<40-hex sha>")
        (problems if loaded.ci else warnings).append(msg)
    elif cal is not None and hf_cal is None and not loaded.resolve_path(cal.data).is_file():
        problems.append(f"{loaded.where('quantize', 'calibration', 'data')}: calibration file "
                        f"{loaded.resolve_path(cal.data)} does not exist")
    if r.scan.ignore_file is not None and not loaded.resolve_path(r.scan.ignore_file).is_file():
        problems.append(f"{loaded.where('scan', 'ignore_file')}: ignore file {loaded.resolve_path(r.scan.ignore_file)} "
                        "does not exist; create it or remove the key")

    if r.eval is not None and not problems:
        try:
            tasks = load_tasks(loaded)
        except RecipeError as e:
            problems.extend(e.problems)
        else:
            problems.extend(check_gate(loaded, tasks))
            if r.eval.candidate == "image":
                problems.extend(image_eval_problems(loaded, tasks))
            if not r.eval.gate and tasks:
                _no_gate_rules(loaded, tasks, problems if loaded.ci else warnings)

    if problems:
        raise RecipeError(problems)
    return warnings


def image_eval_problems(loaded, tasks) -> list[str]:
    """eval.candidate: image: forge must build an image, and its engine's server must answer every task's requests
    (``Engine.eval_api``: transformers serve generates but returns no prompt logprobs; vLLM does both)."""
    r = loaded.recipe
    where = loaded.where("eval", "candidate")
    if r.container is None:
        return [f"{where}: image: the candidate is evaluated through the built image, but the recipe has no container "
                "section; add one (e.g. `container: {base: cpu-python311}`) or use candidate: checkpoint"]
    try:
        engine = engines.get(r.target.engine)
    except UnknownName:
        return []   # reported above, with its "did you mean"
    api = getattr(engine, "eval_api", None)
    if api is None:
        return [f"{where}: image: the {engine.name} engine declares no way for lm-eval to evaluate through its server "
                "(its eval_api); use candidate: checkpoint"]
    problems = []
    if r.eval.backend != "auto":
        problems.append(f"{loaded.where('eval', 'backend')}: {r.eval.backend}: with candidate: image both sides are "
                        f"evaluated through the {engine.name} engine's server (lm-eval {api.model}), not an in-process "
                        "backend; remove eval.backend")
    for i, task in enumerate(tasks):
        if task.request_type not in api.requests:
            problems.append(f"{loaded.where('eval', 'tasks', i)}: {task.name} ({task.output_type}: "
                            f"{task.request_type} requests) cannot be evaluated through the {engine.name} image: "
                            f"{api.refuses or f'its server answers only {sorted(api.requests)}'}. Remove the task "
                            f"(tasks it can answer: {', '.join(sorted(api.requests))}) or use eval.candidate: checkpoint")
    return problems


def _no_gate_rules(loaded, tasks, into: list[str]) -> None:
    """An eval with tasks and no gate rules gates nothing: its artifact is recorded as ungated, never validated
    (a warning; an error under --ci, where a build exists to be validated). The message gives a rule to add."""
    task = tasks[0]
    metric, higher = next(iter(task.metrics.items()), ("acc", True))
    rule = "max_rel_increase: 0.10" if higher is False else "max_abs_drop: 0.05"
    into.append(f"{loaded.where('eval', 'gate')}: eval has tasks but no gate rules: nothing is gated, so the "
                "artifact is recorded as ungated and never validated. Add a rule, e.g. "
                f"`gate: [{{task: {task.name}, metric: {metric}, {rule}}}]`")
