"""Eval task packs: lm-eval task YAMLs over local data, and lm-eval's registered tasks.

A recipe names a task by path (``evals/tasks/heldout_ppl.yaml``, relative to the recipe) or by an
lm-eval registered name (``hellaswag``; its data must already be in the local HF datasets cache).
Local YAMLs are read safely and made self-contained before lm-eval sees them: ``data_files`` are
resolved relative to the YAML (lm-eval would resolve them against the working directory), and a
plain-string ``data_files`` becomes ``{<test_split>: path}`` (a plain string makes a split named
``train``, a classic lm-eval footgun).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from forge.core.errors import RecipeError

# Metric direction, for checking that a gate threshold fits its metric before any model is loaded.
LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "ter"})
HIGHER_IS_BETTER = frozenset({"acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "chrf", "rouge1", "rouge2",
                              "rougeL", "brier_score_neg", "acc_mutual_info"})
PERPLEXITY_FAMILY = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte"})
# lm-eval's output_type -> the request type a model answers for it (lm_eval.api.task: multiple choice is scored by
# the loglikelihood of each choice); an engine's server declares which request types it answers
REQUEST_OF_OUTPUT = {"generate_until": "generate_until", "multiple_choice": "loglikelihood",
                     "loglikelihood": "loglikelihood", "loglikelihood_rolling": "loglikelihood_rolling"}


@dataclass(frozen=True)
class TaskSpec:
    name: str                                  # the name lm-eval reports results under
    source: str                                # as written in the recipe
    config: dict | None = None                 # self-contained YAML config (None: registered task)
    files: dict[str, Path] = field(default_factory=dict)   # files whose digests enter the cache key
    metrics: dict[str, bool | None] = field(default_factory=dict)  # metric -> higher_is_better
    output_type: str = "generate_until"        # lm-eval's output_type (its default when a YAML names none)

    @property
    def request_type(self) -> str:
        """The lm-eval request type a model answers for this task (an unknown output_type is its own)."""
        return REQUEST_OF_OUTPUT.get(self.output_type, self.output_type)

    def lm_eval_task(self):
        import copy

        return copy.deepcopy(self.config) if self.config is not None else self.name  # specs are cached: never share


def _is_path(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or "/" in value


def load_task(value: str, base_dir: Path, where: str) -> TaskSpec:
    if not _is_path(value):
        return _registered(value, where)
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    if not path.is_file():
        raise RecipeError([f"{where}: task file {path} does not exist"],
                          hint="Name a task YAML relative to the recipe (e.g. ../evals/tasks/heldout_ppl.yaml) "
                               "or an lm-eval registered task.")
    st = path.stat()
    return _load_task_file(value, str(path), st.st_mtime_ns, st.st_size, where)


@lru_cache(maxsize=64)  # a build asks for the same task files several times (validate, keys of two steps)
def _load_task_file(value: str, path_str: str, _mtime_ns: int, _size: int, where: str) -> TaskSpec:
    path = Path(path_str)
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        cfg = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as e:
        raise RecipeError([f"{where}: {path}: cannot read the task YAML: {str(e).splitlines()[0]}"],
                          hint="forge reads task YAMLs safely: `!function` and other tags are not supported.") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise RecipeError([f"{where}: {path}: an lm-eval task YAML needs a `task:` name"])
    if "include" in cfg:
        raise RecipeError([f"{where}: {path}: `include:` is not supported; write the task out in one file"])
    files = {f"task:{cfg['task']}": path}
    kwargs = cfg.get("dataset_kwargs") or {}
    data_files = kwargs.get("data_files")
    if data_files is not None:
        if isinstance(data_files, str):
            data_files = {cfg.get("test_split", "test"): data_files}
        if not isinstance(data_files, dict):
            raise RecipeError([f"{where}: {path}: dataset_kwargs.data_files must map split names to files"])
        resolved = {}
        for split, rel in data_files.items():
            p = Path(rel) if Path(rel).is_absolute() else path.parent / rel
            if not p.is_file():
                raise RecipeError([f"{where}: {path}: data file for split {split!r} not found: {p}"])
            resolved[split] = str(p.resolve())
            files[f"data:{cfg['task']}:{split}"] = p
        cfg = {**cfg, "dataset_kwargs": {**kwargs, "data_files": resolved}}
    metrics = {}
    for m in cfg.get("metric_list") or []:
        if isinstance(m, dict) and "metric" in m:
            metrics[m["metric"]] = m.get("higher_is_better", direction(m["metric"]))
    return TaskSpec(name=cfg["task"], source=value, config=cfg, files=files, metrics=metrics,
                    output_type=str(cfg.get("output_type") or "generate_until"))


def task_manager(tasks: list[TaskSpec]):
    """lm-eval's TaskManager for ``tasks``: with its index of the built-in tasks only when one is named by its
    registered name. Building that index parses every YAML file lm-eval ships (about 20 s on a 2-core machine, for
    every eval step); a task file's config is complete without it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(t.config is None for t in tasks))


def _registered(name: str, where: str) -> TaskSpec:
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    if name not in tm.all_tasks:
        import difflib

        guess = difflib.get_close_matches(name, tm.all_tasks, n=3)
        raise RecipeError([f"{where}: unknown task {name!r}" + (f"; did you mean {', '.join(guess)}?" if guess else "")],
                          hint="Use a task YAML path (e.g. ../evals/tasks/capitals_mc.yaml) or an lm-eval task name.")
    cfg = tm._get_config(name) or {}
    metrics = {m["metric"]: m.get("higher_is_better", direction(m["metric"]))
               for m in cfg.get("metric_list") or [] if isinstance(m, dict) and "metric" in m}
    return TaskSpec(name=name, source=name, metrics=metrics, output_type=str(cfg.get("output_type") or "generate_until"))


def direction(metric: str) -> bool | None:
    """True when higher is better, False when lower is, None when unknown."""
    if metric in LOWER_IS_BETTER:
        return False
    if metric in HIGHER_IS_BETTER:
        return True
    return None


def load_tasks(loaded) -> list[TaskSpec]:
    ev = loaded.recipe.eval
    if ev is None:
        return []
    return [load_task(t, loaded.base_dir, loaded.where("eval", "tasks", i)) for i, t in enumerate(ev.tasks)]


def check_gate(loaded, tasks: list[TaskSpec]) -> list[str]:
    """Problems with eval.gate rules, before any model is loaded."""
    problems = []
    by_name = {t.name: t for t in tasks}
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        problems.append(f"{loaded.where('eval', 'tasks')}: two tasks share a name: {', '.join(names)}")
    for i, rule in enumerate(loaded.recipe.eval.gate):
        where = loaded.where("eval", "gate", i)
        task = by_name.get(rule.task)
        if task is None:
            problems.append(f"{where}: task {rule.task!r} is not in eval.tasks (tasks: {', '.join(names)})")
            continue
        if task.metrics and rule.metric not in task.metrics:
            problems.append(f"{where}: task {rule.task} does not produce metric {rule.metric!r}; "
                            f"it produces: {', '.join(task.metrics)}")
            continue
        higher = task.metrics.get(rule.metric, direction(rule.metric))
        if rule.max_rel_increase is not None and higher is not False:
            problems.append(f"{where}: max_rel_increase fits metrics where lower is better (perplexities); "
                            f"{rule.metric} is higher-is-better: use max_abs_drop or min_recovery")
        if (rule.max_abs_drop is not None or rule.min_recovery is not None) and higher is False:
            kind = "max_abs_drop" if rule.max_abs_drop is not None else "min_recovery"
            problems.append(f"{where}: {kind} fits metrics where higher is better; {rule.metric} is "
                            "lower-is-better: use max_rel_increase")
        if higher is None:
            problems.append(f"{where}: forge does not know whether higher {rule.metric} is better; "
                            "set higher_is_better in the task's metric_list")
    return problems
