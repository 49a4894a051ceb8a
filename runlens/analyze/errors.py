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
