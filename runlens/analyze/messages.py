"""Finding messages: Python format templates over the columns of one query row.

A template may name columns and give format specs (``{share:.0%}``), and nothing more.
Attribute and index access (``{x.__class__}``, ``{x[0]}``) is rejected, because a
template from an untrusted rule file must not reach into Python objects.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

# Text that a NULL column renders as. Format specs do not apply to it.
NULL_TEXT = "n/a"


class TemplateError(ValueError):
    """A message template that names no column, or reaches past a column's value."""


def template_problems(template: str) -> list[str]:
    """Return what is wrong with a message template, or an empty list if it is valid."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as error:
        return [f"invalid format template: {error}; write a literal brace as '{{{{' or '}}}}'"]
    problems = []
    for _, name, spec, _ in fields:
        if name is None:
            continue
        problem = _field_problem(name)
        if problem is None and spec and "{" in spec:
            problem = f"field {{{name}}} has a nested field in its format spec; write the spec out"
        if problem is not None:
            problems.append(problem)
    return problems


def template_fields(template: str) -> list[str]:
    """Return the column names that a valid template reads, in order, without repeats."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return list(dict.fromkeys(fields))


def _field_problem(name: str) -> str | None:
    if name == "" or name.isdigit():
        return "positional field {" + name + "}: name a result column, such as {step_start}"
    if "." in name or "[" in name:
        return f"field {{{name}}} uses attribute or index access; name a result column only"
    return None


class MessageFormatter(string.Formatter):
    """Formatter that looks fields up by column name only and renders NULL as n/a."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        problem = _field_problem(field_name)
        if problem is not None:
            raise TemplateError(problem)
        if field_name not in kwargs:
            columns = ", ".join(kwargs) or "none"
            raise TemplateError(
                f"message field {{{field_name}}} is not a column of the query result; "
                f"columns: {columns}"
            )
        return kwargs[field_name], field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None:
            return NULL_TEXT
        try:
            return super().format_field(value, format_spec)
        except (ValueError, TypeError) as error:
            raise TemplateError(
                f"format spec ':{format_spec}' does not apply to {value!r}: {error}"
            ) from None


def render_message(template: str, row: Mapping[str, Any]) -> str:
    """Render a template over one result row. Raises TemplateError on a bad field."""
    return MessageFormatter().vformat(template, (), row)
