"""Tests of `runlens compare` on the committed sample runs and on runs recorded here."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from typer.testing import CliRunner

import runlens
from runlens.analyze.findings import Finding, Report
from runlens.analyze.run import RunSummary
from runlens.cli import app
from runlens.compare import (Series, downsample, finding_identity, match_findings,
                             metric_goal)
from conftest import RULES_FIXTURES, tree_digest
from recorder_helpers import make_model, total_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RUNS = REPO_ROOT / "sample_runs"
HEALTHY = SAMPLE_RUNS / "healthy-adamw-warmup-cosine"
CLIPPING = SAMPLE_RUNS / "clipping-every-step"
LOSS_RULE = RULES_FIXTURES / "loss-above-threshold.yaml"
TRAJECTORY_ALT = "Trajectories of both runs in the projection plane"


def invoke(*args):
    return CliRunner().invoke(app, ["compare", *[str(arg) for arg in args]])


def compare_json(*args) -> dict:
    result = invoke(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def images(page: str) -> dict[str, bytes]:
    """Return alt text -> decoded PNG bytes of every image in an HTML page."""
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">',
                       page)
    return {alt: base64.b64decode(data) for data, alt in found}


# -- recorded runs ------------------------------------------------------------------------------


def record_run(run_dir: Path, optimizer_class=torch.optim.SGD, model=None, steps: int = 30,
               **options) -> Path:
    """Train a small model for `steps` steps with evaluations, and return the run directory."""
    model = model if model is not None else make_model()
    optimizer = optimizer_class(model.parameters(), lr=0.03)
    with runlens.record(run_dir, model=model, optimizer=optimizer, **options) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
            if step % 10 == 9:
                with torch.no_grad():
                    rec.log_eval("val", {"loss": total_loss(model, 10_000 + step),
                                         "accuracy": 1.0 / (1.0 + total_loss(model, step))})
    return run_dir


class WideNet(torch.nn.Module):
    """make_model's layout with a wider first layer, so the projections differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16),
                                            torch.nn.ReLU())
        self.head_a = torch.nn.Linear(16, 1)
        self.head_b = torch.nn.Linear(16, 1)

    def forward(self, inputs):
        features = self.backbone(inputs)
        return self.head_a(features), self.head_b(features)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "sgd": record_run(root / "sgd", trajectory_every=2),
        "adam": record_run(root / "adam", torch.optim.Adam, trajectory_every=2),
        "seed1": record_run(root / "seed1", trajectory_every=2, trajectory_seed=1),
        "wide": record_run(root / "wide", model=WideNet(), trajectory_every=2),
        "plain": record_run(root / "plain"),
    }


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_table_on_sample_runs():
    report = compare_json(HEALTHY, CLIPPING)
    metrics = {metric["name"]: metric for metric in report["metrics"]}
    assert list(metrics) == ["train loss", "val/accuracy", "val/loss"]
    assert [metric["goal"] for metric in metrics.values()] == ["min", "max", "min"]

    for run_dir, side in ((HEALTHY, "base"), (CLIPPING, "new")):
        scalars = f"read_parquet('{run_dir}/scalars/*/*.parquet', union_by_name = true)"
        evals = f"read_parquet('{run_dir}/evals/*/*.parquet', union_by_name = true)"
        last_loss, last_step = duckdb.sql(
            f"SELECT loss, step FROM {scalars} ORDER BY step DESC LIMIT 1").fetchall()[0]
        min_loss = duckdb.sql(f"SELECT min(loss) FROM {scalars}").fetchall()[0][0]
        max_accuracy = duckdb.sql(
            f"SELECT max(value) FROM {evals} WHERE metric = 'accuracy'").fetchall()[0][0]
        assert metrics["train loss"][side]["final"] == pytest.approx(last_loss)
        assert metrics["train loss"][side]["final_step"] == last_step
        assert metrics["train loss"][side]["best"] == pytest.approx(min_loss)
        assert metrics["val/accuracy"][side]["best"] == pytest.approx(max_accuracy)

    loss = metrics["train loss"]
    assert loss["final_change"] == pytest.approx(loss["new"]["final"] - loss["base"]["final"])
    assert loss["best_change"] == pytest.approx(loss["new"]["best"] - loss["base"]["best"])


def test_metrics_table_in_text():
    result = invoke(HEALTHY, CLIPPING)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith("metric"))
    assert header.split() == ["metric", "goal", "base", "final", "new", "final", "change",
                              "base", "best", "new", "best", "change"]
    accuracy = next(line for line in lines if line.strip().startswith("val/accuracy"))
    assert accuracy.split()[1] == "max"


def test_only_shared_metrics_compared(runs):
    report = compare_json(HEALTHY, runs["plain"])
    assert [metric["name"] for metric in report["metrics"]] == [
        "train loss", "val/accuracy", "val/loss"]
    report = compare_json(runs["plain"], runs["sgd"], "--no-builtin", "--rules", LOSS_RULE)
    assert len(report["metrics"]) == 3


@pytest.mark.parametrize(
    ("name", "goal"),
    [("loss", "min"), ("val_loss", "min"), ("accuracy", "max"), ("val_acc", "max"),
     ("top-5", "max"), ("top5_error", "min"), ("top1_acc", "max"), ("top_k", "max"),
     ("macro_f1", "max"), ("recall", "max"), ("precision@10", "max"), ("roc_auc", "max"), ("perplexity", "min"),
     ("wer", "min"), ("stop_count", "min"), ("accumulated", "min")],
)
def test_metric_goal_by_name(name, goal):
    assert metric_goal(name) == goal


def test_downsample_keeps_bucket_extremes():
    steps = list(range(10_000))
    values = [1.0 + 0.0001 * step for step in steps]
    values[4321] = 50.0
    values[777] = -3.0
    values[9000] = float("nan")
    cut = downsample(Series(steps, values), max_points=200)
    assert len(cut.steps) <= 200
    assert cut.steps == sorted(cut.steps)
    assert 4321 in cut.steps
    assert 777 in cut.steps
    assert cut.steps[0] == 0
    assert downsample(Series([1, 2], [3.0, 4.0]), max_points=200).steps == [1, 2]


# -- findings ---------------------------------------------------------------------------------


def test_new_finding_healthy_to_clipping():
    report = compare_json(HEALTHY, CLIPPING)
    new = report["findings"]["new"]
    assert [change["rule_id"] for change in new] == ["clipping-every-step"]
    assert new[0]["identity"] == {"rank": 0}
    assert new[0]["base"] is None
    assert report["findings"]["gone"] == []
    assert report["findings"]["unchanged"] == []
    assert report["summary"]["new"] == {"error": 0, "warning": 1, "info": 0}


def test_gone_finding_clipping_to_healthy():
    report = compare_json(CLIPPING, HEALTHY)
    gone = report["findings"]["gone"]
    assert [change["rule_id"] for change in gone] == ["clipping-every-step"]
    assert gone[0]["new"] is None
    assert report["findings"]["new"] == []
    assert report["findings"]["unchanged"] == []


def test_run_against_itself_only_unchanged():
    analyzed = CliRunner().invoke(app, ["analyze", str(CLIPPING), "--format", "json",
                                        "--fail-on", "never"])
    findings = json.loads(analyzed.stdout)["findings"]
    report = compare_json(CLIPPING, CLIPPING)
    assert report["findings"]["new"] == []
    assert report["findings"]["gone"] == []
    unchanged = report["findings"]["unchanged"]
    assert len(unchanged) == len(findings) >= 1
    assert all(change["base"] == change["new"] for change in unchanged)


def _finding(rule_id: str, start: int, evidence: dict) -> Finding:
    return Finding(rule_id, "title", "warning", "test", start, start + 10, "message",
                   evidence, "fix", "docs/x.md")


def _report(findings: list[Finding]) -> Report:
    summary = RunSummary("run", 1, 10, 0, 9, 1, 1, ("scalars",))
    return Report(run=summary, rules_loaded=1, findings=findings)


def test_finding_identity_names_things():
    finding = _finding("rare-class-collapse", 5, {
        "rank": 0, "class_id": 3, "split": "val", "group": 2, "segment": 1,
        "recall": 0.1, "steps": 400, "support": 12, "passed": True, "module": "fc"})
    assert finding_identity(finding) == {"rank": 0, "class_id": 3, "split": "val",
                                         "group": 2, "segment": 1, "module": "fc"}


def test_finding_identity_leaves_out_descriptions():
    finding = _finding("divergence", 5, {
        "rank": 0, "outcome": "the final median loss 1.412 is 4.1x the best"})
    assert finding_identity(finding) == {"rank": 0}


def test_truncated_run_keeps_its_finding_unchanged(tmp_path):
    shortened = tmp_path / "divergence"
    shutil.copytree(SAMPLE_RUNS / "divergence", shortened)
    for table in shortened.iterdir():
        parts = sorted(table.glob("rank-*/part-*.parquet"))
        if len(parts) > 1:
            parts[-1].unlink()
    result = invoke(SAMPLE_RUNS / "divergence", shortened, "--fail-on-new", "error")
    assert result.exit_code == 0, result.output


def test_findings_match_despite_moved_steps():
    base = _report([_finding("spike", 10, {"rank": 0, "ratio": 3.0}),
                    _finding("collapse", 40, {"class_id": 1, "recall": 0.2}),
                    _finding("collapse", 40, {"class_id": 2, "recall": 0.1})])
    new = _report([_finding("spike", 90, {"rank": 0, "ratio": 9.0}),
                   _finding("collapse", 70, {"class_id": 2, "recall": 0.05}),
                   _finding("collapse", 70, {"class_id": 5, "recall": 0.3})])
    changes = match_findings(base, new)
    by_status = {status: sorted((c.rule_id, tuple(c.identity.items())) for c in changes
                                if c.status == status)
                 for status in ("new", "gone", "unchanged")}
    assert by_status["unchanged"] == [("collapse", (("class_id", 2),)),
                                      ("spike", (("rank", 0),))]
    assert by_status["new"] == [("collapse", (("class_id", 5),))]
    assert by_status["gone"] == [("collapse", (("class_id", 1),))]


def test_repeated_identity_pairs_by_count():
    base = _report([_finding("spike", 10, {"rank": 0})])
    new = _report([_finding("spike", 10, {"rank": 0}), _finding("spike", 50, {"rank": 0})])
    statuses = sorted(change.status for change in match_findings(base, new))
    assert statuses == ["new", "unchanged"]


# -- the gate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fail_on_new", "exit_code"),
                         [("never", 0), ("error", 0), ("warning", 1), ("info", 1)])
def test_fail_on_new_exit_codes(fail_on_new, exit_code):
    result = invoke(HEALTHY, CLIPPING, "--fail-on-new", fail_on_new)
    assert result.exit_code == exit_code, result.output
    assert f"--fail-on-new {fail_on_new}" in result.stdout


@pytest.mark.parametrize("fail_on_new", ["warning", "info"])
def test_gone_findings_do_not_fail(fail_on_new):
    assert invoke(CLIPPING, HEALTHY, "--fail-on-new", fail_on_new).exit_code == 0
    assert invoke(CLIPPING, CLIPPING, "--fail-on-new", fail_on_new).exit_code == 0


def test_config_file_rules_apply(tmp_path, monkeypatch):
    (tmp_path / "runlens.toml").write_text('ignore = ["clipping-every-step"]\n')
    monkeypatch.chdir(tmp_path)
    assert invoke(HEALTHY, CLIPPING, "--fail-on-new", "warning").exit_code == 0
    assert invoke(HEALTHY, CLIPPING, "--fail-on-new", "warning",
                  "--no-config").exit_code == 1


def test_default_gate_is_never():
    result = invoke(HEALTHY, CLIPPING)
    assert result.exit_code == 0
    assert "--fail-on-new never" in result.stdout


def test_rules_options_apply_to_both_runs():
    # With the fixture rule alone and a threshold below every loss, each step of both
    # runs is a finding; matched by rule id only, the shorter run's 400 pair up.
    result = invoke(CLIPPING, HEALTHY, "--no-builtin", "--rules", LOSS_RULE, "--set",
                    "loss-above-threshold.threshold=0", "--format", "json",
                    "--fail-on-new", "error")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)["summary"]
    assert summary["rules"] == 1
    assert summary["unchanged"]["error"] == 400
    assert summary["new"]["error"] == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-run", CLIPPING], "runlens: error: missing-run: run directory not found"),
        ([CLIPPING, CLIPPING, "--set", "no-such-rule.x=1"], "unknown rule 'no-such-rule'"),
        ([CLIPPING, CLIPPING, "--no-builtin"], "no rules to evaluate"),
        ([CLIPPING, CLIPPING, "--format", "xml"], "Invalid value for '--format'"),
        ([CLIPPING, CLIPPING, "--fail-on-new", "fatal"], "Invalid value for '--fail-on-new'"),
        ([CLIPPING, HEALTHY, "-o", HEALTHY / "compare.html"], "is inside the run directory"),
        ([CLIPPING / "run.json", HEALTHY], "is a file; pass the run directory"),
    ],
)
def test_bad_input_exits_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (HEALTHY / "compare.html").exists()


def test_compare_never_writes_run_dirs(tmp_path, runs):
    watched = [HEALTHY, CLIPPING, runs["sgd"], runs["adam"]]
    before = [tree_digest(run_dir) for run_dir in watched]
    for base, new in ((HEALTHY, CLIPPING), (runs["sgd"], runs["adam"])):
        for report_format in ("text", "json", "html"):
            output = tmp_path / f"compare.{report_format}"
            result = invoke(base, new, "--format", report_format, "-o", output,
                            "--fail-on-new", "info")
            assert result.exit_code in (0, 1), result.output
            assert output.stat().st_size > 0
    assert [tree_digest(run_dir) for run_dir in watched] == before


# -- trajectories and the HTML page ---------------------------------------------------------


def test_sgd_and_adam_share_start_and_separate(runs):
    trajectory = compare_json(runs["sgd"], runs["adam"])["trajectory"]
    assert trajectory["drawn"] is True
    assert trajectory["start_offset"] == 0.0
    assert trajectory["final_separation"] > 1e-3
    assert trajectory["base"]["points"] == 15
    assert trajectory["base"]["last_step"] == 28
    assert 0 < trajectory["base"]["straightness"] <= 1
    assert trajectory["notes"] == []


def test_html_has_trajectory_image(tmp_path, runs):
    output = tmp_path / "compare.html"
    result = invoke(runs["sgd"], runs["adam"], "--format", "html", "-o", output)
    assert result.exit_code == 0, result.output
    page = output.read_text()
    pictures = images(page)
    assert TRAJECTORY_ALT in pictures
    assert "Training loss of both runs by step" in pictures
    assert "Evaluation metrics of both runs by step" in pictures
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in pictures.values())


def test_html_self_contained(tmp_path, runs):
    output = tmp_path / "compare.html"
    invoke(runs["sgd"], runs["adam"], "--format", "html", "-o", output)
    page = output.read_text()
    assert "<script" not in page
    assert "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "url(" not in page


def test_html_without_trajectories_has_no_trajectory_image(tmp_path):
    output = tmp_path / "compare.html"
    result = invoke(HEALTHY, CLIPPING, "--format", "html", "-o", output)
    assert result.exit_code == 0, result.output
    page = output.read_text()
    assert TRAJECTORY_ALT not in images(page)
    assert "Training loss of both runs by step" in images(page)
    assert "Trajectory chart omitted: neither run recorded a trajectory" in page


def test_one_run_without_trajectory_noted(runs):
    trajectory = compare_json(runs["sgd"], runs["plain"])["trajectory"]
    assert trajectory["drawn"] is False
    assert trajectory["notes"] == [
        "the new run recorded no trajectory; record both runs with "
        "runlens.record(..., trajectory_every=N)"]


def test_different_seeds_refused_with_note(tmp_path, runs):
    output = tmp_path / "compare.html"
    result = invoke(runs["sgd"], runs["seed1"], "--format", "html", "-o", output)
    assert result.exit_code == 0, result.output
    page = output.read_text()
    assert TRAJECTORY_ALT not in images(page)
    assert "their trajectory_seed differs (0 in the base run, 1 in the new run)" in page
    text = invoke(runs["sgd"], runs["seed1"]).stdout
    assert "Trajectory: not compared: the runs' projections differ" in text


def test_different_layouts_refused_with_note(runs):
    trajectory = compare_json(runs["sgd"], runs["wide"])["trajectory"]
    assert trajectory["drawn"] is False
    assert len(trajectory["notes"]) == 1
    assert ("their parameter layouts differ at parameter 0: 'backbone.0.weight' of shape "
            "[8, 4] on cpu in the base run, 'backbone.0.weight' of shape [16, 4] on cpu in "
            "the new run") in trajectory["notes"][0]


def test_resumed_segment_with_other_seed_left_out(tmp_path, runs):
    run_dir = record_run(tmp_path / "resumed", steps=10, trajectory_every=2)
    record_run(run_dir, steps=10, trajectory_every=2, trajectory_seed=1)
    trajectory = compare_json(runs["sgd"], run_dir)["trajectory"]
    assert trajectory["drawn"] is True
    assert trajectory["new"]["points"] == 5
    assert trajectory["new"]["last_step"] == 8
    assert trajectory["notes"] == [
        "the new run has 5 trajectory points from segments with another projection; "
        "they are left out"]


def test_html_without_matplotlib_exits_2(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from runlens.cli import main\n"
        f"sys.argv = ['runlens', 'compare', {str(CLIPPING)!r}, {str(CLIPPING)!r}, "
        "'--format', 'html']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "runlens: error: --format html needs matplotlib, which is not installed; install "
        "it with pip install matplotlib, or use --format text or json\n")


def test_compare_does_not_import_torch():
    code = ("import sys\n"
            "import runlens.compare, runlens.reports.compare_html, runlens.cli\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout == "False\n"
