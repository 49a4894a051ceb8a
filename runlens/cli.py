"""The ``runlens`` command line: analyze a run, list and check rule files.

Exit codes: 0 when no finding is at or above --fail-on, 1 when one is, 2 on bad input
(a usage error, a bad run directory or rule file, or a rule whose query failed or timed
out). An internal error exits 2 too, so that a crash never reads as "findings".
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

import runlens
from runlens.analyze import (
    Run,
    RunlensError,
    evaluate,
    load_rule_file,
)
from runlens.analyze.engine import DEFAULT_MAX_FINDINGS, DEFAULT_RULE_TIMEOUT
from runlens.analyze.errors import EXIT_INPUT_ERROR, single_line
from runlens.analyze.rules import Rule, duplicate_id_problems, find_rule_files
from runlens.config import (
    CommandLine,
    Settings,
    build_rule_set,
    describe_settings,
    render_settings_text,
    resolve_settings,
)
from runlens.plot import plot_run
from runlens.query import DEFAULT_LIMIT as DEFAULT_QUERY_LIMIT
from runlens.query import query_run
from runlens.reports import FORMATS, render
from runlens.show import show_run
from runlens.waivers import apply_waivers

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
import_app = typer.Typer(
    help="Import a run that TensorBoard or a CSV logger wrote as a new run directory.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(import_app, name="import")


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
ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        metavar="PATH",
        help="Read this runlens.toml or pyproject.toml instead of searching from the "
        "current directory upward.",
    ),
]
NoConfigOption = Annotated[
    bool, typer.Option("--no-config", help="Ignore configuration files.")
]
BuiltinOption = Annotated[
    Optional[bool],
    typer.Option(
        "--builtin/--no-builtin",
        help="Load the built-in rules, or not. Default: load them, unless the "
        "configuration sets no-builtin.",
    ),
]
SelectOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--select",
        metavar="ID",
        help="Keep only these rule ids or categories; replaces the configuration's select. "
        "Repeatable or comma-separated.",
    ),
]
IgnoreOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--ignore",
        metavar="ID",
        help="Drop these rule ids or categories, even if selected; replaces the "
        "configuration's ignore. Repeatable or comma-separated.",
    ),
]
FailOnOption = Annotated[
    Optional[FailOn],
    typer.Option(
        "--fail-on",
        help="Exit 1 when a finding has this severity or a higher one. Default: error, "
        "or fail-on from the configuration.",
    ),
]
OverridesOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        metavar="RULE.PARAM=VALUE",
        help="Set a rule parameter, such as clipping-every-step.window=200. Repeatable; "
        "wins over the configuration's params.",
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
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR...",
            help="Run directory that the recorder wrote, or a folder searched at any depth "
            "for run directories. Several runs give one table of runs by findings.",
        ),
    ],
    rules: RulesOption = None,
    builtin: BuiltinOption = None,
    overrides: OverridesOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    config: ConfigOption = None,
    no_config: NoConfigOption = False,
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
    fail_on: FailOnOption = None,
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
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs",
            "-j",
            metavar="N",
            min=1,
            help="With several runs, analyze N runs at a time. Default: one per CPU core. "
            "Peak memory grows with N.",
        ),
    ] = None,
) -> None:
    """Analyze run directories and report the failures that the rules find."""
    from runlens.many_runs import analyze_many, wants_many_runs

    with _input_errors():
        settings = _settings(rules, builtin, overrides, select, ignore, fail_on, config,
                             no_config)
        _require_rules(settings.rule_paths, settings.no_builtin.value, "evaluate")
        if wants_many_runs(run_dirs):
            raise typer.Exit(analyze_many(
                run_dirs, settings, formats or ["text"], output, skip_corrupt=skip_corrupt,
                rule_timeout=rule_timeout, max_findings=max_findings, jobs=jobs))
        run_dir = run_dirs[0]
        outputs = plan_outputs(formats or ["text"], output, run_dir)
        loaded = build_rule_set(settings).rules
        gate = settings.fail_on.value
        with Run.open(run_dir, skip_corrupt=skip_corrupt) as run:
            with _rule_progress(len(loaded)) as on_rule_done:
                report = evaluate(run, loaded, rule_timeout=rule_timeout,
                                  max_findings=max_findings, on_rule_done=on_rule_done)
            apply_waivers(report, settings.waivers)
            rendered = [(render(report, name, gate, run), path)
                        for name, path in outputs]
            summary_file = os.environ.get(STEP_SUMMARY_VARIABLE)
            if summary_file:
                summary = render(report, "markdown", gate, run)
        for text, path in rendered:
            _write_report(text, path)
        if summary_file:
            _append_step_summary(summary, Path(summary_file), run_dir)

    _print_errors([f"rule '{f.rule_id}': {f.error}" for f in report.errored])
    raise typer.Exit(report.exit_code(gate))


@app.command()
def plot(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Run directory that the recorder wrote.")
    ],
    output_dir: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="DIR",
                     help="Folder for the PNG files, created if missing; must lie outside "
                     "the run directory."),
    ],
    rules: RulesOption = None,
    builtin: BuiltinOption = None,
    overrides: OverridesOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    config: ConfigOption = None,
    no_config: NoConfigOption = False,
    skip_corrupt: Annotated[
        bool,
        typer.Option("--skip-corrupt",
                     help="Read every part in full and skip the parts that do not read."),
    ] = False,
) -> None:
    """Draw the charts of the HTML report as PNG files, one per chart, with the findings."""
    with _input_errors():
        settings = _settings(rules, builtin, overrides, select, ignore, None, config,
                             no_config)
        _require_rules(settings.rule_paths, settings.no_builtin.value, "evaluate")
        result = plot_run(run_dir, output_dir, settings, skip_corrupt=skip_corrupt)
    for path in result.paths:
        typer.echo(str(path))
    _print_errors([f"rule '{f.rule_id}': {f.error}" for f in result.report.errored])
    raise typer.Exit(EXIT_INPUT_ERROR if result.report.errored else 0)


# GitHub Actions sets this to a file whose Markdown becomes the job's summary page.
STEP_SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"


@contextlib.contextmanager
def _rule_progress(total: int) -> Iterator[Optional[Callable[[Rule], None]]]:
    """Show a progress bar over the rules on stderr, and yield the callback that advances it.

    The callback is None when `_terminal_progress` shows no bar.
    """
    with _terminal_progress("evaluating rules", total) as advance:
        yield None if advance is None else (lambda rule: advance(1, rule.id))


@contextlib.contextmanager
def _terminal_progress(label: str, total: int, *, in_bytes: bool = False
                       ) -> Iterator[Optional[Callable[..., None]]]:
    """Show a progress bar on stderr, and yield `advance(amount, description="")` for it.

    The bar shows only when stderr is a terminal and the CI variable is unset or false
    (empty, "0", "false" or "no"), so that CI logs and captured output stay clean.
    Otherwise the callback is None.
    `in_bytes` shows the amount done as a size, such as "1.2/5.0 MB", instead of a count.
    """
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    if in_ci or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                               TextColumn)

    # redirect_stdout=False: the report goes to stdout after the bar, untouched by rich.
    with Progress(TextColumn(label), BarColumn(),
                  DownloadColumn() if in_bytes else MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=Console(stderr=True),
                  transient=True, redirect_stdout=False, redirect_stderr=False) as progress:
        task = progress.add_task("", total=total)
        yield lambda amount, description="": progress.update(task, advance=amount,
                                                             description=description)


def _append_step_summary(summary: str, path: Path, run_dir: Path) -> None:
    """Append the Markdown summary to GitHub's job summary file; warn if that fails."""
    try:
        _check_output_outside_run(path, run_dir)
        with path.open("a", encoding="utf-8") as file:
            if file.tell() > 0:
                file.write("\n")
            file.write(summary)
    except (OSError, RunlensError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        typer.echo(f"runlens: warning: {STEP_SUMMARY_VARIABLE}={path}: the job summary was "
                   f"not written: {reason}", err=True)


def _settings(rules: Optional[list[Path]], builtin: Optional[bool],
              overrides: Optional[list[str]], select: Optional[list[str]],
              ignore: Optional[list[str]], fail_on: Optional[FailOn],
              config: Optional[Path], no_config: bool) -> Settings:
    """Merge the configuration file with the command line's rule and gating options."""
    command_line = CommandLine(
        rules=rules or [], builtin=builtin, overrides=overrides or [], select=select,
        ignore=ignore, fail_on=fail_on.value if fail_on else None,
    )
    return resolve_settings(command_line, config_path=config, no_config=no_config)


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
    """Reject a report file inside the run directory, or one that is a hard link to a
    file of it, and one whose folder does not exist, before any analysis runs."""
    inside = output.resolve().is_relative_to(run_dir.resolve())
    if not inside and output.is_file() and output.stat().st_nlink > 1:
        linked = (output.stat().st_dev, output.stat().st_ino)
        inside = run_dir.is_dir() and any(
            (file.stat().st_dev, file.stat().st_ino) == linked
            for file in run_dir.rglob("*") if file.is_file())
    if inside:
        raise RunlensError(
            f"report file {output}: is inside the run directory {run_dir}, which the "
            "analyzer never modifies; write the report to another folder"
        )
    if not output.parent.is_dir():
        raise RunlensError(f"report file {output}: folder {output.parent} does not exist; "
                           "create it or write the report elsewhere")


def _write_report(text: str, output: Optional[Path]) -> None:
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as error:
        raise RunlensError(f"report file {output}: cannot write the report: {error}") from None


@rules_app.command("list")
def list_rules(
    rules: RulesOption = None,
    builtin: BuiltinOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    config: ConfigOption = None,
    no_config: NoConfigOption = False,
) -> None:
    """List the selected rules: id, severity (after the configuration's), category, title."""
    with _input_errors():
        settings = _settings(rules, builtin, None, select, ignore, None, config, no_config)
        _require_rules(settings.rule_paths, settings.no_builtin.value, "list")
        loaded = build_rule_set(settings).rules
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


class ConfigFormat(str, Enum):
    text = "text"
    json = "json"


@app.command("config")
def show_config(
    config: ConfigOption = None,
    no_config: NoConfigOption = False,
    rules: RulesOption = None,
    builtin: BuiltinOption = None,
    overrides: OverridesOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    fail_on: FailOnOption = None,
    output_format: Annotated[
        ConfigFormat, typer.Option("--format", help="text (default) or json, for scripts.")
    ] = ConfigFormat.text,
) -> None:
    """Print the effective configuration, where each value came from, and the rule set."""
    with _input_errors():
        settings = _settings(rules, builtin, overrides, select, ignore, fail_on, config,
                             no_config)
        _require_rules(settings.rule_paths, settings.no_builtin.value, "show")
        rule_set = build_rule_set(settings)
    if output_format is ConfigFormat.json:
        typer.echo(json.dumps(describe_settings(settings, rule_set), indent=2))
    else:
        typer.echo(render_settings_text(settings, rule_set), nl=False)


class ShowFormat(str, Enum):
    text = "text"
    json = "json"


@app.command("show")
def show(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Run directory that the recorder wrote.")
    ],
    output_format: Annotated[
        ShowFormat, typer.Option("--format", help="text (default) or json, for scripts.")
    ] = ShowFormat.text,
) -> None:
    """Describe a run: metadata, segments, ranks, steps, tables and their signals, events."""
    with _input_errors():
        text = show_run(run_dir, as_json=output_format is ShowFormat.json)
    typer.echo(text, nl=False)


@app.command("query")
def query(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Run directory that the recorder wrote.")
    ],
    sql: Annotated[
        str, typer.Argument(metavar="SQL", help="One SELECT over the run's views, such as "
                            "\"SELECT step, loss FROM scalars\".")
    ],
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, help="Print at most N rows.")
    ] = DEFAULT_QUERY_LIMIT,
    csv_path: Annotated[
        Optional[Path],
        typer.Option("--csv", metavar="FILE", help="Write every row to FILE as CSV."),
    ] = None,
    parquet_path: Annotated[
        Optional[Path],
        typer.Option("--parquet", metavar="FILE", help="Write every row to FILE as Parquet."),
    ] = None,
) -> None:
    """Run one SELECT on a run's views, in the rules' sandbox, and print or write the rows."""
    with _input_errors():
        text = query_run(run_dir, sql, limit=limit, csv_path=csv_path,
                         parquet_path=parquet_path)
    typer.echo(text, nl=False)


class CompareFormat(str, Enum):
    text = "text"
    json = "json"
    html = "html"


@app.command("compare")
def compare(
    base_run: Annotated[
        Path, typer.Argument(metavar="BASE_RUN", help="Run directory to compare against.")
    ],
    new_run: Annotated[
        Path, typer.Argument(metavar="NEW_RUN", help="Run directory whose changes to report.")
    ],
    rules: RulesOption = None,
    builtin: BuiltinOption = None,
    overrides: OverridesOption = None,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    config: ConfigOption = None,
    no_config: NoConfigOption = False,
    report_format: Annotated[
        CompareFormat,
        typer.Option("--format", help="text, json, or html with charts (needs matplotlib)."),
    ] = CompareFormat.text,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the comparison to this file, not stdout."),
    ] = None,
    fail_on_new: Annotated[
        FailOn,
        typer.Option(
            "--fail-on-new",
            help="Exit 1 when a finding that only the new run has is of this severity or "
            "a higher one.",
        ),
    ] = FailOn.never,
) -> None:
    """Compare two runs: metrics, new, gone and unchanged findings, and trajectories."""
    from runlens.compare import compare_runs, render_comparison

    with _input_errors():
        settings = _settings(rules, builtin, overrides, select, ignore, None, config,
                             no_config)
        _require_rules(settings.rule_paths, settings.no_builtin.value, "evaluate")
        if output is not None:
            _check_output_outside_run(output, base_run)
            _check_output_outside_run(output, new_run)
        loaded = build_rule_set(settings).rules
        with Run.open(base_run) as base, Run.open(new_run) as new:
            comparison = compare_runs(base, new, loaded)
        text = render_comparison(comparison, report_format.value, fail_on_new.value)
        _write_report(text, output)

    _print_errors(comparison.errored)
    raise typer.Exit(comparison.exit_code(fail_on_new.value))


MapOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--map",
        metavar="NAME=SIGNAL",
        help="Import the tag or column NAME as SIGNAL: scalars.COLUMN, "
        "param_groups.lr[.GROUP], param_groups.weight_decay[.GROUP], evals.SPLIT.METRIC, "
        "classes.SPLIT.CLASS_ID.recall (or .precision), or skip. Repeatable; wins over "
        "the default mapping.",
    ),
]
NewRunDirArgument = Annotated[
    Path,
    typer.Argument(metavar="RUN_DIR",
                   help="Run directory to create; it must not exist or must be empty."),
]


@import_app.command("tensorboard")
def import_tensorboard(
    logdir: Annotated[
        Path,
        typer.Argument(metavar="LOGDIR", help="Folder of TensorBoard event files "
                       "(events.out.tfevents.*), read with its subfolders."),
    ],
    run_dir: NewRunDirArgument,
    maps: MapOption = None,
    run: Annotated[
        Optional[str],
        typer.Option("--run", metavar="NAME",
                     help="The run to import when LOGDIR contains several: its folder, "
                     "relative to LOGDIR."),
    ] = None,
) -> None:
    """Import the scalars of a TensorBoard log as a new run directory."""
    from runlens.importers import import_series, parse_map_options
    from runlens.importers.tensorboard import find_event_files, read_event_files
    from runlens.importers.writer import check_new_run_dir

    with _input_errors():
        overrides = parse_map_options(maps or [])
        check_new_run_dir(run_dir)
        source = find_event_files(logdir, run)
        with _terminal_progress("reading event files", source.total_bytes,
                                in_bytes=True) as advance:
            series, warnings = read_event_files(source, advance)
        _print_warnings(warnings)
        imported_from = {
            "kind": "tensorboard", "path": str(logdir.resolve()), "run": source.run,
            "files": [path.relative_to(logdir).as_posix() for path, _ in source.files],
        }
        report = import_series(series, overrides, run_dir, imported_from,
                               source=source.label, noun="tag")
    typer.echo(report.render(), nl=False)


@import_app.command("csv")
def import_csv(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="A Lightning CSVLogger metrics.csv or a W&B "
                       "history export."),
    ],
    run_dir: NewRunDirArgument,
    maps: MapOption = None,
    step_column: Annotated[
        Optional[str],
        typer.Option("--step-column", metavar="NAME",
                     help="The column of the optimizer step. Default: step for a Lightning "
                     "metrics.csv, _step for a W&B export."),
    ] = None,
) -> None:
    """Import the metrics of a CSV file as a new run directory."""
    from runlens.importers import import_series, parse_map_options
    from runlens.importers.csv_import import open_csv, read_csv
    from runlens.importers.writer import check_new_run_dir

    with _input_errors():
        overrides = parse_map_options(maps or [])
        check_new_run_dir(run_dir)
        source = open_csv(file, step_column)
        with _terminal_progress("reading CSV", source.total_bytes, in_bytes=True) as advance:
            series, warnings = read_csv(source, advance)
        _print_warnings(warnings)
        imported_from = {"kind": source.kind, "path": str(file.resolve()),
                         "step_column": source.step_column, "time_column": source.time_column}
        report = import_series(series, overrides, run_dir, imported_from,
                               source=source.label, noun="column")
    typer.echo(report.render(), nl=False)


def _print_warnings(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"runlens: warning: {line}", err=True)


# allow_interspersed_args=False: the first argument that is not an option of `record`
# starts the command, so the program's own options are never read as runlens options.
@app.command("record", context_settings={"allow_interspersed_args": False})
def record(
    command: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="COMMAND",
                       help="The program to run, such as python train.py --epochs 3."),
    ] = None,
    run_dir: Annotated[
        Optional[Path],
        typer.Option("--run-dir", metavar="DIR",
                     help="Run directory to record into; an existing one gets a new "
                     "segment. Default: runs/<program name>-<UTC time>."),
    ] = None,
    param_stats_every: Annotated[
        int, typer.Option("--param-stats-every", metavar="N", min=1,
                          help="Steps between per-parameter statistics.")
    ] = 100,
    trajectory_every: Annotated[
        Optional[int],
        typer.Option("--trajectory-every", metavar="N", min=1,
                     help="Steps between points of the trajectory table. Default: off."),
    ] = None,
    trajectory_seed: Annotated[
        int, typer.Option("--trajectory-seed", metavar="N", min=0,
                          help="Seed of the trajectory's random directions.")
    ] = 0,
    flush_every: Annotated[
        int, typer.Option("--flush-every", metavar="N", min=1,
                          help="Steps between writes of Parquet parts.")
    ] = 500,
    flush_seconds: Annotated[
        float, typer.Option("--flush-seconds", metavar="SECONDS",
                            help="Seconds between writes of Parquet parts.")
    ] = 10.0,
    activations: Annotated[
        bool, typer.Option("--activations/--no-activations",
                           help="Record the activations table from forward hooks.")
    ] = True,
) -> None:
    """Run a Python training program with the recorder on, without changing its code."""
    from runlens.record_command import RecordOptions, run_record

    options = RecordOptions(param_stats_every=param_stats_every,
                            trajectory_every=trajectory_every, trajectory_seed=trajectory_seed,
                            flush_every=flush_every, flush_seconds=flush_seconds,
                            watch_activations=activations)
    with _input_errors():
        exit_code = run_record(command or [], run_dir, options)
    raise typer.Exit(exit_code)


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
