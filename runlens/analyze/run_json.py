"""Read ``run.json`` and check the fields that the analyzer reads.

`format_version` is checked first, so that a run written by a newer runlens is reported
as such and not as a list of unexpected fields. `run_schema.json` then checks the types
of `params`, `optimizer` and `segments`. Other fields are free.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from runlens import format as fmt
from runlens.analyze.errors import RunError, os_error_reason

SCHEMA_PATH = Path(__file__).with_name("run_schema.json")


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """Parse and check ``run.json`` in `run_dir`.

    Raises:
        RunError: the file cannot be read, is not a JSON object, has a format version
            this runlens does not read, or has a field of the wrong type (one line per
            field).
    """
    run_file = run_dir / fmt.RUN_FILE
    try:
        text = run_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise RunError(f"{run_file}: invalid {fmt.RUN_FILE}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise unreadable_path_error(run_file, "cannot read", error) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunError(
            f"{run_file}: invalid JSON at line {error.lineno} column {error.colno}: "
            f"{error.msg}; the file may be truncated, restore it from the training machine"
        ) from None
    if not isinstance(meta, dict):
        raise RunError(f"{run_file}: invalid {fmt.RUN_FILE}: expected a JSON object")
    _check_format_version(run_file, meta.get("format_version"))
    problems = _schema_problems(meta)
    if problems:
        raise RunError("\n".join(f"{run_file}: {problem}" for problem in problems))
    return meta


def unreadable_path_error(path: Path, action: str, error: OSError) -> RunError:
    """Return the RunError for a file or folder of the run that cannot be read."""
    return RunError(
        f"{path}: {action}: {os_error_reason(error)}; check that it is a regular "
        f"{'folder' if action.startswith('cannot list') else 'file'} and that this user "
        "may read it"
    )


def _check_format_version(run_file: Path, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise RunError(
            f"{run_file}: field 'format_version': expected an integer, got {version!r}"
        )
    if version < 1:
        raise RunError(
            f"{run_file}: field 'format_version': expected an integer of at least 1, "
            f"got {version}; the recorder writes {fmt.FORMAT_VERSION}"
        )
    if version > fmt.FORMAT_VERSION:
        raise RunError(
            f"{run_file}: field 'format_version': {version} is newer than this runlens "
            f"reads ({fmt.FORMAT_VERSION}); upgrade runlens to analyze this run"
        )


@cache
def _schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _schema_problems(meta: dict[str, Any]) -> list[str]:
    errors = sorted(_schema_validator().iter_errors(meta), key=lambda e: list(map(str, e.path)))
    return [_describe(error) for error in errors]


def _describe(error: jsonschema.ValidationError) -> str:
    field = _field_name(error.absolute_path)
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        names = ", ".join(f"'{_join(field, name)}'" for name in missing)
        return f"field {names}: missing; the analyzer reads it"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"field '{field}': expected {expected}, got {_short_repr(error.instance)}"
    return f"field '{field}': {error.message}"


def _field_name(path: Iterable[Any]) -> str:
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name = _join(name, str(part))
    return name


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _short_repr(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"
