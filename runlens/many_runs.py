"""Analyze several runs in one command: `runlens analyze runs/` or `runlens analyze A B ...`.

Each argument is a run directory (it contains ``run.json``) or a folder that is searched
at any depth for run directories. The search does not go below a run directory, and it
does not follow symbolic links to folders, except to a run directory itself.

Every run is analyzed in this process with the same rules, parameters and waivers, each
on its own DuckDB connection from `Run.open`, several runs at a time in threads. One
shared connection for all runs was measured too (benchmarks/many_runs.py) and was no
faster. It is not used, because DuckDB's allowed_paths setting applies to the whole
database, so it would have to list every run's parts. A rule evaluated on one run
could then read another run's parts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import duckdb
import typer

from runlens import format as fmt
from runlens.analyze import Report, Rule, Run, RunlensError, evaluate
from runlens.analyze.errors import EXIT_INPUT_ERROR, os_error_reason
from runlens.analyze.findings import SEVERITIES
from runlens.cli import (
    STEP_SUMMARY_VARIABLE,
    _check_output_outside_run,
    _print_errors,
    _terminal_progress,
    _write_report,
    plan_outputs,
)
from runlens.config import Settings, build_rule_set
from runlens.reports import runs_table
from runlens.waivers import Waiver, apply_waivers

# The error for --format html with several runs, because the HTML report draws one run.
HTML_REJECTED = (
    "--format html: the HTML report shows one run; for several runs use "
    f"{', '.join(runs_table.RUNS_FORMATS)}, or analyze each run alone with --format html"
)


@dataclass(frozen=True)
class RunTarget:
    """A run directory to analyze, or an argument that yielded none.

    Attributes:
        label: the path that reports show, relative to the folder argument that
            contains the run, or the argument itself for a run given directly.
        path: the path passed to `Run.open`: the argument as the user wrote it, joined
            with the folders below it, so that error messages name a familiar path.
        problem: why no run could be read here, such as a folder that cannot be
            listed; None for a run directory to open.
    """

    label: str
    path: Path
    problem: Optional[str] = None


@dataclass
class RunOutcome:
    """The analysis of one run: its report, or the error that stopped it."""

    label: str
    path: Path
    report: Optional[Report] = None
    error: Optional[str] = None

    def exit_code(self, fail_on: str) -> int:
        if self.report is None:
            return EXIT_INPUT_ERROR
        return self.report.exit_code(fail_on)


def _has_run_file(folder: Path) -> bool:
    return (folder / fmt.RUN_FILE).exists()


def wants_many_runs(paths: Sequence[Path]) -> bool:
    """Return whether the arguments call for the report over several runs.

    One argument that is a run directory, a missing path or a file keeps the single-run
    report, and so does a folder without any run directory below it, so that its error
    message stays the single-run one.
    """
    if len(paths) > 1:
        return True
    path = paths[0]
    if not path.is_dir() or _has_run_file(path):
        return False
    return next(_walk_runs(path, []), None) is not None


def find_runs(paths: Sequence[Path]) -> list[RunTarget]:
    """Return the run directories that the arguments name or contain, in argument order.

    A folder is walked top-down, with each folder's entries sorted by name. A run
    reached twice, such as through a folder and directly, is analyzed once. An argument
    that is a folder without run directories yields a target with a problem, and so
    does a folder below it that cannot be listed.
    """
    targets: list[RunTarget] = []
    seen: set[Path] = set()
    prefix_labels = len(paths) > 1
    for argument in paths:
        if not argument.is_dir() or _has_run_file(argument):
            # A run, a file or a missing path: Run.open reports what is wrong with it.
            found = [RunTarget(str(argument), argument)]
        else:
            problems: list[RunTarget] = []
            found = list(_walk_runs(argument, problems, prefix_labels))
            found += problems
            if not found:
                found = [RunTarget(str(argument), argument, (
                    f"{argument}: no run directory found: neither the folder nor any "
                    f"folder below it contains {fmt.RUN_FILE}; pass a run directory or a "
                    "folder of runs"))]
        for target in found:
            if target.problem is None:
                resolved = target.path.resolve()
                if resolved in seen:
                    continue
                seen.add(resolved)
            targets.append(target)
    return targets


def _walk_runs(argument: Path, problems: list[RunTarget],
               prefix_labels: bool = False) -> Iterator[RunTarget]:
    """Yield the run directories below the folder `argument`, sorted, not searching inside them.

    Folders that cannot be listed are added to `problems`, because the runs inside them
    would otherwise be missing from the report without a trace.
    """

    def label_for(folder: Path) -> str:
        relative = folder.relative_to(argument)
        return str(argument / relative) if prefix_labels else str(relative)

    def record_problem(error: OSError) -> None:
        folder = Path(error.filename) if error.filename else argument
        problems.append(RunTarget(label_for(folder), folder, (
            f"{folder}: cannot list the folder ({os_error_reason(error)}), so the runs "
            "inside it were not analyzed; fix its permissions or pass the runs directly")))

    for folder_text, folder_names, _ in os.walk(argument, onerror=record_problem):
        folder = Path(folder_text)
        folder_names.sort()
        runs_here = []
        for name in list(folder_names):
            child = folder / name
            if child.is_symlink():
                # os.walk does not follow links; a link to a run directory still counts.
                folder_names.remove(name)
                if _has_run_file(child):
                    runs_here.append(child)
            elif _has_run_file(child):
                folder_names.remove(name)
                runs_here.append(child)
        for run_dir in runs_here:
            yield RunTarget(label_for(run_dir), run_dir)


def available_cpus() -> int:
    """Return the number of CPU cores that this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def analyze_runs(
    targets: Sequence[RunTarget],
    rules: Sequence[Rule],
    waivers: Sequence[Waiver],
    *,
    skip_corrupt: bool,
    rule_timeout: float,
    max_findings: int,
    jobs: int = 1,
    on_run_done: Optional[Callable[[RunTarget], None]] = None,
) -> list[RunOutcome]:
    """Analyze each target on its own DuckDB connection, `jobs` at a time, in threads.

    Returns the outcomes in the order of `targets`. A run that cannot be opened or read
    gets an outcome with its error on one line, and the other runs are still analyzed.
    With one job, each connection uses DuckDB's default of a thread per core, as a
    single run does. With more, the cores are divided among the jobs.
    """
    threads = None if jobs == 1 else max(1, available_cpus() // jobs)
    # The connections of the runs being evaluated, to interrupt them on Ctrl-C.
    open_connections: list[duckdb.DuckDBPyConnection] = []
    lock = threading.Lock()

    def analyze_one(target: RunTarget) -> RunOutcome:
        outcome = RunOutcome(target.label, target.path, error=target.problem)
        if target.problem is not None:
            return outcome
        try:
            with Run.open(target.path, skip_corrupt=skip_corrupt, threads=threads) as run:
                with lock:
                    open_connections.append(run.connection)
                try:
                    report = evaluate(run, rules, rule_timeout=rule_timeout,
                                      max_findings=max_findings)
                finally:
                    with lock:
                        open_connections.remove(run.connection)
        except RunlensError as error:
            outcome.error = "; ".join(error.lines)
            return outcome
        apply_waivers(report, waivers)
        outcome.report = report
        return outcome

    outcomes: list[Optional[RunOutcome]] = [None] * len(targets)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="runlens-run")
    try:
        futures: dict[Future[RunOutcome], int] = {
            pool.submit(analyze_one, target): index for index, target in enumerate(targets)
        }
        for future in as_completed(futures):
            index = futures[future]
            outcomes[index] = future.result()
            if on_run_done is not None:
                on_run_done(targets[index])
    except BaseException:
        # An interrupt (Ctrl-C) or a bug in one run: stop the runs that have not started,
        # and interrupt the queries that are running, so the threads end soon.
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for connection in open_connections:
                connection.interrupt()
        raise
    pool.shutdown()
    return [outcome for outcome in outcomes if outcome is not None]


def worst_first(outcomes: Sequence[RunOutcome], fail_on: str) -> list[RunOutcome]:
    """Sort runs by exit code, then runs not analyzed, rule errors and findings by severity.

    Runs that tie are sorted by path.
    """

    def badness(outcome: RunOutcome) -> tuple[int, ...]:
        report = outcome.report
        if report is None:
            return (-outcome.exit_code(fail_on), 0)
        counts = report.counts()
        return (-outcome.exit_code(fail_on), 1, -len(report.errored),
                *(-counts[severity] for severity in SEVERITIES))

    return sorted(outcomes, key=lambda outcome: (badness(outcome), outcome.label))


def analyze_many(
    paths: Sequence[Path],
    settings: Settings,
    formats: list[str],
    output: Optional[Path],
    *,
    skip_corrupt: bool,
    rule_timeout: float,
    max_findings: int,
    jobs: Optional[int] = None,
) -> int:
    """Run `runlens analyze` over several runs: analyze, write the reports, return the exit code.

    `jobs` runs are analyzed at a time, by default one per CPU core.

    Raises:
        RunlensError: bad options (a format or output file), or an invalid rule file or
            configuration. Problems of single runs are reported, not raised.
    """
    targets = find_runs(paths)
    readable = [target for target in targets if target.problem is None and target.path.is_dir()]
    outputs = plan_outputs(formats, output, readable[0].path if readable else Path(paths[0]))
    if any(name == "html" for name, _ in outputs):
        raise RunlensError(HTML_REJECTED)
    for _, path in outputs:
        if path is not None:
            for target in readable:
                _check_output_outside_run(path, target.path)
    loaded = build_rule_set(settings).rules
    gate = settings.fail_on.value

    jobs = min(jobs or available_cpus(), len(targets))
    with _run_progress(len(targets)) as on_run_done:
        outcomes = analyze_runs(targets, loaded, settings.waivers, skip_corrupt=skip_corrupt,
                                rule_timeout=rule_timeout, max_findings=max_findings,
                                jobs=jobs, on_run_done=on_run_done)
    outcomes = worst_first(outcomes, gate)
    for name, path in outputs:
        _write_report(runs_table.render_runs(outcomes, name, gate), path)
    summary_file = os.environ.get(STEP_SUMMARY_VARIABLE)
    if summary_file:
        _append_step_summary(runs_table.render_runs(outcomes, "markdown", gate),
                             Path(summary_file), readable)

    errors = [outcome.error for outcome in outcomes if outcome.error is not None]
    errors += [f"{outcome.label}: rule '{failure.rule_id}': {failure.error}"
               for outcome in outcomes if outcome.report is not None
               for failure in outcome.report.errored]
    _print_errors(errors)
    return runs_table.exit_code(outcomes, gate)


def _append_step_summary(summary: str, path: Path, targets: Sequence[RunTarget]) -> None:
    """Append the Markdown table to GitHub's job summary file; warn if that fails."""
    try:
        for target in targets:
            _check_output_outside_run(path, target.path)
        with path.open("a", encoding="utf-8") as file:
            if file.tell() > 0:
                file.write("\n")
            file.write(summary)
    except (OSError, RunlensError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        typer.echo(f"runlens: warning: {STEP_SUMMARY_VARIABLE}={path}: the job summary was not "
                   f"written: {reason}", err=True)


@contextlib.contextmanager
def _run_progress(total: int) -> Iterator[Optional[Callable[[RunTarget], None]]]:
    """Show a progress bar over the runs, as analyze of one run shows one over the rules.

    The callback is None when stderr is not a terminal or the CI variable is set.
    """
    with _terminal_progress("analyzing runs", total) as advance:
        yield None if advance is None else (lambda target: advance(1, target.label))
