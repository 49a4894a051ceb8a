"""The built-in rules on recorded runs: each fires on its failure and on no healthy run.

The sample runs in `sample_runs/` are checked as committed, and each scenario is also
recorded again here from real training, so a rule is tested on a run made by the
current recorder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runlens.analyze import Run, evaluate, load_rules

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RUNS = ROOT / "sample_runs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("sample_runs_generate",
                                                  SAMPLE_RUNS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()
FAILURES = [name for name in generate.SCENARIOS if not name.startswith("healthy-")]
HEALTHY = [name for name in generate.SCENARIOS if name.startswith("healthy-")]

# The finding each failure scenario must produce: (rule id, first step, last step).
EXPECTED = {
    "clipping-every-step": ("clipping-every-step", 0, 399),
    "rare-class-collapse": ("rare-class-collapse", 349, 799),
    "schedule-boundary-spike": ("schedule-boundary-spike", 300, 309),
    "optimizer-state-mismatch": ("optimizer-state-mismatch", 300, 300),
    "task-gradient-imbalance": ("task-gradient-imbalance", 0, 395),
    "non-finite-values": ("non-finite-values", 200, 299),
    "loss-spike": ("loss-spike", 400, 404),
    "gradient-explosion": ("gradient-explosion", 175, 276),
    "divergence": ("divergence", 214, 599),
    "weight-decay-on-norm-or-bias": ("weight-decay-on-norm-or-bias", None, None),
    "update-ratio-out-of-range": ("update-ratio-out-of-range", 0, 390),
    "clipping-never-fires": ("clipping-never-fires", 0, 299),
    "overfitting": ("overfitting", 149, 1499),
    "adam-with-l2": ("adam-with-l2", None, None),
    "trainable-param-not-updated": ("trainable-param-not-updated", None, None),
    "lr-schedule-unit-mismatch": ("lr-schedule-unit-mismatch", 18, 599),
    "loss-metric-divergence": ("loss-metric-divergence", 149, 699),
    "amp-skipped-steps": ("amp-skipped-steps", 100, 399),
    "clip-before-unscale": ("clip-before-unscale", 0, 399),
    "validation-leakage": ("validation-leakage", None, None),
    "correlated-batches": ("correlated-batches", 0, 399),
    "lr-not-scaled-with-batch": ("lr-not-scaled-with-batch", 200, 200),
    "dead-activations": ("dead-activations", 250, 290),
    "saturated-activations": ("saturated-activations", 250, 290),
    "batchnorm-small-batch": ("batchnorm-small-batch", 0, 290),
    "batchnorm-stats-explode": ("batchnorm-stats-explode", 0, 290),
    "amp-gradient-underflow": ("amp-gradient-underflow", 600, 790),
    "frozen-param-moved": ("frozen-param-moved", 150, 390),
    "stale-optimizer-state": ("stale-optimizer-state", 140, 450),
    "negative-transfer": ("negative-transfer", 300, 449),
    "logit-explosion": ("logit-explosion", 100, 390),
    "missing-warmup": ("missing-warmup", 0, 0),
    "rank-desync": ("rank-desync", 0, 90),
    "straggler-rank": ("straggler-rank", 0, 149),
}

# Other rules that rightly fire on a failure run, because one fault shows in several
# signals: an exploding gradient also diverges, spikes and turns the loss NaN.
ALSO_EXPECTED = {
    "gradient-explosion": {"divergence", "non-finite-values", "loss-spike",
                           "update-ratio-out-of-range"},
    "non-finite-values": {"divergence"},
    # Ramping SGD's lr up makes the loss spike on its way up, and then kills the ReLUs,
    # so the weights stop moving.
    "divergence": {"loss-spike", "update-ratio-out-of-range", "dead-activations"},
    # Dead first-layer ReLUs pass no gradient, so the first layer never changes.
    "dead-activations": {"trainable-param-not-updated", "update-ratio-out-of-range"},
    # BatchNorm over 4 examples trains on other statistics than it evaluates with.
    "batchnorm-small-batch": {"overfitting"},
    # Training inputs 1000x larger than the validation inputs ruin validation.
    "batchnorm-stats-explode": {"overfitting", "loss-metric-divergence"},
    # The collapsed class is a quarter of the balanced validation set, so its lost recall
    # raises the validation loss and lowers the accuracy while the training loss falls.
    "rare-class-collapse": {"overfitting", "loss-metric-divergence"},
    # Relabelling class 1 as class 2 makes class 1 vanish from the training labels (a rare
    # class that collapses), spikes the loss where the labels change, and raises the
    # validation loss.
    "loss-metric-divergence": {"rare-class-collapse", "overfitting", "loss-spike"},
    # Each climb of the cycling cosine back to its peak is a boundary, and the loss
    # spikes after some of them.
    "lr-schedule-unit-mismatch": {"schedule-boundary-spike"},
    # Clipping scaled gradients at 1.0 clips every step.
    "clip-before-unscale": {"clipping-every-step"},
    # The two tasks conflict on the shared trunk (cosine near -0.55), which is what makes
    # raising one task's weight hurt the other.
    "negative-transfer": {"task-gradient-imbalance"},
    # Raw logits fed to nll_loss grow without bound and ruin the validation loss.
    "logit-explosion": {"overfitting"},
    # The first full-size Adam steps kill most of the second layer's ReLUs.
    "missing-warmup": {"dead-activations"},
}

# Info findings that healthy runs may carry: clipping at 5.0 never fires in a run whose
# largest gradient norm is 1.8, which is worth knowing but is no fault.
HEALTHY_INFO = {"healthy-sgd-step-decay": {"clipping-never-fires"}}


@pytest.fixture(scope="module")
def rules():
    return load_rules()


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory) -> dict[str, Path]:
    """Record every scenario once for this module, from real training."""
    folder = tmp_path_factory.mktemp("fresh_runs")
    runs = {}
    for name, scenario in generate.SCENARIOS.items():
        scenario(folder / name)
        runs[name] = folder / name
    return runs


def _findings(run_dir: Path, rules) -> list:
    with Run.open(run_dir) as run:
        report = evaluate(run, rules)
    assert report.errored == []
    return report.findings


def test_every_failure_scenario_has_expectation() -> None:
    assert sorted(EXPECTED) == sorted(FAILURES)


def test_every_builtin_rule_has_scenario(rules) -> None:
    assert sorted(rule.id for rule in rules) == sorted(rule_id for rule_id, _, _ in
                                                       EXPECTED.values())


def test_every_rule_has_page(rules) -> None:
    missing = [rule.id for rule in rules if not (ROOT / "docs" / "rules" / f"{rule.id}.md").is_file()]
    assert missing == []


@pytest.mark.parametrize("name", FAILURES)
def test_rule_fires_on_sample_run(name: str, rules) -> None:
    keys = [finding.key for finding in _findings(SAMPLE_RUNS / name, rules)]
    assert EXPECTED[name] in keys


@pytest.mark.parametrize("name", FAILURES)
def test_rule_fires_on_fresh_run(name: str, rules, fresh_runs) -> None:
    rule_ids = [finding.rule_id for finding in _findings(fresh_runs[name], rules)]
    assert EXPECTED[name][0] in rule_ids


@pytest.mark.parametrize("name", FAILURES)
def test_failure_run_has_no_unrelated_finding(name: str, rules) -> None:
    allowed = {EXPECTED[name][0]} | ALSO_EXPECTED.get(name, set())
    unrelated = [finding.key for finding in _findings(SAMPLE_RUNS / name, rules)
                 if finding.rule_id not in allowed]
    assert unrelated == []


def _unexpected_on_healthy(name: str, findings) -> list:
    allowed_info = HEALTHY_INFO.get(name, set())
    return [finding.key for finding in findings
            if finding.severity != "info" or finding.rule_id not in allowed_info]


@pytest.mark.parametrize("name", HEALTHY)
def test_rules_silent_on_healthy_sample_run(name: str, rules) -> None:
    assert _unexpected_on_healthy(name, _findings(SAMPLE_RUNS / name, rules)) == []


@pytest.mark.parametrize("name", HEALTHY)
def test_rules_silent_on_healthy_fresh_run(name: str, rules, fresh_runs) -> None:
    assert _unexpected_on_healthy(name, _findings(fresh_runs[name], rules)) == []


@pytest.mark.parametrize("name", FAILURES)
def test_failure_rule_evaluated_on_healthy_runs(name: str, rules) -> None:
    """A rule is silent on a healthy run because it looked, not because data was missing.

    Each rule must be evaluated on at least one healthy run.
    """
    rule_id = EXPECTED[name][0]
    evaluated_on = []
    for healthy in HEALTHY:
        with Run.open(SAMPLE_RUNS / healthy) as run:
            report = evaluate(run, rules)
        if rule_id in report.passed:
            evaluated_on.append(healthy)
    assert evaluated_on != []


def test_sample_runs_fit_size_budget() -> None:
    size = sum(file.stat().st_size for file in SAMPLE_RUNS.rglob("*") if file.is_file())
    assert size < 10 * 2**20


def test_sample_run_regenerates_same_values(fresh_runs) -> None:
    """The generator is deterministic: a fresh recording equals the committed run."""
    for name in ("healthy-resume", "schedule-boundary-spike"):
        committed = _scalars(SAMPLE_RUNS / name)
        fresh = _scalars(fresh_runs[name])
        assert committed.column_names == fresh.column_names
        assert committed.to_pylist() == fresh.to_pylist()


def test_sample_run_metadata_matches(fresh_runs) -> None:
    committed = json.loads((SAMPLE_RUNS / "healthy-resume" / "run.json").read_text())
    fresh = json.loads((fresh_runs["healthy-resume"] / "run.json").read_text())
    for field in ("params", "optimizer", "config", "settings"):
        assert committed[field] == fresh[field]


def _scalars(run_dir: Path):
    parts = sorted((run_dir / "scalars").glob("rank-*/part-*.parquet"))
    tables = [pq.read_table(part) for part in parts]
    return pa.concat_tables(tables, promote_options="default").sort_by("step")
