"""A build from recipe to registry record: run the step graph, then publish what it decided.

Publishing always runs once the graph stopped on its own terms: a failed eval or scan gate is
recorded too (status ``rejected``, with its reason), and only then reported as the build's failure.
A step that could not run (a ForgeError from the step) publishes nothing. The CLI prints the
``Outcome`` and maps it to an exit code; it decides nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from forge.core.errors import EvalGateError, ExitCode, ScanGateError, UsageError
from forge.executors import Executor
from forge.orchestrate.build import BuildOutcome, Reporter, StepResult, execute, execute_one
from forge.registry import LocalRegistry, Record, publish
from forge.steps import StepSpec, gate, scan
from forge.store.local import Store
from forge.oci.client import Remote
from forge.registry.matrix import publish_matrix
from forge.report import BuildOutputs

if TYPE_CHECKING:
    from forge.recipe.resolve import Resolved
    from forge.store.remote import RemoteCache

__all__ = ["Outcome", "VariantsOutcome", "run", "run_variants", "check_target"]


@dataclass(frozen=True)
class Outcome:
    build: BuildOutcome
    record: Record                    # what was published, with its status (validated, rejected, …) and reason
    registry_root: Path
    build_recipe: "Resolved | None" = None
    report: "BuildOutputs | None" = None      # the HTML build report (attached to the record), junit, summary
    report_summaries: dict | None = None
    decision: object | None = None           # method: auto: the walk that chose this build (forge.orchestrate.auto.Decision)

    @property
    def results(self) -> list[StepResult]:
        return self.build.results

    @property
    def error(self) -> EvalGateError | ScanGateError | None:
        """The failed gate that stopped the build (already recorded as rejected), or None."""
        return self.build.stopped_by

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.error is None else self.error.exit_code

    @property
    def gate(self):
        """The eval gate's verdict (``forge.steps.gate.Output``), or None without an eval section."""
        r = self.build.by_name.get("gate")
        return gate.Output.read(r.entry) if r else None

    @property
    def scan(self):
        """The scan's verdict (``forge.steps.scan.Output``), or None when the build did not reach it."""
        r = self.build.by_name.get("scan")
        return scan.Output.read(r.entry) if r else None


def check_target(target: str | None) -> None:
    """A bad --publish-to is a usage error before anything is built, not after an hour of building."""
    if target and target != "local":
        Remote.parse(target)


def run(resolved: "Resolved", store: Store, *, force: set[str] = frozenset(), executor: Executor | None = None,
        registry_dir: Path | None = None, publish_to: str | None = None,
        on_start: Callable[[str, StepSpec, str], Reporter] | None = None,
        on_done: Callable[[str, StepResult, list], None] | None = None,
        on_publish: Callable[[], Reporter] | None = None, report_dir: Path | None = None,
        remote: "RemoteCache | None" = None, evidence: dict[str, tuple[Path, ...]] | None = None) -> Outcome:
    """Build the recipe and publish the result with its status. ``publish_to`` overrides publish.registry.
    With ``report_dir``, the HTML build report is rendered from the record-to-be and attached to it as
    evidence; junit.xml and summary.md go beside it (a report that cannot be drawn never loses the record).
    ``evidence``: more files to attach, by kind. A ``method: auto`` recipe is built by ``forge.orchestrate.auto.run``,
    which walks its trials and comes back here with the chosen one."""
    check_target(publish_to)
    if resolved.is_auto:
        raise UsageError(f"{resolved.path}: method: auto is built by forge.orchestrate.auto.run (it picks the trial "
                         "to build)")
    outcome = execute_one(resolved, store, force=force, executor=executor, on_start=on_start, on_done=on_done,
                          remote=remote)
    return _publish(resolved, store, outcome, registry_dir=registry_dir, publish_to=publish_to, on_publish=on_publish,
                    report_dir=report_dir, evidence=evidence)


def _publish(loaded: "Resolved", store: Store, outcome: BuildOutcome, *, registry_dir: Path | None,
             publish_to: str | None, on_publish: Callable[[], Reporter] | None, report_dir: Path | None,
             evidence: dict[str, tuple[Path, ...]] | None = None) -> Outcome:
    reg = LocalRegistry(registry_dir)
    report = on_publish() if on_publish else (lambda *a, **k: None)
    outputs = None
    if report_dir is not None:
        outputs = BuildOutputs(report_dir, loaded, outcome.by_name)
        report("writing the build report")

    def attach(collected) -> dict:
        return {**(outputs.attach(collected) if outputs else {}), **(evidence or {})}

    record = publish(loaded, outcome.by_name, report, registry=reg, target=publish_to, attach=attach)
    summaries = outputs.finish() if outputs else None
    return Outcome(outcome, record, reg.root, loaded, outputs, summaries)


@dataclass(frozen=True)
class VariantsOutcome:
    """A build of several variants: each variant's Outcome (in the recipe's order), and the variant matrix
    published after them (None where this forge has no matrix publisher, or nothing was published)."""
    variants: dict[str, Outcome]
    matrix: Record | None = None

    @property
    def warnings(self) -> list[str]:
        """What the executor warned about during the build (the remote cache was down, ...), once each."""
        return list(dict.fromkeys(w for o in self.variants.values() for w in o.build.warnings))

    @property
    def exit_code(self) -> ExitCode:
        """0 when every variant passed; else the failed gate's code (the eval gate's first: exit 3)."""
        codes = sorted({o.exit_code for o in self.variants.values()} - {ExitCode.OK})
        return codes[0] if codes else ExitCode.OK

    @property
    def error(self) -> EvalGateError | ScanGateError | None:
        failed = [o.error for o in self.variants.values() if o.error is not None]
        return min(failed, key=lambda e: e.exit_code) if failed else None


def run_variants(variants: list["Resolved"], store: Store, *, force: set[str] = frozenset(),
                 executor: Executor | None = None, registry_dir: Path | None = None, publish_to: str | None = None,
                 on_start: Callable[[str, StepSpec, str], Reporter] | None = None,
                 on_done: Callable[[str, StepResult, list], None] | None = None,
                 on_publish: Callable[[str], Reporter] | None = None,
                 report_dir: Path | None = None, remote: "RemoteCache | None" = None) -> VariantsOutcome:
    """Build the variants as one graph (the one scheduler, ``forge.orchestrate.build``), then publish each (a
    variant whose gate failed is recorded as rejected, alone), then the variant matrix. Report files go to
    ``report_dir/<variant>``."""
    check_target(publish_to)
    outcomes = execute(variants, store, force=force, executor=executor, on_start=on_start, on_done=on_done,
                       remote=remote)
    published = {}
    for resolved in variants:
        name = resolved.variant
        published[name] = _publish(resolved, store, outcomes[name], registry_dir=registry_dir, publish_to=publish_to,
                                   on_publish=(lambda n=name: on_publish(n)) if on_publish else None,
                                   report_dir=report_dir / name if report_dir is not None else None)
    matrix = publish_matrix(variants[0], [o.record for o in published.values()],
                            registry=LocalRegistry(registry_dir), target=publish_to)
    return VariantsOutcome(published, matrix)
