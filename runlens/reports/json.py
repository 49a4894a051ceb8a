"""JSON report: `Report.to_dict`, the stable machine-readable form described in docs/cli.md."""

from __future__ import annotations

import json

from runlens.analyze.findings import Report


def render_json(report: Report, fail_on: str) -> str:
    # allow_nan=False: evidence already has NaN and inf as null, and the output must
    # stay strict JSON that any parser reads.
    return json.dumps(report.to_dict(fail_on), indent=2, allow_nan=False) + "\n"
