"""The analyzer: open a run directory, load rule files, evaluate them, report findings.

This package never imports torch, so CI machines without torch can analyze runs.

    from runlens.analyze import Run, evaluate, load_rules

    with Run.open("runs/exp42") as run:
        report = evaluate(run, load_rules())
"""

from __future__ import annotations

import logging

from runlens.analyze.engine import evaluate
from runlens.analyze.errors import ParamOverrideError, RuleFileError, RunError, RunlensError
from runlens.analyze.findings import Finding, NotEvaluated, Report, RuleFailure
from runlens.analyze.rules import (
    Rule,
    apply_overrides,
    builtin_rules_dir,
    load_rule_file,
    load_rules,
)
from runlens.analyze.run import Run

# The CLI prints what these loggers report, so a program that uses the analyzer as a
# library receives log records only when it configures logging.
logging.getLogger("runlens.analyze").addHandler(logging.NullHandler())

__all__ = [
    "Finding",
    "NotEvaluated",
    "ParamOverrideError",
    "Report",
    "Rule",
    "RuleFailure",
    "RuleFileError",
    "Run",
    "RunError",
    "RunlensError",
    "apply_overrides",
    "builtin_rules_dir",
    "evaluate",
    "load_rule_file",
    "load_rules",
]
