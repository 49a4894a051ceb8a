"""The ``runlens`` command line: analyze a run, list and check rule files.

Exit codes: 0 when no finding is at or above --fail-on, 1 when one is, 2 on bad input
(a usage error, a bad run directory or rule file, or a rule whose query failed or timed
out). An internal error exits 2 too, so that a crash never reads as "findings".
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

import runlens
from runlens.analyze import (
    Run,
    RunlensError,
    apply_overrides,
    evaluate,
    load_rule_file,
    load_rules,
)
from runlens.analyze.engine import DEFAULT_MAX_FINDINGS, DEFAULT_RULE_TIMEOUT
from runlens.analyze.errors import EXIT_INPUT_ERROR, single_line
from runlens.analyze.rules import Rule, duplicate_id_problems, find_rule_files
from runlens.reports import FORMATS, render

app = typer.Typer(
    name="runlens",
    help="Find training-dynamics failures in PyTorch runs.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
rules_app = typer.Typer(
    help="List and check rule files.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(rules_app, name="rules")


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    info = "info"
    never = "never"


RulesOption = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--rules",
        metavar="PATH",
        help="Rule file or folder (searched for *.yaml and *.yml) to load. Repeatable.",
    ),
]


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """Turn a RunlensError into ``runlens: error:`` lines on stderr and exit code 2."""
    try:
        yield
    except RunlensError as error:
        _print_errors(error.lines)
        raise typer.Exit(error.exit_code) from None


def _print_errors(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"runlens: error: {line}", err=True)


def _require_rules(rules: Optional[list[Path]], no_builtin: bool, purpose: str) -> None:
    if no_builtin and not rules:
        raise RunlensError(f"no rules to {purpose}: pass --rules PATH or drop --no-builtin")


def _check_positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"{value:g} is not a positive number of seconds")
    return value


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"runlens {runlens.__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Find training-dynamics failures in PyTorch runs."""


@app.command()
def analyze(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Run directory that the recorder wrote.")
    ],
    rules: RulesOption = None,
    no_builtin: Annotated[
        bool, typer.Option("--no-builtin", help="Do not load the built-in rules.")
    ] = False,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            metavar="RULE.PARAM=VALUE",
            help="Set a rule parameter, such as clipping-every-step.window=200. Repeatable.",
        ),
    ] = None,
    formats: Annotated[
        Optional[list[str]],
        typer.Option(
            "--format",
            metavar="FORMAT[=PATH]",
            help=f"Report format: {', '.join(FORMATS)} (default text). Repeatable; "
            "FORMAT=PATH writes that format to PATH, as in --format junit=report.xml.",
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", help="Write the report whose --format has no =PATH to this file."
        ),
    ] = None,
    fail_on: Annotated[
        FailOn,
        typer.Option(
            "--fail-on", help="Exit 1 when a finding has this severity or a higher one."
        ),
    ] = FailOn.error,
    skip_corrupt: Annotated[
        bool,
        typer.Option(
            "--skip-corrupt",
            help="Read every part in full, skip the parts that do not read, and list them "
            "as report warnings.",
        ),
    ] = False,
    rule_timeout: Annotated[
        float,
        typer.Option(
            "--rule-timeout",
            metavar="SECONDS",
            callback=_check_positive,
            help="Stop a rule's query after this many seconds and report the rule as errored.",
        ),
    ] = DEFAULT_RULE_TIMEOUT,
    max_findings: Annotated[
        int,
        typer.Option(
            "--max-findings",
            metavar="N",
            min=1,
            help="Keep at most N findings per rule, and warn when a rule has more.",
        ),
    ] = DEFAULT_MAX_FINDINGS,
) -> None:
    """Analyze a run directory and report the failures that the rules find."""
    with _input_errors():
        _require_rules(rules, no_builtin, "evaluate")
        outputs = plan_outputs(formats or ["text"], output, run_dir)
        loaded = apply_overrides(load_rules(rules or [], builtin=not no_builtin), overrides or [])
        with Run.open(run_dir, skip_corrupt=skip_corrupt) as run:
            report = evaluate(run, loaded, rule_timeout=rule_timeout, max_findings=max_findings)
            rendered = [(render(report, name, fail_on.value, run), path)
                        for name, path in outputs]
        for text, path in rendered:
            _write_report(text, path)

    _print_errors([f"rule '{f.rule_id}': {f.error}" for f in report.errored])
    raise typer.Exit(report.exit_code(fail_on.value))


def plan_outputs(formats: list[str], output: Optional[Path],
                 run_dir: Path) -> list[tuple[str, Optional[Path]]]:
    """Pair each --format value with its destination file, or None for stdout.

    A value FORMAT=PATH names its own file. At most one value may have no PATH: it goes
    to --output, or to stdout without one.
    """
    planned: list[tuple[str, Optional[Path]]] = []
    for value in formats:
        name, _, path_text = value.partition("=")
        if name not in FORMATS:
            raise RunlensError(f"--format {value}: unknown format {name!r}; use one of "
                               f"{', '.join(FORMATS)}")
        if "=" in value and not path_text:
            raise RunlensError(f"--format {value}: the path after '=' is empty; write "
                               f"{name}=PATH, or {name} alone for stdout or --output")
        planned.append((name, Path(path_text) if path_text else None))
    unplaced = [name for name, path in planned if path is None]
    if len(unplaced) > 1:
        raise RunlensError(
            f"--format {' and --format '.join(unplaced)}: only one format can go to "
            f"{'--output' if output else 'stdout'}; give the others a file, as in "
            f"--format {unplaced[-1]}=report.{unplaced[-1]}")
    if output is not None and not unplaced:
        raise RunlensError(f"--output {output}: every --format names its own file, so "
                           "--output would receive nothing; drop it or a format's =PATH")
    planned = [(name, output if path is None else path) for name, path in planned]
    targets = [path for _, path in planned if path is not None]
    for path in targets:
        if targets.count(path) > 1:
            raise RunlensError(f"--format: two formats would write {path}; give each its "
                               "own file")
        _check_output_outside_run(path, run_dir)
    return planned


def _check_output_outside_run(output: Path, run_dir: Path) -> None:
    if output.resolve().is_relative_to(run_dir.resolve()):
        raise RunlensError(
            f"report file {output}: is inside the run directory {run_dir}, which the "
            "analyzer never modifies; write the report to another folder"
        )


def _write_report(text: str, output: Optional[Path]) -> None:
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as error:
        raise RunlensError(f"--output {output}: cannot write the report: {error}") from None


@rules_app.command("list")
def list_rules(
    rules: RulesOption = None,
    no_builtin: Annotated[
        bool, typer.Option("--no-builtin", help="Do not list the built-in rules.")
    ] = False,
) -> None:
    """List the loaded rules: id, severity, category and title."""
    with _input_errors():
        _require_rules(rules, no_builtin, "list")
        loaded = load_rules(rules or [], builtin=not no_builtin)
    typer.echo(_rule_table(loaded), nl=False)


def _rule_table(rules: list[Rule]) -> str:
    rows = [("ID", "SEVERITY", "CATEGORY", "TITLE")]
    rows += [(r.id, r.severity, r.category, r.title) for r in sorted(rules, key=lambda r: r.id)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]
        for row in rows
    ]
    return "\n".join(lines) + "\n"


@rules_app.command("check")
def check_rules(
    paths: Annotated[
        list[Path], typer.Argument(metavar="PATH...", help="Rule files or folders to validate.")
    ],
) -> None:
    """Validate rule files: print OK per valid rule, or each problem, and exit 0 or 2."""
    valid: list[Rule] = []
    problems: list[str] = []
    for path in paths:
        try:
            files = find_rule_files(path)
        except RunlensError as error:
            problems += error.lines
            continue
        for file in files:
            try:
                rule = load_rule_file(file)
            except RunlensError as error:
                problems += error.lines
                continue
            valid.append(rule)
            typer.echo(f"OK {file}: rule '{rule.id}'")
    problems += duplicate_id_problems(valid)
    _print_errors(problems)
    raise typer.Exit(EXIT_INPUT_ERROR if problems else 0)


def main() -> None:
    """Run the command line. Usage errors exit 2, as click's UsageError does.

    An exception that escapes a command is a bug in runlens. It exits 2 as well, with a
    one-line message, because Python's default exit code 1 would read as "findings" to a
    CI gate. RUNLENS_DEBUG=1 prints the traceback before the message.
    """
    try:
        app()
    except Exception as error:  # SystemExit and KeyboardInterrupt are not Exceptions
        if os.environ.get("RUNLENS_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(
            f"runlens: internal error: {type(error).__name__}: {single_line(error)} "
            "(set RUNLENS_DEBUG=1 to see the traceback; please report it)",
            file=sys.stderr,
        )
        sys.exit(EXIT_INPUT_ERROR)
