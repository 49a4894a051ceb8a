"""The HTML report and `runlens plot`: charts per signal, findings on charts, downsampling.

The reports are made from the committed sample runs through the real CLI, and read
back as HTML text, as PNG files, and as a page that headless Chromium renders.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from runlens.analyze import Report, Run, evaluate, load_rules
from runlens.cli import app
from runlens.reports import render
from runlens.reports.charts import TARGET_BUCKETS, Chart, build_charts
from conftest import RULES_FIXTURES, make_rule, steady_scalars, tree_digest, write_rule, write_run

SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"

# The charts that each sample run has data for, in report order.
EXPECTED_CHARTS = {
    "clipping-every-step": ["loss", "evals", "lr", "grad_norm", "update_ratio",
                            "class_recall"],
    "amp-skipped-steps": ["loss", "lr", "grad_norm", "amp_scale"],
    "task-gradient-imbalance": ["loss", "task_losses", "lr", "grad_norm", "update_ratio",
                                "task_grad_norm", "task_cosine"],
    "healthy-resume": ["loss", "evals", "lr", "grad_norm", "update_ratio", "class_recall"],
    "rare-class-collapse": ["loss", "evals", "lr", "grad_norm", "update_ratio",
                            "class_recall"],
    "update-ratio-out-of-range": ["loss", "evals", "lr", "grad_norm", "update_ratio",
                                  "class_recall"],
}
ALL_CHARTS = {"loss", "task_losses", "evals", "lr", "grad_norm", "amp_scale", "update_ratio",
              "class_recall", "task_grad_norm", "task_cosine"}

# The chart that each run's own failure is drawn on.
FAILURE_CHART = {
    "clipping-every-step": ("clipping-every-step", "grad_norm"),
    "amp-skipped-steps": ("amp-skipped-steps", "amp_scale"),
    "task-gradient-imbalance": ("task-gradient-imbalance", "task_grad_norm"),
    "rare-class-collapse": ("rare-class-collapse", "class_recall"),
    "update-ratio-out-of-range": ("update-ratio-out-of-range", "update_ratio"),
}


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@dataclass
class Analyzed:
    """One sample run analyzed: the HTML page from the CLI and the charts from the API."""

    run_dir: Path
    html_path: Path
    html: str
    report: Report
    charts: list[Chart]
    digest_before: dict[str, str]
    digest_after: dict[str, str]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Analyzed] = {}

    def analyze(name: str) -> Analyzed:
        if name not in cache:
            run_dir = SAMPLE_RUNS / name
            before = tree_digest(run_dir)
            html_path = tmp_path_factory.mktemp(name) / "report.html"
            result = invoke("analyze", run_dir, "--no-config", "--format", "html", "-o",
                            html_path, "--fail-on", "never")
            assert result.exit_code == 0, result.output
            with Run.open(run_dir) as run:
                report = evaluate(run, load_rules())
                charts = build_charts(run, report)
            cache[name] = Analyzed(run_dir, html_path, html_path.read_text(encoding="utf-8"),
                                   report, charts, before, tree_digest(run_dir))
        return cache[name]

    return analyze


@pytest.mark.parametrize("name", sorted(EXPECTED_CHARTS))
def test_charts_match_signals(analyzed, name: str) -> None:
    result = analyzed(name)
    assert [chart.name for chart in result.charts] == EXPECTED_CHARTS[name]
    page_charts = re.findall(r'<figure id="chart-([a-z_]+)">', result.html)
    assert page_charts == EXPECTED_CHARTS[name]
    for absent in ALL_CHARTS - set(EXPECTED_CHARTS[name]):
        assert f'id="chart-{absent}"' not in result.html


@pytest.mark.parametrize("name", sorted(EXPECTED_CHARTS))
def test_every_finding_listed_and_drawn(analyzed, name: str) -> None:
    result = analyzed(name)
    drawn = {chart.name: chart.labelled_rule_ids() for chart in result.charts}
    placed = [(chart.name, finding) for chart in result.charts for finding in chart.findings]
    assert len(placed) == len(result.report.findings)
    for finding in result.report.findings:
        assert html.escape(finding.message) in result.html
        assert f"<code>{finding.rule_id}</code>" in result.html
        assert html.escape(" ".join(finding.remediation.split())) in result.html
        assert f'href="{finding.docs}"' in result.html
        charts = [chart for chart, placed_finding in placed if placed_finding is finding]
        assert len(charts) == 1, finding.rule_id
        assert finding.rule_id in drawn[charts[0]]


@pytest.mark.parametrize("name", sorted(FAILURE_CHART))
def test_failure_drawn_on_its_chart(analyzed, name: str) -> None:
    rule_id, chart_name = FAILURE_CHART[name]
    result = analyzed(name)
    chart = next(chart for chart in result.charts if chart.name == chart_name)
    assert rule_id in chart.labelled_rule_ids()
    assert rule_id in [finding.rule_id for finding in chart.findings]
    caption = re.search(rf'<figure id="chart-{chart_name}">.*?</figure>', result.html,
                        re.DOTALL)
    assert caption is not None
    assert f">{rule_id}</a>" in caption.group(0)


def test_healthy_run_marks_resume(analyzed) -> None:
    result = analyzed("healthy-resume")
    lr = next(chart for chart in result.charts if chart.name == "lr")
    resume_lines = [line for ax in lr.figure.axes for line in ax.get_lines()
                    if (line.get_gid() or "").startswith("resume:")]
    assert resume_lines, "the resume at segment 1 is not marked on the lr chart"
    assert resume_lines[0].get_xdata()[0] == 300
    assert result.report.findings == []
    assert "No rule found a problem in this run." in result.html


@pytest.mark.parametrize("name", sorted(EXPECTED_CHARTS))
def test_html_is_self_contained(analyzed, name: str) -> None:
    page = analyzed(name).html
    assert "<script" not in page
    assert "<link" not in page
    assert "@import" not in page
    assert "url(" not in page
    assert re.findall(r'(?:src|href)="(?!data:image/png;base64,|#|docs/)', page) == []
    # Any web address may only be text, such as a link in a rule's message.
    for tag in re.findall(r"<[^>]*>", page):
        assert not re.search(r"https?://", tag), tag
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(sources) == len(EXPECTED_CHARTS[name])
    for source in sources:
        image = Image.open(io.BytesIO(base64.b64decode(source)))
        assert image.format == "PNG"
        assert image.size[0] >= 1000


@pytest.mark.parametrize("name", sorted(EXPECTED_CHARTS))
def test_run_dir_unchanged(analyzed, name: str) -> None:
    result = analyzed(name)
    assert result.digest_after == result.digest_before


def test_header_and_gate(analyzed) -> None:
    result = analyzed("rare-class-collapse")
    assert f"<code>{result.run_dir.resolve()}</code>" in result.html
    assert "steps 0-799 (800 steps), 1 segment, 1 rank" in result.html
    assert "Findings: 1 error, 2 warnings, 0 info." in result.html
    assert "Exit 0: --fail-on never, so findings do not fail the run." in result.html


def test_text_report_does_not_import_matplotlib() -> None:
    code = (
        "import sys\n"
        "import runlens.cli\n"
        f"sys.argv = ['runlens', 'analyze', {str(SAMPLE_RUNS / 'clipping-every-step')!r}, "
        "'--no-config', '--fail-on', 'never']\n"
        "try:\n"
        "    runlens.cli.main()\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('matplotlib' in sys.modules, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines()[-1] == "False False"


def test_downsampling_keeps_single_step_spike(tmp_path: Path) -> None:
    steps = 200_000
    scalars = steady_scalars(steps, grad_norm=[0.5] * steps)
    scalars["loss"][123_457] = 1.0e6
    scalars["loss"][77_001] = -3.0
    scalars["grad_norm"][5_003] = 4.0e3
    run_dir = write_run(tmp_path / "long", {"scalars": scalars})
    with Run.open(run_dir) as run:
        report = evaluate(run, [])
        charts = {chart.name: chart for chart in build_charts(run, report)}
    loss = charts["loss"].series_values("loss")
    assert loss.max() == 1.0e6
    assert loss.min() == -3.0
    assert len(loss) <= 2 * TARGET_BUCKETS
    grad = charts["grad_norm"].series_values("grad_norm")
    assert grad.max() == 4.0e3
    assert len(grad) <= 2 * TARGET_BUCKETS


def test_resume_from_earlier_step_draws_last_segment(tmp_path: Path) -> None:
    # Segment 0 ran steps 0-299 at loss 5; a resume went back to step 150 and ran
    # steps 150-249 at loss 1. Steps 150-249 must be drawn from the resume only.
    first = steady_scalars(300, loss=[5.0] * 300)
    resumed = steady_scalars(100, step=list(range(150, 250)), segment=[1] * 100,
                             loss=[1.0] * 100)
    run_dir = write_run(tmp_path / "back", {"scalars": [first, resumed]})
    with Run.open(run_dir) as run:
        charts = {chart.name: chart for chart in build_charts(run, evaluate(run, []))}
    steps = charts["loss"].series_steps("loss")
    values = charts["loss"].series_values("loss")
    resumed_values = {value for step, value in zip(steps, values) if 150 <= step < 250}
    assert resumed_values == {1.0}


def test_short_run_drawn_at_every_step(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "short", {"scalars": steady_scalars(300)})
    with Run.open(run_dir) as run:
        charts = {chart.name: chart for chart in build_charts(run, evaluate(run, []))}
    loss = charts["loss"].series_values("loss")
    assert sorted(set(loss.tolist())) == sorted({2.0 - step / 300 for step in range(300)})
    assert set(charts) == {"loss", "grad_norm"}


def test_heatmap_groups_many_params_by_module(tmp_path: Path) -> None:
    names = [f"blocks.{block}.linear.{kind}" for block in range(80)
             for kind in ("weight", "bias")]
    stats_steps = [0, 100, 200]
    rows = [(step, name) for step in stats_steps for name in names]
    params = {
        "step": [step for step, _ in rows],
        "segment": [0] * len(rows),
        "rank": [0] * len(rows),
        "param": [name for _, name in rows],
        # Block 7 moves 100 times faster than the others.
        "update_norm": [0.1 if name.startswith("blocks.7.") else 1e-3 for _, name in rows],
        "param_norm": [1.0] * len(rows),
    }
    run_dir = write_run(tmp_path / "wide", {"scalars": steady_scalars(300), "params": params})
    with Run.open(run_dir) as run:
        charts = {chart.name: chart for chart in build_charts(run, evaluate(run, []))}
    heatmap = charts["update_ratio"]
    assert heatmap.title == "Update-to-weight ratio per module (stats steps)"
    cells = heatmap.figure.axes[0].collections[0].get_array()
    assert cells.shape == (80, len(stats_steps))
    # A module's ratio is sqrt(sum of squared update norms) / sqrt(sum of squared weights).
    assert cells[7, 0] == pytest.approx(-1.0)  # log10(0.1 * sqrt(2) / sqrt(2))
    assert cells[0, 0] == pytest.approx(-3.0)
    labels = [label.get_text() for label in heatmap.figure.axes[0].get_yticklabels()]
    assert labels[:2] == ["blocks.0", "blocks.2"]


def test_user_rule_falls_back_to_loss_chart(tmp_path: Path, spiking_run: Path) -> None:
    whole_run = make_rule(
        id="loss-ever-high", category="test",
        query="SELECT NULL::BIGINT AS step_start, NULL::BIGINT AS step_end, max(loss) AS loss "
              "FROM scalars HAVING max(loss) > $threshold",
        message="largest loss {loss:.2f}")
    rules = load_rules([RULES_FIXTURES / "loss-above-threshold.yaml",
                        write_rule(tmp_path / "rules", whole_run)], builtin=False)
    with Run.open(spiking_run) as run:
        report = evaluate(run, rules)
        charts = {chart.name: chart for chart in build_charts(run, report)}
        page = render(report, "html", "error", run)
    assert [f.rule_id for f in report.findings] == [
        "loss-ever-high", "loss-above-threshold", "loss-above-threshold"]
    labels = charts["loss"].labelled_rule_ids()
    assert labels.count("loss-above-threshold") == 1  # one label for its two findings
    assert "loss-ever-high" in labels
    assert "Whole-run findings: loss-ever-high" in [text.get_text()
                                                    for text in charts["loss"].figure.texts]
    assert page.count('drawn on <a href="#chart-loss">') == 3


def test_labels_of_one_range_do_not_overlap(tmp_path: Path, spiking_run: Path) -> None:
    folder = tmp_path / "rules"
    for rule_id in ("first-loss-rule", "second-loss-rule", "third-loss-rule"):
        write_rule(folder, make_rule(id=rule_id, category="numerics"))
    with Run.open(spiking_run) as run:
        report = evaluate(run, load_rules([folder], builtin=False))
        loss = next(chart for chart in build_charts(run, report) if chart.name == "loss")
    renderer = loss.figure.canvas.get_renderer()
    labels = [text for ax in loss.figure.axes for text in ax.texts
              if (text.get_gid() or "").startswith("finding:")]
    assert sorted(text.get_gid() for text in labels) == [
        "finding:first-loss-rule", "finding:second-loss-rule", "finding:third-loss-rule"]
    boxes = [text.get_window_extent(renderer) for text in labels]
    for index, box in enumerate(boxes):
        for other in boxes[index + 1:]:
            assert not box.overlaps(other)


def test_rule_errors_and_not_evaluated_listed(spiking_run: Path) -> None:
    with Run.open(spiking_run) as run:
        report = evaluate(run, load_rules([RULES_FIXTURES], builtin=False))
        page = render(report, "html", "error", run)
    assert [failure.rule_id for failure in report.errored] == ["read-outside-run"]
    errors = re.search(r'<section id="rule-errors">.*?</section>', page, re.DOTALL)
    assert errors is not None
    assert "<code>read-outside-run</code>: " in errors.group(0)
    missing = re.search(r'<section id="not-evaluated">.*?</section>', page, re.DOTALL)
    assert missing is not None
    assert "<code>amp-scale-collapsed</code>: missing <code>scalars.amp_scale</code>" in (
        missing.group(0))
    assert "Exit 2: 1 rule failed to run." in page


def test_waived_and_expired_waivers_listed(tmp_path: Path) -> None:
    config = tmp_path / "runlens.toml"
    config.write_text(
        '[[waivers]]\nrule = "clipping-every-step"\nreason = "max_norm is tuned for the '
        'old model"\nexpires = 2999-12-31\n\n'
        '[[waivers]]\nrule = "loss-spike"\nreason = "noisy shard"\nexpires = 2001-01-31\n',
        encoding="utf-8")
    output = tmp_path / "report.html"
    result = invoke("analyze", SAMPLE_RUNS / "clipping-every-step", "--config", config,
                    "--format", "html", "-o", output)
    assert result.exit_code == 1, result.output  # the expired waiver fails the gate
    page = output.read_text(encoding="utf-8")
    waived = re.search(r'<section id="waived">.*?</section>', page, re.DOTALL)
    assert waived is not None
    assert "<code>clipping-every-step</code>" in waived.group(0)
    assert "max_norm is tuned for the old model" in waived.group(0)
    assert "2999-12-31" in waived.group(0)
    expired = re.search(r'<section id="expired-waivers">.*?</section>', page, re.DOTALL)
    assert expired is not None
    assert "loss-spike" in expired.group(0)
    assert "Findings (0)" in page
    assert 'id="finding-1"' not in page


def test_plot_writes_one_png_per_chart(tmp_path: Path) -> None:
    run_dir = SAMPLE_RUNS / "amp-skipped-steps"
    before = tree_digest(run_dir)
    output = tmp_path / "charts" / "nested"
    result = invoke("plot", run_dir, "--no-config", "-o", output)
    assert result.exit_code == 0, result.output
    expected = [output / f"{name}.png" for name in EXPECTED_CHARTS["amp-skipped-steps"]]
    assert result.stdout.splitlines() == [str(path) for path in expected]
    assert sorted(output.iterdir()) == sorted(expected)
    for path in expected:
        image = Image.open(path)
        assert image.format == "PNG"
        assert image.size[0] >= 1000
    amp = Image.open(output / "amp_scale.png")
    assert amp.text["Description"] == "findings: amp-skipped-steps"
    assert Image.open(output / "loss.png").text["Description"] == "findings: none"
    assert tree_digest(run_dir) == before


def test_plot_rejects_output_inside_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(SAMPLE_RUNS / "amp-skipped-steps", run_dir)
    before = tree_digest(run_dir)
    result = invoke("plot", run_dir, "--no-config", "-o", run_dir / "charts")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("runlens: error: -o ")
    assert "inside the run directory" in result.stderr
    assert not (run_dir / "charts").exists()
    assert tree_digest(run_dir) == before


def test_plot_rejects_file_as_output(tmp_path: Path) -> None:
    target = tmp_path / "charts.png"
    target.write_bytes(b"not a folder")
    result = invoke("plot", SAMPLE_RUNS / "amp-skipped-steps", "--no-config", "-o", target)
    assert result.exit_code == 2, result.output
    assert "is a file, not a folder" in result.stderr


# Appended to a copy of the report by the Chromium test, never part of the report: it
# writes how many images decoded, out of how many, into an element of the page.
LOAD_PROBE = """
<div id="image-probe">pending</div>
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0);
  document.getElementById("image-probe").textContent = loaded.length + "/" + images.length;
});
</script>
"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not installed: run apt-get install -y chromium "
                    "(Debian's package), as .ci/run does")
    return path


@pytest.mark.parametrize("name", ["rare-class-collapse", "task-gradient-imbalance"])
def test_html_renders_in_chromium(analyzed, name: str, tmp_path: Path) -> None:
    browser = chromium()
    result = analyzed(name)
    probed = tmp_path / "probed.html"
    probed.write_text(result.html.replace("</body>", LOAD_PROBE + "</body>"),
                      encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dump = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True,
                          text=True, timeout=180)
    assert dump.returncode == 0, dump.stderr[-2000:]
    probe = re.search(r'<div id="image-probe">([^<]*)</div>', dump.stdout)
    assert probe is not None, dump.stdout[-2000:]
    charts = len(EXPECTED_CHARTS[name])
    assert probe.group(1) == f"{charts}/{charts}"

    screenshot = tmp_path / "page.png"
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1400,4000",
                           result.html_path.as_uri()], capture_output=True, text=True,
                          timeout=180)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert Image.open(screenshot).size == (1400, 4000)
