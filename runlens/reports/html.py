"""Self-contained HTML report: the findings and a dashboard of charts drawn from the run.

The page needs no network: the charts are PNG images embedded as base64 data URIs, the
CSS is inline, and there are no scripts and no web fonts. It opens from disk in any
browser and survives being attached to a CI job as a single file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import runlens
from runlens.analyze.findings import SEVERITIES, Finding, Report
from runlens.reports import common

if TYPE_CHECKING:
    from runlens.analyze.run import Run
    from runlens.reports.charts import Chart

SEVERITY_HEADINGS = {"error": "Errors", "warning": "Warnings", "info": "Info"}

STYLE = """
:root { --error: #c62828; --warning: #b86200; --info: #1f6fb2; --muted: #5f6368;
        --line: #dadce0; --soft: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1280px; padding: 24px 28px 48px;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
       sans-serif; color: #1f2328; background: #fff; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 21px; margin: 36px 0 12px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 24px 0 8px; }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: var(--soft); padding: 1px 4px; border-radius: 4px; }
a { color: #0b57d0; }
.run, .counts { margin: 4px 0; }
.gate { margin: 12px 0; padding: 10px 14px; border-radius: 6px; font-weight: 600;
        background: #e6f4ea; border-left: 5px solid #188038; }
.gate.failed { background: #fce8e6; border-left-color: var(--error); }
nav { margin: 16px 0; font-size: 14px; }
nav a { margin-right: 14px; white-space: nowrap; }
figure { margin: 0 0 28px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; }
figcaption { font-size: 14px; color: var(--muted); margin-top: 6px; }
.finding { border: 1px solid var(--line); border-left: 5px solid var(--info);
           border-radius: 6px; padding: 10px 16px; margin: 0 0 14px; }
.finding.error { border-left-color: var(--error); }
.finding.warning { border-left-color: var(--warning); }
.finding h4 { margin: 0 0 4px; font-size: 16px; }
.finding p { margin: 6px 0; }
.where { color: var(--muted); font-size: 14px; }
.badge { display: inline-block; font-size: 12px; font-weight: 700; color: #fff;
         padding: 1px 8px; border-radius: 10px; margin-right: 6px; text-transform: uppercase;
         background: var(--info); vertical-align: 1px; }
.badge.error { background: var(--error); }
.badge.warning { background: var(--warning); }
.evidence { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr));
             gap: 2px 18px; margin: 8px 0; padding: 8px 12px; background: var(--soft);
             border-radius: 4px; font-size: 14px; }
.evidence div { display: flex; gap: 8px; min-width: 0; }
.evidence dt { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
               font-size: 13px; color: var(--muted); }
.evidence dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 14px; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 3px 10px; text-align: left;
         vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
.muted { color: var(--muted); }
footer { margin-top: 40px; font-size: 13px; color: var(--muted); }
"""


def render_html(report: Report, fail_on: str, run: Optional["Run"]) -> str:
    """Render the report as one HTML page, with charts drawn from `run` when it is given."""
    charts: list["Chart"] = []
    if run is not None:
        # Imported here so that the text, JSON and Markdown formats never load matplotlib.
        from runlens.reports.charts import build_charts

        charts = build_charts(run, report)
    chart_of = {id(finding): chart for chart in charts for finding in chart.findings}
    anchors = {id(finding): f"finding-{index}"
               for index, finding in enumerate(report.findings, start=1)}

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>runlens report: {_text(report.run.path)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        *_header(report, fail_on, charts),
        *_chart_section(charts, anchors, run is not None),
        *_findings_section(report, chart_of, anchors),
        *_waivers_section(report),
        *_rule_errors_section(report),
        *_not_evaluated_section(report),
        *_passed_section(report),
        *_warnings_section(report),
        f"<footer>runlens {_text(runlens.__version__)}</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _header(report: Report, fail_on: str, charts: list["Chart"]) -> list[str]:
    exit_code = report.exit_code(fail_on)
    gate_class = "gate failed" if exit_code else "gate"
    links = [("#charts", f"Charts ({len(charts)})"),
             ("#findings", f"Findings ({len(report.findings)})")]
    optional = [
        ("#waived", "Waived", len(report.waived)),
        ("#expired-waivers", "Expired waivers", len(report.expired_waivers)),
        ("#rule-errors", "Rule errors", len(report.errored)),
        ("#not-evaluated", "Not evaluated", len(report.not_evaluated)),
        ("#passed", "Passed", len(report.passed)),
        ("#warnings", "Warnings", len(report.warnings)),
    ]
    links += [(href, f"{name} ({count})") for href, name, count in optional if count]
    return [
        "<header>",
        "<h1>runlens report</h1>",
        f'<p class="run">Run <code>{_text(report.run.path)}</code>: '
        f"{_text(common.run_line(report))}. {_text(common.rules_line(report))}.</p>",
        f'<p class="counts">{_text(common.summary_line(report))}</p>',
        f'<p class="{gate_class}">{_text(common.gate_line(report, fail_on))}</p>',
        "<nav>" + "".join(f'<a href="{href}">{_text(label)}</a>' for href, label in links)
        + "</nav>",
        "</header>",
    ]


def _chart_section(charts: list["Chart"], anchors: dict[int, str],
                   had_run: bool) -> list[str]:
    lines = ['<section id="charts">', "<h2>Charts</h2>"]
    if not charts:
        reason = ("The run has no signals that a chart shows." if had_run
                  else "No charts: the report was rendered without the run's data.")
        lines.append(f'<p class="muted">{reason}</p>')
    for chart in charts:
        png = base64.b64encode(chart.png()).decode("ascii")
        width, height = (round(size) for size in
                         chart.figure.get_size_inches() * chart.figure.dpi)
        lines += [
            f'<figure id="chart-{_text(chart.name)}">',
            f'<img src="data:image/png;base64,{png}" alt="{_text(chart.title)}" '
            f'width="{width}" height="{height}">',
            f"<figcaption>{_text(chart.title)} (<code>{_text(chart.name)}.png</code>)."
            f"{_drawn_findings(chart.findings, anchors)}</figcaption>",
            "</figure>",
        ]
    lines.append("</section>")
    return lines


def _drawn_findings(findings: list[Finding], anchors: dict[int, str]) -> str:
    if not findings:
        return " No findings on this chart."
    links = ", ".join(
        f'<a href="#{anchors[id(finding)]}">{_text(finding.rule_id)}</a> '
        f"({_text(common.step_range(finding))})"
        for finding in findings
    )
    return f" Findings drawn: {links}."


def _findings_section(report: Report, chart_of: dict[int, "Chart"],
                      anchors: dict[int, str]) -> list[str]:
    lines = ['<section id="findings">', f"<h2>Findings ({len(report.findings)})</h2>"]
    if not report.findings:
        lines.append('<p class="muted">No rule found a problem in this run.</p>')
    for severity in SEVERITIES:
        findings = [f for f in report.findings if f.severity == severity]
        if not findings:
            continue
        lines.append(f"<h3>{SEVERITY_HEADINGS[severity]} ({len(findings)})</h3>")
        for finding in findings:
            lines += _finding(finding, anchors[id(finding)], chart_of.get(id(finding)))
    lines.append("</section>")
    return lines


def _finding(finding: Finding, anchor: str, chart: Optional["Chart"]) -> list[str]:
    severity = _text(finding.severity)
    if chart is not None:
        where = f'drawn on <a href="#chart-{_text(chart.name)}">{_text(chart.title)}</a>'
    else:
        where = "not drawn: no chart of this run shows its signals"
    lines = [
        f'<article class="finding {severity}" id="{anchor}">',
        f'<h4><span class="badge {severity}">{severity}</span>'
        f"<code>{_text(finding.rule_id)}</code> {_text(finding.title)}</h4>",
        f'<p class="where">{_text(common.step_range(finding))} &middot; '
        f"category {_text(finding.category)} &middot; {where}</p>",
        f"<p>{_text(finding.message)}</p>",
    ]
    if finding.evidence:
        lines.append('<dl class="evidence">')
        lines += [
            f"<div><dt>{_text(name)}</dt><dd>{_text(common.format_value(value))}</dd></div>"
            for name, value in finding.evidence.items()
        ]
        lines.append("</dl>")
    lines += [
        f"<p><b>Fix:</b> {_text(' '.join(finding.remediation.split()))}</p>",
        f'<p><b>Docs:</b> <a href="{_text(finding.docs)}">{_text(finding.docs)}</a> '
        '<span class="muted">(in the runlens repository)</span></p>',
        "</article>",
    ]
    return lines


def _waivers_section(report: Report) -> list[str]:
    lines: list[str] = []
    if report.waived:
        lines += ['<section id="waived">', f"<h2>Waived ({len(report.waived)})</h2>",
                  '<p class="muted">Findings that a waiver accepted. They do not fail '
                  "the run.</p>",
                  "<table><tr><th>rule</th><th>severity</th><th>steps</th><th>message</th>"
                  "<th>reason</th><th>expires</th></tr>"]
        for item in report.waived:
            finding = item.finding
            lines.append(
                f"<tr><td><code>{_text(finding.rule_id)}</code></td>"
                f"<td>{_text(finding.severity)}</td>"
                f"<td>{_text(common.step_range(finding))}</td>"
                f"<td>{_text(finding.message)}</td><td>{_text(item.reason)}</td>"
                f"<td>{_text(item.expires or 'never')}</td></tr>")
        lines += ["</table>", "</section>"]
    if report.expired_waivers:
        lines += ['<section id="expired-waivers">',
                  f"<h2>Expired waivers ({len(report.expired_waivers)})</h2>",
                  *_list(report.expired_waivers), "</section>"]
    return lines


def _rule_errors_section(report: Report) -> list[str]:
    if not report.errored:
        return []
    items = [f"<code>{_text(f.rule_id)}</code>: {_text(f.error)}" for f in report.errored]
    return ['<section id="rule-errors">', f"<h2>Rule errors ({len(report.errored)})</h2>",
            *_list(items, escape=False), "</section>"]


def _not_evaluated_section(report: Report) -> list[str]:
    if not report.not_evaluated:
        return []
    items = [
        f"<code>{_text(item.rule_id)}</code>: missing "
        + ", ".join(f"<code>{_text(name)}</code>" for name in item.missing)
        for item in report.not_evaluated
    ]
    return ['<section id="not-evaluated">',
            f"<h2>Not evaluated ({len(report.not_evaluated)})</h2>",
            '<p class="muted">The run lacks the signals these rules need.</p>',
            *_list(items, escape=False), "</section>"]


def _passed_section(report: Report) -> list[str]:
    if not report.passed:
        return []
    ids = ", ".join(f"<code>{_text(rule_id)}</code>" for rule_id in report.passed)
    return ['<section id="passed">', f"<h2>Passed ({len(report.passed)})</h2>",
            f"<p>{ids}</p>", "</section>"]


def _warnings_section(report: Report) -> list[str]:
    if not report.warnings:
        return []
    return ['<section id="warnings">', f"<h2>Warnings ({len(report.warnings)})</h2>",
            *_list(report.warnings), "</section>"]


def _list(items: Iterable[str], escape: bool = True) -> list[str]:
    return ["<ul>", *(f"<li>{_text(item) if escape else item}</li>" for item in items),
            "</ul>"]


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)
