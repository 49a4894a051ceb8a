"""Rule files: find, parse and validate them, and apply ``--set`` overrides.

A rule file is one YAML mapping, and `rule_schema.json` checks its shape. This module
then checks what a schema cannot express:

- the query is exactly one SELECT, and every ``$name`` in it is a declared parameter;
- param defaults match their types and bounds;
- required tables exist in the run format;
- the message template names columns only;
- the query binds against the run's views, empty, and its result has the step columns
  and every column that the message names (see `query_check`).

Every error names the file, the rule id and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import duckdb
import jsonschema
import yaml

from runlens import format as fmt
from runlens.analyze.errors import ParamOverrideError, RuleFileError, single_line
from runlens.analyze.messages import template_problems
from runlens.analyze.query_check import query_result_problems
from runlens.analyze.run import METADATA_VIEWS

RULE_SUFFIXES = (".yaml", ".yml")
# The --set example for a malformed override when no loaded rule has a parameter.
OVERRIDE_EXAMPLE = "clipping-every-step.min_share=0.95"
SCHEMA_PATH = Path(__file__).with_name("rule_schema.json")


@dataclass(frozen=True)
class Reference:
    title: str
    url: str


@dataclass(frozen=True)
class Param:
    """A rule parameter. `value` is the default unless a ``--set`` override changed it."""

    name: str
    type: str
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    value: Any = None


@dataclass(frozen=True)
class Rule:
    """A validated rule file.

    Attributes:
        requires: table -> the columns that the query reads.
        query_params: the parameter names that the query reads as ``$name``.
        docs: relative path of the rule's documentation page.
        source: the file the rule was loaded from.
    """

    id: str
    title: str
    severity: str
    category: str
    description: str
    remediation: str
    references: tuple[Reference, ...]
    params: dict[str, Param]
    requires: dict[str, tuple[str, ...]]
    query: str
    message: str
    docs: str
    source: Path
    query_params: frozenset[str] = frozenset()

    def bound_params(self) -> dict[str, Any]:
        """Return the values to bind to the query's ``$name`` parameters."""
        return {name: self.params[name].value for name in sorted(self.query_params)}


def builtin_rules_dir() -> Path:
    """Return the folder of built-in rules.

    An installed wheel carries them in ``runlens/builtin_rules``. A source checkout or an
    editable install reads the top-level ``rules/`` folder of the repository.
    """
    package_dir = Path(__file__).resolve().parents[1]
    installed = package_dir / "builtin_rules"
    if installed.is_dir():
        return installed
    checkout = package_dir.parent / "rules"
    if checkout.is_dir():
        return checkout
    raise RuleFileError(
        f"built-in rules not found in {installed} or {checkout}; "
        "reinstall runlens, or pass --no-builtin"
    )


def find_rule_files(path: str | os.PathLike[str]) -> list[Path]:
    """Return the rule file at `path`, or every .yaml and .yml file under the folder.

    Raises:
        RuleFileError: `path` does not exist, or is a folder without rule files.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RuleFileError(f"{path}: rule file or folder not found")
    files = {
        file
        for suffix in RULE_SUFFIXES
        for file in path.rglob(f"*{suffix}")
        if file.is_file() and not file.name.startswith(".")
    }
    if not files:
        suffixes = ", ".join(RULE_SUFFIXES)
        raise RuleFileError(f"no rule files ({suffixes}) found in {path}")
    return sorted(files)


def load_rules(
    paths: Iterable[str | os.PathLike[str]] = (), *, builtin: bool = True
) -> list[Rule]:
    """Load the built-in rules (unless `builtin` is false) and the rules under `paths`.

    Raises:
        RuleFileError: one line per problem, across all files, including rule ids that
            two files share.
    """
    sources = ([builtin_rules_dir()] if builtin else []) + [Path(p) for p in paths]
    files: dict[Path, Path] = {}
    for source in sources:
        for file in find_rule_files(source):
            files.setdefault(file.resolve(), file)

    rules: list[Rule] = []
    problems: list[str] = []
    for file in files.values():
        try:
            rules.append(load_rule_file(file))
        except RuleFileError as error:
            problems += error.lines
    problems += duplicate_id_problems(rules)
    if problems:
        raise RuleFileError("\n".join(problems))
    return rules


def duplicate_id_problems(rules: Sequence[Rule]) -> list[str]:
    first_source: dict[str, Path] = {}
    problems = []
    for rule in rules:
        if rule.id in first_source:
            problems.append(
                f"{rule.source}: rule '{rule.id}': field 'id': also defined in "
                f"{first_source[rule.id]}; rule ids must be unique, so rename one"
            )
        first_source.setdefault(rule.id, rule.source)
    return problems


def load_rule_file(path: str | os.PathLike[str]) -> Rule:
    """Parse and validate one rule file.

    Raises:
        RuleFileError: one line per problem, each naming the file, the rule id and the field.
    """
    path = Path(path)
    document = _read_yaml(path)
    rule_id = document.get("id") if isinstance(document.get("id"), str) else None
    prefix = f"{path}: rule '{rule_id}'" if rule_id else f"{path}"

    problems = _schema_problems(document)
    if not problems:
        problems = _semantic_problems(document)
    if not problems:
        problems = _query_result_problems(document)
    if problems:
        lines = dict.fromkeys(f"{prefix}: field '{field}': {text}" for field, text in problems)
        raise RuleFileError("\n".join(lines))
    return _build_rule(document, path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RuleFileError(f"{path}: cannot read rule file: {error}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RuleFileError(f"{path}: invalid YAML: {_yaml_problem(error)}") from None
    if not isinstance(document, dict):
        kind = "an empty file" if document is None else f"a {type(document).__name__}"
        raise RuleFileError(f"{path}: expected a mapping of rule fields, got {kind}")
    return document


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1} column {mark.column + 1}"


@cache
def _schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _schema_problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (field, problem) pairs for every place the document breaks the schema."""
    problems = []
    errors = sorted(_schema_validator().iter_errors(document), key=lambda e: list(map(str, e.path)))
    for error in errors:
        problems += _describe_schema_error(error)
    return problems


def _field_name(path: Iterable[Any]) -> str:
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        elif name:
            name += f".{part}"
        else:
            name = str(part)
    return name


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


# Plain-language explanations of the schema's patterns, keyed by the field they apply to.
_PATTERN_HINTS = {
    "id": "use lowercase words and digits joined by '-', such as 'amp-skipped-steps'",
    "category": "use lowercase words and digits joined by '-', such as 'mixed-precision'",
    "url": "use an http:// or https:// URL",
    "docs": "use a relative path inside the repository, without '..'",
}


def _describe_schema_error(error: jsonschema.ValidationError) -> list[tuple[str, str]]:
    field = _field_name(error.absolute_path)
    instance = error.instance
    kind = error.validator

    if kind == "required":
        missing = [name for name in error.validator_value if name not in instance]
        return [(_join(field, name), "missing; this field is required") for name in missing]
    if kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [name for name in instance if name not in allowed]
        text = f"unknown field; allowed fields: {', '.join(allowed)}"
        return [(_join(field, str(name)), text) for name in extra]
    if kind == "enum":
        choices = ", ".join(map(str, error.validator_value))
        return [(field, f"{instance!r} is not one of {choices}")]

    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [(field, f"expected {expected}, got {_short_repr(instance)}")]
    if kind == "pattern":
        return [(field, _pattern_problem(error))]
    if kind == "minLength":
        return [(field, "must not be empty")]
    if kind == "minProperties":
        return [(field, "must name at least one table, such as 'scalars: [step, loss]'")]
    if kind == "uniqueItems":
        return [(field, "lists a column more than once")]
    return [(field, error.message)]


def _pattern_problem(error: jsonschema.ValidationError) -> str:
    if "propertyNames" in error.relative_schema_path:
        return f"name {error.instance!r} is invalid; use lowercase letters, digits and '_'"
    last = str(error.absolute_path[-1]) if error.absolute_path else ""
    hint = _PATTERN_HINTS.get(last, f"expected a match for {error.validator_value}")
    return f"{error.instance!r} is invalid; {hint}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _semantic_problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (field, problem) pairs for checks beyond the schema."""
    params = document.get("params") or {}
    problems = []
    for name, spec in params.items():
        problems += _param_problems(f"params.{name}", spec)
    problems += _requires_problems(document["requires"])
    problems += _query_problems(document["query"], set(params))
    problems += [("message", text) for text in template_problems(document["message"])]
    return problems


def _query_result_problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (field, problem) pairs from binding the query to the run's empty views."""
    params = document.get("params") or {}
    statement = duckdb.extract_statements(document["query"])[0]
    defaults = {name: params[name]["default"] for name in statement.named_parameters}
    return query_result_problems(
        document["query"], defaults, document["requires"], document["message"]
    )


def _param_problems(field: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    kind = spec["type"]
    default = spec["default"]
    problem = _value_type_problem(kind, default)
    if problem:
        return [(f"{field}.default", problem)]
    problems = []
    for bound in ("minimum", "maximum"):
        if bound in spec and kind not in ("integer", "number"):
            problems.append((f"{field}.{bound}", f"applies to integer and number params only, "
                             f"not to a {kind} param"))
    if problems:
        return problems
    low, high = spec.get("minimum"), spec.get("maximum")
    if low is not None and high is not None and low > high:
        return [(f"{field}.minimum", f"{low} is greater than maximum {high}")]
    bound_problem = _bounds_problem(default, low, high)
    return [(f"{field}.default", bound_problem)] if bound_problem else []


def _value_type_problem(kind: str, value: Any) -> str | None:
    """Return why `value` is not of the param type `kind`, or None if it is."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "integer" and not (is_number and isinstance(value, int)):
        return f"expected an integer, got {_short_repr(value)}"
    if kind == "number" and not is_number:
        if isinstance(value, str) and _parses_as_float(value):
            return (
                f"expected a number, got the string {value!r}, because YAML reads an "
                "exponent without a decimal point as text; write it as 1.0e-3, not 1e-3"
            )
        return f"expected a number, got {_short_repr(value)}"
    if kind == "number" and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if kind == "string" and not isinstance(value, str):
        return f"expected a string, got {_short_repr(value)}; quote it in YAML"
    if kind == "boolean" and not isinstance(value, bool):
        return f"expected true or false, got {_short_repr(value)}"
    return None


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bounds_problem(value: Any, low: float | None, high: float | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if low is not None and value < low:
        return f"{value!r} is below the minimum {low}"
    if high is not None and value > high:
        return f"{value!r} is above the maximum {high}"
    return None


def _requires_problems(requires: dict[str, list[str]]) -> list[tuple[str, str]]:
    known = list(fmt.TABLES) + list(METADATA_VIEWS)
    return [
        (f"requires.{table}", f"unknown table; tables are: {', '.join(known)}")
        for table in requires
        if table not in known
    ]


def _query_problems(query: str, declared: set[str]) -> list[tuple[str, str]]:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as error:
        return [("query", f"invalid SQL: {single_line(error)}")]
    if len(statements) != 1:
        return [("query", f"contains {len(statements)} statements; "
                 "a rule query must be exactly one SELECT")]
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        return [("query", f"is a {statement.type.name} statement; "
                 "a rule query must be one SELECT (CTEs allowed)")]

    used = set(statement.named_parameters)
    declared_text = ", ".join(sorted(declared)) or "none"
    problems = [
        ("query", f"uses ${name} but 'params' declares no such parameter "
         f"(declared: {declared_text}); declare it, or use $name for a declared one")
        for name in sorted(used - declared)
    ]
    problems += [
        (f"params.{name}", f"declared but the query never reads ${name}; use it or remove it")
        for name in sorted(declared - used)
    ]
    return problems


def _build_rule(document: dict[str, Any], path: Path) -> Rule:
    params = {
        name: Param(
            name=name,
            type=spec["type"],
            default=spec["default"],
            description=spec["description"],
            minimum=spec.get("minimum"),
            maximum=spec.get("maximum"),
            value=spec["default"],
        )
        for name, spec in (document.get("params") or {}).items()
    }
    references = tuple(Reference(r["title"], r["url"]) for r in document.get("references", []))
    statement = duckdb.extract_statements(document["query"])[0]
    return Rule(
        id=document["id"],
        title=document["title"],
        severity=document["severity"],
        category=document["category"],
        description=document["description"].strip(),
        remediation=document["remediation"].strip(),
        references=references,
        params=params,
        requires={table: tuple(cols) for table, cols in document["requires"].items()},
        query=document["query"],
        message=document["message"],
        docs=document.get("docs", f"docs/rules/{document['id']}.md"),
        source=path,
        query_params=frozenset(statement.named_parameters),
    )


def apply_overrides(rules: Sequence[Rule], overrides: Iterable[str]) -> list[Rule]:
    """Return `rules` with ``RULE.PARAM=VALUE`` overrides applied to param values.

    Raises:
        ParamOverrideError: malformed override, unknown rule or param (the message lists
            those that exist), or a value of the wrong type or out of bounds.
    """
    by_id = {rule.id: rule for rule in rules}
    example = _override_example(rules)
    for override in overrides:
        rule_id, name, text = _split_override(override, example)
        if rule_id not in by_id:
            known = ", ".join(sorted(by_id)) or "none loaded"
            raise ParamOverrideError(f"--set {override}: unknown rule '{rule_id}'; rules: {known}")
        rule = by_id[rule_id]
        if name not in rule.params:
            known = ", ".join(rule.params) or "none"
            raise ParamOverrideError(
                f"--set {override}: rule '{rule_id}' has no param '{name}'; params: {known}"
            )
        param = rule.params[name]
        value = _parse_override_value(override, param, text)
        params = {**rule.params, name: dataclasses.replace(param, value=value)}
        by_id[rule_id] = dataclasses.replace(rule, params=params)
    return [by_id[rule.id] for rule in rules]


def _override_example(rules: Sequence[Rule]) -> str:
    """Return a valid override for the first loaded rule that has a parameter."""
    for rule in rules:
        for param in rule.params.values():
            return f"{rule.id}.{param.name}={_override_text(param.default)}"
    return OVERRIDE_EXAMPLE


def _override_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _split_override(override: str, example: str) -> tuple[str, str, str]:
    key, equals, text = override.partition("=")
    rule_id, dot, name = key.strip().partition(".")
    if not equals or not dot or not rule_id or not name:
        raise ParamOverrideError(
            f"--set {override}: expected RULE.PARAM=VALUE, such as --set {example}"
        )
    return rule_id, name.strip(), text.strip()


_BOOLEAN_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse_override_value(override: str, param: Param, text: str) -> Any:
    try:
        if param.type == "integer":
            value: Any = int(text)
        elif param.type == "number":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
        elif param.type == "boolean":
            value = _BOOLEAN_TEXT[text.lower()]
        else:
            value = text
    except (ValueError, KeyError):
        expected = {"integer": "an integer", "number": "a finite number",
                    "boolean": "true or false"}[param.type]
        raise ParamOverrideError(
            f"--set {override}: param '{param.name}' expects {expected}, got {text!r}"
        ) from None
    problem = _bounds_problem(value, param.minimum, param.maximum)
    if problem:
        raise ParamOverrideError(f"--set {override}: param '{param.name}': {problem}")
    return value
