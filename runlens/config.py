"""Configuration files: find and validate them, and merge them with the command line.

runlens reads the ``[tool.runlens]`` table of a ``pyproject.toml``, or the top level of a
``runlens.toml``. Without ``--config``, it searches from the current directory upward to
the filesystem root, stopping after the first folder that contains ``.git``. In each
folder a ``runlens.toml`` wins over a ``pyproject.toml``, and a ``pyproject.toml``
without ``[tool.runlens]`` is skipped.

Command-line options override the file: ``--fail-on``, ``--select`` and ``--ignore``
replace its values, ``--set`` wins over ``params`` for the same parameter, and ``--rules``
adds to ``rules``. Every error names the file and the key, as written in the file.
docs/configuration.md describes the keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the package it was added from.
    import tomli as tomllib

from runlens.analyze.errors import RunlensError, os_error_reason
from runlens.analyze.findings import SEVERITIES
from runlens.analyze.rules import Param, Rule, _bounds_problem, apply_overrides, load_rules
from runlens.waivers import Waiver

CONFIG_FILE_NAME = "runlens.toml"
PYPROJECT_FILE_NAME = "pyproject.toml"
PYPROJECT_PREFIX = "tool.runlens."
FAIL_ON_LEVELS = (*SEVERITIES, "never")
DEFAULT_FAIL_ON = "error"

# Sources that `runlens config` prints next to each value; a file's source is its path.
DEFAULT_SOURCE = "default"
COMMAND_LINE_SOURCE = "command line"

KEYS = ("select", "ignore", "severity", "params", "fail-on", "rules", "no-builtin", "waivers")
WAIVER_KEYS = ("rule", "reason", "expires", "run", "steps", "match")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ConfigError(RunlensError):
    """A configuration file or option that is unreadable, invalid, or names unknown rules."""


@dataclass(frozen=True)
class Sourced:
    """A setting's value and where it came from: "default", a file path or "command line"."""

    value: Any
    source: str


@dataclass(frozen=True)
class CommandLine:
    """The rule and gating options of a command. None means the option was not given."""

    rules: Sequence[Path] = ()
    builtin: bool | None = None
    overrides: Sequence[str] = ()
    select: Sequence[str] | None = None
    ignore: Sequence[str] | None = None
    fail_on: str | None = None


@dataclass(frozen=True)
class ConfigFile:
    """A configuration file whose keys have valid types.

    Attributes:
        prefix: ``tool.runlens.`` for a pyproject.toml, empty for a runlens.toml, so that
            messages name each key as the file spells it.
        values: key -> checked value, for the keys that the file sets, except waivers.
            `rules` contains paths resolved against the file's folder.
    """

    path: Path
    prefix: str
    values: dict[str, Any]
    waivers: tuple[Waiver, ...]

    def problem(self, key: str, text: str) -> str:
        return f"{self.path}: key '{self.prefix}{key}': {text}"


@dataclass(frozen=True)
class Settings:
    """The effective configuration, each value with its source.

    Attributes:
        file_note: how the configuration file was found, or why there is none.
        select: the rule ids and categories to keep, or None for every loaded rule.
        params: rule id -> param name -> value, from the file only. The command line's
            ``--set`` values are in `overrides`, applied after these.
    """

    file: ConfigFile | None
    file_note: str
    fail_on: Sourced
    no_builtin: Sourced
    rules: tuple[Sourced, ...]
    select: Sourced
    ignore: Sourced
    severity: dict[str, Sourced]
    params: dict[str, dict[str, Sourced]]
    overrides: tuple[str, ...]
    waivers: tuple[Waiver, ...]

    @property
    def rule_paths(self) -> list[Path]:
        return [Path(item.value) for item in self.rules]


@dataclass(frozen=True)
class RuleSet:
    """The rules to evaluate, after severity overrides, params, select and ignore.

    Attributes:
        ignored: loaded rule ids that `ignore` removed.
        not_selected: loaded rule ids that `select` left out and `ignore` did not name.
        params: ``rule.param`` -> final value with its source, for each param set by the
            file or by ``--set``.
    """

    rules: list[Rule]
    loaded: int
    ignored: list[str]
    not_selected: list[str]
    severity: dict[str, Sourced]
    params: dict[str, Sourced] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Finding and reading the file


def discover_config(start: Path) -> ConfigFile | None:
    """Return the first configuration file from `start` upward, or None if there is none.

    The search stops after the filesystem root or the first folder with a ``.git`` entry.

    Raises:
        ConfigError: a file found on the way does not parse or has invalid keys.
    """
    for folder in (start, *start.parents):
        candidate = folder / CONFIG_FILE_NAME
        if candidate.is_file():
            return read_config_file(candidate)
        pyproject = folder / PYPROJECT_FILE_NAME
        if pyproject.is_file():
            found = read_config_file(pyproject, require_table=False)
            if found is not None:
                return found
        if (folder / ".git").exists():
            return None
    return None


def read_config_file(path: Path, *, require_table: bool = True) -> ConfigFile | None:
    """Read and check a runlens.toml, or the ``[tool.runlens]`` table of a pyproject.toml.

    Returns None for a pyproject.toml without that table, unless `require_table` is true.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key is unknown or of the
            wrong type; one line per problem.
    """
    document = _read_toml(path)
    if path.name != PYPROJECT_FILE_NAME:
        return _check_table(path, "", document)

    tool = document.get("tool", {})
    table = tool.get("runlens") if isinstance(tool, dict) else None
    if table is None:
        if require_table:
            raise ConfigError(f"{path}: has no [tool.runlens] table; add one, or pass a "
                              f"{CONFIG_FILE_NAME} with --config")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'tool.runlens': expected a table, got "
                          f"{_describe(table)}; write the settings under [tool.runlens]")
    return _check_table(path, PYPROJECT_PREFIX, table)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found; fix the path given to "
                          "--config") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file: "
                          f"{os_error_reason(error)}; make it a readable file, or pass "
                          "--no-config") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text ({error.reason} at byte "
                          f"{error.start}); save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}; fix the syntax, or pass "
                          "--no-config to ignore the file") from None


# ---------------------------------------------------------------------------------------
# Checking the keys of the file


def _check_table(path: Path, prefix: str, table: dict[str, Any]) -> ConfigFile:
    file = ConfigFile(path, prefix, {}, ())
    problems: list[str] = []
    values: dict[str, Any] = {}
    waivers: tuple[Waiver, ...] = ()
    for key, value in table.items():
        if key not in KEYS:
            problems.append(file.problem(key, _unknown_key_text(key, KEYS)))
        elif key == "waivers":
            waivers = _check_waivers(file, value, problems)
        else:
            checked = _KEY_CHECKS[key](file, value, problems)
            if checked is not None:
                values[key] = checked
    if problems:
        raise ConfigError("\n".join(problems))
    return ConfigFile(path, prefix, values, waivers)


def _unknown_key_text(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}valid keys: {', '.join(known)}"


def _check_name_list(file: ConfigFile, key: str, value: Any,
                     problems: list[str]) -> list[str] | None:
    names_ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if not names_ok:
        problems.append(file.problem(key, (
            f"expected an array of rule ids or categories, got {_describe(value)}; write it "
            f"as {key} = [\"loss-spike\", \"mixed-precision\"]")))
        return None
    return list(value)


def _check_select(file: ConfigFile, value: Any, problems: list[str]) -> list[str] | None:
    return _check_name_list(file, "select", value, problems)


def _check_ignore(file: ConfigFile, value: Any, problems: list[str]) -> list[str] | None:
    return _check_name_list(file, "ignore", value, problems)


def _check_severity(file: ConfigFile, value: Any,
                    problems: list[str]) -> dict[str, str] | None:
    if not isinstance(value, dict):
        problems.append(file.problem("severity", (
            f"expected a table of rule id = severity, got {_describe(value)}; write it as "
            f"[{file.prefix}severity] with lines such as loss-spike = \"warning\"")))
        return None
    checked = {}
    for rule_id, severity in value.items():
        if severity not in SEVERITIES:
            problems.append(file.problem(f"severity.{rule_id}", (
                f"{_describe(severity)} is not a severity; use one of "
                f"{', '.join(SEVERITIES)}")))
        else:
            checked[rule_id] = severity
    return checked


def _check_params(file: ConfigFile, value: Any,
                  problems: list[str]) -> dict[str, dict[str, Any]] | None:
    example = (f"[{file.prefix}params.clipping-every-step] with lines such as "
               "min_share = 0.95")
    if not isinstance(value, dict):
        problems.append(file.problem("params", (
            f"expected a table of rule id = table of param = value, got {_describe(value)}; "
            f"write it as {example}")))
        return None
    checked: dict[str, dict[str, Any]] = {}
    for rule_id, params in value.items():
        if not isinstance(params, dict):
            problems.append(file.problem(f"params.{rule_id}", (
                f"expected a table of param = value, got {_describe(params)}; write it as "
                f"{example}")))
            continue
        checked[rule_id] = {}
        for name, param_value in params.items():
            if isinstance(param_value, (bool, int, float, str)):
                checked[rule_id][name] = param_value
            else:
                problems.append(file.problem(f"params.{rule_id}.{name}", (
                    f"expected a string, integer, float or boolean, got "
                    f"{_describe(param_value)}")))
    return checked


def _check_fail_on(file: ConfigFile, value: Any, problems: list[str]) -> str | None:
    if value not in FAIL_ON_LEVELS:
        problems.append(file.problem("fail-on", (
            f"{_describe(value)} is not a level; use one of {', '.join(FAIL_ON_LEVELS)}")))
        return None
    return value


def _check_rules(file: ConfigFile, value: Any, problems: list[str]) -> list[Path] | None:
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        problems.append(file.problem("rules", (
            f"expected an array of rule files or folders, got {_describe(value)}; write it "
            "as rules = [\"ci/rules\"], relative to this file's folder")))
        return None
    paths = []
    for index, text in enumerate(value):
        path = file.path.parent / text
        if not path.exists():
            problems.append(file.problem(f"rules[{index}]", (
                f"{path}: rule file or folder not found; paths are relative to "
                f"{file.path.parent}, so fix the path or remove it")))
        paths.append(path)
    return paths


def _check_no_builtin(file: ConfigFile, value: Any, problems: list[str]) -> bool | None:
    if not isinstance(value, bool):
        problems.append(file.problem("no-builtin", (
            f"expected true or false, got {_describe(value)}")))
        return None
    return value


_KEY_CHECKS = {
    "select": _check_select,
    "ignore": _check_ignore,
    "severity": _check_severity,
    "params": _check_params,
    "fail-on": _check_fail_on,
    "rules": _check_rules,
    "no-builtin": _check_no_builtin,
}


def _check_waivers(file: ConfigFile, value: Any, problems: list[str]) -> tuple[Waiver, ...]:
    if not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        problems.append(file.problem("waivers", (
            f"expected an array of tables, got {_describe(value)}; write each waiver as a "
            f"[[{file.prefix}waivers]] section with rule, reason and expires")))
        return ()
    waivers = []
    for index, table in enumerate(value):
        waiver = _check_waiver(file, index, table, problems)
        if waiver is not None:
            waivers.append(waiver)
    return tuple(waivers)


def _check_waiver(file: ConfigFile, index: int, table: dict[str, Any],
                  problems: list[str]) -> Waiver | None:
    key = f"waivers[{index}]"
    count = len(problems)
    for name in table:
        if name not in WAIVER_KEYS:
            problems.append(file.problem(f"{key}.{name}", _unknown_key_text(name, WAIVER_KEYS)))

    rule = table.get("rule")
    if rule is None:
        problems.append(file.problem(f"{key}.rule", (
            "missing; name the rule to waive, such as rule = \"loss-spike\"")))
    elif not (isinstance(rule, str) and rule):
        problems.append(file.problem(f"{key}.rule", (
            f"expected a rule id, got {_describe(rule)}")))

    reason = table.get("reason")
    if reason is None:
        problems.append(file.problem(f"{key}.reason", (
            "missing; say why the finding is acceptable, such as reason = \"the data "
            "shard at step 4000 is known to be noisy\"")))
    elif not (isinstance(reason, str) and reason.strip()):
        problems.append(file.problem(f"{key}.reason", (
            f"expected a non-empty string, got {_describe(reason)}; say why the finding is "
            "acceptable")))

    expires = _check_expires(file, f"{key}.expires", table.get("expires"), problems)
    run = _optional_text(file, f"{key}.run", table.get("run"), "a glob such as "
                         "\"nightly-*\"", problems)
    match = _optional_text(file, f"{key}.match", table.get("match"), "a substring of the "
                           "finding's message", problems)
    steps = _check_steps(file, f"{key}.steps", table.get("steps"), problems)

    if len(problems) > count or expires is None:
        return None
    return Waiver(rule=rule, reason=reason.strip(), expires=expires,
                  origin=f"{file.path}, {file.prefix}{key}", run=run, steps=steps,
                  match=match)


def _check_expires(file: ConfigFile, key: str, value: Any,
                   problems: list[str]) -> datetime.date | None:
    example = "expires = 2030-06-30"
    if value is None:
        problems.append(file.problem(key, (
            f"missing; give the last day the waiver applies as YYYY-MM-DD, such as {example}")))
        return None
    # datetime is a subclass of date, so it is checked first.
    if isinstance(value, datetime.datetime) or not isinstance(value, (datetime.date, str)):
        problems.append(file.problem(key, (
            f"expected a date YYYY-MM-DD, got {_describe(value)}; write it as {example}")))
        return None
    if isinstance(value, datetime.date):
        return value
    if ISO_DATE.fullmatch(value):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    problems.append(file.problem(key, (
        f"{value!r} is not a valid date YYYY-MM-DD; write it as {example}")))
    return None


def _optional_text(file: ConfigFile, key: str, value: Any, expected: str,
                   problems: list[str]) -> str | None:
    if value is None:
        return None
    if not (isinstance(value, str) and value):
        problems.append(file.problem(key, f"expected {expected}, got {_describe(value)}"))
        return None
    return value


def _check_steps(file: ConfigFile, key: str, value: Any,
                 problems: list[str]) -> tuple[int, int] | None:
    if value is None:
        return None
    is_pair = (isinstance(value, list) and len(value) == 2
               and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not is_pair:
        problems.append(file.problem(key, (
            f"expected [start, end] with two integer steps, got {_describe(value)}; write it "
            "as steps = [4000, 4200]")))
        return None
    start, end = value
    if start > end:
        problems.append(file.problem(key, (
            f"start {start} is after end {end}; write the smaller step first")))
        return None
    return (start, end)


def _describe(value: Any) -> str:
    """Name a TOML value's type and show it, such as ``string 'warn'``."""
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, datetime.datetime):
        kind = "date-time"
    else:
        kinds = {int: "integer", float: "float", str: "string", datetime.date: "date",
                 datetime.time: "time", list: "array", dict: "table"}
        kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


# ---------------------------------------------------------------------------------------
# Merging the file with the command line


def resolve_settings(command_line: CommandLine, *, config_path: Path | None = None,
                     no_config: bool = False, cwd: Path | None = None) -> Settings:
    """Find or read the configuration file and merge it with `command_line`.

    `config_path` names the file explicitly; otherwise the search starts at `cwd`
    (default: the current directory). `no_config` ignores every file.

    Raises:
        ConfigError: both `config_path` and `no_config`, or a file that is invalid, or
            no-builtin from the file with no rules to load.
    """
    file, file_note = _find_file(config_path, no_config, cwd or Path.cwd())
    values = file.values if file else {}
    source = str(file.path) if file else DEFAULT_SOURCE

    def pick(key: str, cli_value: Any, default: Any) -> Sourced:
        if cli_value is not None:
            return Sourced(cli_value, COMMAND_LINE_SOURCE)
        if key in values:
            return Sourced(values[key], source)
        return Sourced(default, DEFAULT_SOURCE)

    no_builtin = pick("no-builtin", None if command_line.builtin is None
                      else not command_line.builtin, False)
    rules = tuple(Sourced(path, source) for path in values.get("rules", []))
    rules += tuple(Sourced(path, COMMAND_LINE_SOURCE) for path in command_line.rules)
    if no_builtin.value and not rules and file and no_builtin.source == source:
        raise ConfigError(file.problem("no-builtin", (
            "is true, but no rules are configured; add a 'rules' key, pass --rules PATH, "
            "or pass --builtin")))

    severity = {rule_id: Sourced(value, source)
                for rule_id, value in values.get("severity", {}).items()}
    params = {rule_id: {name: Sourced(value, source) for name, value in table.items()}
              for rule_id, table in values.get("params", {}).items()}
    return Settings(
        file=file,
        file_note=file_note,
        fail_on=pick("fail-on", command_line.fail_on, DEFAULT_FAIL_ON),
        no_builtin=no_builtin,
        rules=rules,
        select=pick("select", _split_names(command_line.select), None),
        ignore=pick("ignore", _split_names(command_line.ignore), []),
        severity=severity,
        params=params,
        overrides=tuple(command_line.overrides),
        waivers=file.waivers if file else (),
    )


def _find_file(config_path: Path | None, no_config: bool,
               cwd: Path) -> tuple[ConfigFile | None, str]:
    if config_path is not None and no_config:
        raise ConfigError(f"--config {config_path} and --no-config contradict each other; "
                          "pass only one of them")
    if no_config:
        return None, "none (--no-config)"
    if config_path is not None:
        return read_config_file(config_path), "named by --config"
    file = discover_config(cwd.resolve())
    if file is None:
        return None, f"none found from {cwd.resolve()} upward"
    return file, f"found from {cwd.resolve()} upward"


def _split_names(values: Sequence[str] | None) -> list[str] | None:
    """Split repeated, comma-separated --select or --ignore values into names."""
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


# ---------------------------------------------------------------------------------------
# Building the rule set


def build_rule_set(settings: Settings) -> RuleSet:
    """Load the rules and apply severity overrides, params, ``--set``, select and ignore.

    Severity overrides replace each Rule's severity before evaluation, so findings carry
    the new severity. ``--set`` values are applied after the file's params, so they win.

    Raises:
        RuleFileError: a rule file is invalid.
        ConfigError: a key or option names an unknown rule, category or param, a param
            value has the wrong type or is out of bounds, or no rule is left to evaluate.
        ParamOverrideError: a ``--set`` value is invalid.
    """
    loaded = load_rules(settings.rule_paths, builtin=not settings.no_builtin.value)
    by_id = {rule.id: rule for rule in loaded}
    problems = _unknown_name_problems(settings, loaded)
    params: dict[str, Sourced] = {}
    for rule_id, table in settings.params.items():
        if rule_id not in by_id:
            problems.append(_file_problem(settings, f"params.{rule_id}",
                                          _unknown_rule_text(rule_id, list(by_id))))
            continue
        for name, sourced in table.items():
            rule = by_id[rule_id]
            key = f"params.{rule_id}.{name}"
            if name not in rule.params:
                problems.append(_file_problem(settings, key, (
                    f"rule '{rule_id}' has no param '{name}'; params: "
                    f"{', '.join(rule.params) or 'none'}")))
                continue
            value, problem = _param_value(rule.params[name], sourced.value)
            if problem:
                problems.append(_file_problem(settings, key, problem))
                continue
            param = dataclasses.replace(rule.params[name], value=value)
            by_id[rule_id] = dataclasses.replace(rule, params={**rule.params, name: param})
            params[f"{rule_id}.{name}"] = Sourced(value, sourced.source)
    if problems:
        raise ConfigError("\n".join(problems))

    for rule_id, sourced in settings.severity.items():
        by_id[rule_id] = dataclasses.replace(by_id[rule_id], severity=sourced.value)
    rules = apply_overrides([by_id[rule.id] for rule in loaded], settings.overrides)
    for override in settings.overrides:
        rule_id, _, name = override.partition("=")[0].strip().partition(".")
        value = next(rule for rule in rules if rule.id == rule_id).params[name.strip()].value
        params[f"{rule_id}.{name.strip()}"] = Sourced(value, COMMAND_LINE_SOURCE)

    return _select_rules(settings, rules, params)


def _select_rules(settings: Settings, rules: list[Rule],
                  params: dict[str, Sourced]) -> RuleSet:
    select = settings.select.value
    ignore = set(settings.ignore.value)
    selected, ignored, not_selected = [], [], []
    for rule in rules:
        if rule.id in ignore or rule.category in ignore:
            ignored.append(rule.id)
        elif select is not None and rule.id not in select and rule.category not in select:
            not_selected.append(rule.id)
        else:
            selected.append(rule)
    if not selected:
        raise ConfigError(
            f"no rules left to evaluate: select (from {settings.select.source}) and ignore "
            f"(from {settings.ignore.source}) exclude all {len(rules)} loaded rules; widen "
            "select or shorten ignore")
    return RuleSet(selected, len(rules), ignored, not_selected, dict(settings.severity),
                   params)


def _setting_problem(settings: Settings, sourced: Sourced, key: str, option: str,
                     text: str) -> str:
    """Phrase a problem with the file's key, or with the command-line option."""
    if sourced.source == COMMAND_LINE_SOURCE or settings.file is None:
        return f"{option}: {text}"
    return settings.file.problem(key, text)


def _file_problem(settings: Settings, key: str, text: str) -> str:
    # Only a file sets severity, params and waivers, so `settings.file` is set here.
    assert settings.file is not None
    return settings.file.problem(key, text)


def _unknown_name_problems(settings: Settings, loaded: list[Rule]) -> list[str]:
    ids = sorted(rule.id for rule in loaded)
    categories = sorted({rule.category for rule in loaded})
    problems = []
    for key in ("select", "ignore"):
        sourced: Sourced = getattr(settings, key)
        for index, name in enumerate(sourced.value or []):
            if name in ids or name in categories:
                continue
            close = difflib.get_close_matches(name, ids + categories, n=1)
            hint = (f"did you mean '{close[0]}'?" if close else
                    f"categories: {', '.join(categories)}; rule ids: {', '.join(ids)}")
            text = f"unknown rule id or category '{name}'; {hint}"
            problems.append(_setting_problem(settings, sourced, f"{key}[{index}]",
                                             f"--{key} {name}", text))
    for rule_id in settings.severity:
        if rule_id not in ids:
            problems.append(_file_problem(settings, f"severity.{rule_id}",
                                          _unknown_rule_text(rule_id, ids)))
    for index, waiver in enumerate(settings.waivers):
        if waiver.rule not in ids:
            problems.append(_file_problem(settings, f"waivers[{index}].rule",
                                          _unknown_rule_text(waiver.rule, ids)))
    return problems


def _unknown_rule_text(rule_id: str, ids: list[str]) -> str:
    close = difflib.get_close_matches(rule_id, ids, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"rule ids: {', '.join(sorted(ids))}"
    return f"unknown rule id '{rule_id}'; {hint}"


def _param_value(param: Param, value: Any) -> tuple[Any, str | None]:
    """Check a TOML value against a param's type and bounds, as ``--set`` checks text.

    Returns the value to bind (an integer for a number param becomes a float, as
    ``--set`` parses it) and None, or None and the problem.
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    expected = {"integer": "an integer", "number": "a finite number",
                "boolean": "true or false", "string": "a string"}[param.type]
    if param.type == "integer":
        valid = is_number and isinstance(value, int)
    elif param.type == "number":
        valid = is_number and math.isfinite(value)
    elif param.type == "boolean":
        valid = isinstance(value, bool)
    else:
        valid = isinstance(value, str)
    if not valid:
        if isinstance(value, str):
            hint = "; write the value without quotes"
        elif param.type == "string":
            hint = "; put the value in quotes"
        else:
            hint = ""
        return None, f"param '{param.name}' expects {expected}, got {_describe(value)}{hint}"
    if param.type == "number":
        value = float(value)
    problem = _bounds_problem(value, param.minimum, param.maximum)
    if problem:
        return None, f"param '{param.name}': {problem}"
    return value, None


# ---------------------------------------------------------------------------------------
# Printing the effective configuration (`runlens config`)


def describe_settings(settings: Settings, rule_set: RuleSet,
                      today: datetime.date | None = None) -> dict[str, Any]:
    """Return the effective configuration and its sources as JSON values.

    `today` (default ``datetime.date.today()``) decides which waivers are marked expired.
    """
    today = today or datetime.date.today()
    params: dict[str, dict[str, Any]] = {}
    for key, sourced in rule_set.params.items():
        rule_id, _, name = key.partition(".")
        params.setdefault(rule_id, {})[name] = _sourced_dict(sourced)
    return {
        "config_file": str(settings.file.path) if settings.file else None,
        "config_file_note": settings.file_note,
        "settings": {
            "fail-on": _sourced_dict(settings.fail_on),
            "no-builtin": _sourced_dict(settings.no_builtin),
            "rules": [_sourced_dict(item) for item in settings.rules],
            "select": _sourced_dict(settings.select),
            "ignore": _sourced_dict(settings.ignore),
            "severity": {rule_id: _sourced_dict(item)
                         for rule_id, item in rule_set.severity.items()},
            "params": params,
            "waivers": [waiver.to_dict(today) for waiver in settings.waivers],
        },
        "rule_set": {
            "loaded": rule_set.loaded,
            "selected": len(rule_set.rules),
            "selected_rules": [rule.id for rule in rule_set.rules],
            "ignored": list(rule_set.ignored),
            "not_selected": list(rule_set.not_selected),
            "severity_overrides": len(rule_set.severity),
            "params_set": len(rule_set.params),
        },
    }


def _sourced_dict(sourced: Sourced) -> dict[str, Any]:
    value = sourced.value
    if isinstance(value, Path):
        value = str(value)
    elif isinstance(value, list):
        value = [str(item) if isinstance(item, Path) else item for item in value]
    return {"value": value, "source": sourced.source}


def render_settings_text(settings: Settings, rule_set: RuleSet,
                         today: datetime.date | None = None) -> str:
    """Render the effective configuration as a table of key, value and source."""
    today = today or datetime.date.today()
    rows = [("KEY", "VALUE", "SOURCE")]
    rows.append(("fail-on", settings.fail_on.value, settings.fail_on.source))
    rows.append(("no-builtin", _toml_text(settings.no_builtin.value),
                 settings.no_builtin.source))
    rows += [("rules", str(item.value), item.source) for item in settings.rules] or [
        ("rules", "(none)", DEFAULT_SOURCE)]
    select = settings.select.value
    rows.append(("select", "all rules" if select is None else _names_text(select),
                 settings.select.source))
    rows.append(("ignore", _names_text(settings.ignore.value), settings.ignore.source))
    rows += [("severity", f"{rule_id} = {item.value}", item.source)
             for rule_id, item in rule_set.severity.items()] or [
        ("severity", "(none)", DEFAULT_SOURCE)]
    rows += [("params", f"{key} = {_toml_text(item.value)}", item.source)
             for key, item in rule_set.params.items()] or [
        ("params", "(none)", DEFAULT_SOURCE)]
    rows += [("waivers", _waiver_text(waiver, today), waiver.origin)
             for waiver in settings.waivers] or [("waivers", "(none)", DEFAULT_SOURCE)]

    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    table = [f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}"
             for row in rows]
    file_line = (f"Configuration file: {settings.file.path} ({settings.file_note})"
                 if settings.file else f"Configuration file: {settings.file_note}")
    rule_lines = [
        f"Rule set: {len(rule_set.rules)} of {rule_set.loaded} loaded rules selected",
        f"  ignored: {_names_text(rule_set.ignored)}",
        f"  not selected: {_names_text(rule_set.not_selected)}",
        f"  severity overrides: {len(rule_set.severity)}",
        f"  params set: {len(rule_set.params)}",
    ]
    return "\n".join([file_line, "", *table, "", *rule_lines]) + "\n"


def _names_text(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "(none)"


def _toml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _waiver_text(waiver: Waiver, today: datetime.date) -> str:
    parts = [f"{waiver.rule} until {waiver.expires.isoformat()}"]
    if waiver.is_expired(today):
        parts.append("(expired)")
    if waiver.run is not None:
        parts.append(f"run={waiver.run}")
    if waiver.steps is not None:
        parts.append(f"steps={waiver.steps[0]}-{waiver.steps[1]}")
    if waiver.match is not None:
        parts.append(f"match={waiver.match!r}")
    return " ".join(parts)
