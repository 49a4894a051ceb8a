"""The analyzer's one exception family.

Every error that bad input causes (a run directory, a rule file, a command-line value)
is a `RunlensError`. The CLI prints its message as ``runlens: error: ...`` and exits with
its `exit_code`, so a CI job can tell bad input (2) from findings (1).
"""

from __future__ import annotations

EXIT_INPUT_ERROR = 2


class RunlensError(Exception):
    """Bad input to the analyzer. The message names the file, the field and the fix.

    A message may span several lines, one per problem, for example one per invalid
    rule file.
    """

    exit_code = EXIT_INPUT_ERROR

    @property
    def lines(self) -> list[str]:
        return str(self).splitlines()


class RunError(RunlensError):
    """A run directory that is missing, malformed, corrupt or empty."""


class RuleFileError(RunlensError):
    """A rule file that does not parse or does not match the rule schema."""


class ParamOverrideError(RunlensError):
    """A ``--set RULE.PARAM=VALUE`` override that names no parameter or has a bad value."""


def single_line(error: BaseException | str) -> str:
    """Return an error message on one line, such as a DuckDB error for a one-line report.

    DuckDB puts hints (``Candidate bindings: ...``) and the query context (``LINE 1: ...``
    above a line with a ``^`` marker) on lines of their own. The marker lines go, the
    other lines are joined with spaces.
    """
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})


def os_error_reason(error: OSError) -> str:
    """Return the reason of an OSError in lowercase words, such as 'permission denied'."""
    reason = error.strerror or str(error)
    return reason[:1].lower() + reason[1:]
