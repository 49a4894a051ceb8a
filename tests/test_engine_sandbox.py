"""The engine: findings, not-evaluated and errored rules, and the DuckDB sandbox."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import duckdb
import pytest

from runlens import format as fmt
from runlens.analyze import (
    Run,
    RuleFileError,
    RunError,
    apply_overrides,
    evaluate,
    load_rule_file,
    load_rules,
)
from runlens.analyze.engine import run_rule
from conftest import (
    RULES_FIXTURES,
    corrupt_data_pages,
    default_meta,
    make_rule,
    steady_scalars,
    write_rule,
    write_run,
)


def fixture_rule(name: str):
    return load_rule_file(RULES_FIXTURES / name)


def test_evaluate_one_finding_per_row(spiking_run: Path) -> None:
    with Run.open(spiking_run) as run:
        report = evaluate(run, [fixture_rule("loss-above-threshold.yaml")])
    assert [f.key for f in report.findings] == [
        ("loss-above-threshold", 40, 40),
        ("loss-above-threshold", 41, 41),
    ]
    finding = report.findings[0]
    assert finding.message == "loss 9.00 at step 40"
    assert finding.evidence == {"loss": 9.0}
    assert finding.severity == "error"
    assert finding.remediation == "Lower the learning rate."
    assert finding.docs == "docs/rules/loss-above-threshold.md"
    assert report.passed == []


def test_evaluate_passed_when_no_rows(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        report = evaluate(run, [fixture_rule("loss-above-threshold.yaml")])
    assert report.findings == []
    assert report.passed == ["loss-above-threshold"]
    assert report.not_evaluated == []


def test_evaluate_override_changes_findings(healthy_run: Path) -> None:
    rules = apply_overrides(
        [fixture_rule("loss-above-threshold.yaml")], ["loss-above-threshold.threshold=1.95"]
    )
    with Run.open(healthy_run) as run:
        report = evaluate(run, rules)
    assert [f.step_start for f in report.findings] == [0, 1, 2, 3, 4]


def test_not_evaluated_missing_column(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        report = evaluate(run, [fixture_rule("needs-amp-scale.yaml")])
    assert report.passed == []
    assert [(n.rule_id, n.missing) for n in report.not_evaluated] == [
        ("amp-scale-collapsed", ("scalars.amp_scale",))
    ]


def test_not_evaluated_all_null_column(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars(10, amp_scale=[None] * 10)})
    with Run.open(tmp_path) as run:
        assert "amp_scale" in run.columns("scalars")
        report = evaluate(run, [fixture_rule("needs-amp-scale.yaml")])
    assert report.not_evaluated[0].missing == ("scalars.amp_scale",)


def test_not_evaluated_missing_table(healthy_run: Path, tmp_path: Path) -> None:
    rule = make_rule(requires={"params": ["grad_norm"], "scalars": ["nope", "loss"]})
    with Run.open(healthy_run) as run:
        report = evaluate(run, [load_rule_file(write_rule(tmp_path / "r", rule))])
    assert report.not_evaluated[0].missing == ("params", "scalars.nope")


def test_run_params_rule_passes(healthy_run: Path) -> None:
    # The default fixture meta puts norm and bias parameters in a group without decay.
    with Run.open(healthy_run) as run:
        report = evaluate(run, [fixture_rule("decay-on-norm.yaml")])
    assert report.passed == ["decay-on-norm-or-bias"]


def test_run_level_finding_has_null_steps(tmp_path: Path) -> None:
    meta = default_meta()
    meta["optimizer"]["param_groups"][1]["hyperparameters"]["weight_decay"] = 0.05
    write_run(tmp_path, {"scalars": steady_scalars(5)}, meta)
    with Run.open(tmp_path) as run:
        report = evaluate(run, [fixture_rule("decay-on-norm.yaml")])
    assert [f.key for f in report.findings] == [
        ("decay-on-norm-or-bias", None, None),
        ("decay-on-norm-or-bias", None, None),
    ]
    assert report.findings[0].message == "bias parameter encoder.bias has weight_decay 0.05"


def test_findings_sorted_by_severity_then_step(spiking_run: Path, tmp_path: Path) -> None:
    info = make_rule(id="late-info", severity="info", params={}, message="m",
                     query="SELECT 1 AS step_start, 1 AS step_end, 'x' AS note")
    warning = make_rule(id="early-warning", severity="warning", params={}, message="m",
                        query="SELECT 90 AS step_start, 95 AS step_end UNION ALL "
                              "SELECT 10, 12")
    rules = [load_rule_file(write_rule(tmp_path, info)),
             load_rule_file(write_rule(tmp_path, warning)),
             fixture_rule("loss-above-threshold.yaml")]
    with Run.open(spiking_run) as run:
        report = evaluate(run, rules)
    assert [f.key for f in report.findings] == [
        ("loss-above-threshold", 40, 40),
        ("loss-above-threshold", 41, 41),
        ("early-warning", 10, 12),
        ("early-warning", 90, 95),
        ("late-info", 1, 1),
    ]


def test_evidence_nonfinite_becomes_none(healthy_run: Path, tmp_path: Path) -> None:
    query = ("SELECT 3 AS step_start, 4 AS step_end, 'nan'::DOUBLE AS ratio, "
             "'inf'::DOUBLE AS peak, 1.5::DECIMAL(4, 2) AS share, [1, 2] AS steps, "
             "$threshold AS threshold")
    rule = make_rule(query=query, message="ratio {ratio} peak {peak} share {share}")
    with Run.open(healthy_run) as run:
        report = evaluate(run, [load_rule_file(write_rule(tmp_path, rule))])
    finding = report.findings[0]
    assert finding.evidence == {"ratio": None, "peak": None, "share": 1.5, "steps": [1, 2],
                                "threshold": 5.0}
    assert list(finding.evidence) == ["ratio", "peak", "share", "steps", "threshold"]
    assert finding.message == "ratio nan peak inf share 1.50"


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("SELECT 1.5 AS step_start, 2 AS step_end WHERE $threshold > 0",
         r"column step_start must hold an integer step or NULL, got Decimal"),
        ("SELECT step AS step_start, step AS step_end FROM scalars "
         "WHERE loss < $threshold AND error('bad row') IS NULL",
         r"query failed: Invalid Input Error: bad row"),
    ],
)
def test_rule_runtime_errors(healthy_run: Path, tmp_path: Path, query: str,
                             problem: str) -> None:
    rule = make_rule(query=query, message="m")
    rules = [load_rule_file(write_rule(tmp_path, rule)), fixture_rule("needs-amp-scale.yaml")]
    with Run.open(healthy_run) as run:
        report = evaluate(run, rules)
        # the connection stays usable after a failed query
        assert run.connection.execute("SELECT 1").fetchall() == [(1,)]
    assert [failure.rule_id for failure in report.errored] == ["loss-above-threshold"]
    assert re.search(problem, report.errored[0].error)
    assert report.not_evaluated[0].rule_id == "amp-scale-collapsed"
    assert report.exit_code("never") == 2


# The loader rejects these queries and messages, so each case swaps them into a loaded
# rule to check that the engine still reports them when a rule bypasses the loader.
@pytest.mark.parametrize(
    ("query", "message", "problem"),
    [
        ("SELECT step FROM scalars WHERE $threshold > 0", "{step}",
         r"query result lacks column step_start, step_end"),
        ("SELECT 1 AS step_start, 2 AS step_end WHERE $threshold > 0", "{loss}",
         r"field 'message': message field \{loss\} is not a column"),
        ("SELECT 1 AS step_start, 2 AS step_end, 1 AS x, 2 AS x WHERE $threshold > 0", "m",
         r"query result has column x more than once"),
        ("SELECT 1 AS step_start, 1 AS step_end, no_such_column WHERE $threshold > 0", "m",
         r"query failed: Binder Error"),
    ],
)
def test_rule_runtime_errors_past_loader(healthy_run: Path, query: str, message: str,
                                         problem: str) -> None:
    rule = dataclasses.replace(fixture_rule("loss-above-threshold.yaml"), query=query,
                               message=message)
    with Run.open(healthy_run) as run:
        report = evaluate(run, [rule])
    assert [failure.rule_id for failure in report.errored] == ["loss-above-threshold"]
    assert re.search(problem, report.errored[0].error)


def test_rule_runtime_error_one_line(healthy_run: Path) -> None:
    query = ("SELECT step AS step_start, step AS step_end FROM scalars\n"
             "WHERE ('x' || step)::INTEGER > $threshold")
    rule = dataclasses.replace(fixture_rule("loss-above-threshold.yaml"), query=query)
    with Run.open(healthy_run) as run:
        report = evaluate(run, [rule])
    error = report.errored[0].error
    assert error.startswith("query failed: Conversion Error: ")
    assert "\n" not in error
    assert "^" not in error


SLOW_QUERY = ("SELECT NULL AS step_start, NULL AS step_end, sum(hash(a.range * 7 + 1) % 13) "
              "AS n FROM range(100000000000) a WHERE $threshold > 0")


def test_evaluate_rule_timeout(spiking_run: Path, tmp_path: Path) -> None:
    slow = load_rule_file(write_rule(tmp_path, make_rule(id="slow-rule", query=SLOW_QUERY,
                                                         message="{n}")))
    rules = [slow, fixture_rule("loss-above-threshold.yaml")]
    started = time.monotonic()
    with Run.open(spiking_run) as run:
        report = evaluate(run, rules, rule_timeout=0.5)
        assert run.connection.execute("SELECT 1").fetchall() == [(1,)]
    assert time.monotonic() - started < 30
    assert [failure.rule_id for failure in report.errored] == ["slow-rule"]
    assert report.errored[0].error == (
        "timed out after 0.5 s; raise --rule-timeout or simplify the query"
    )
    assert [f.rule_id for f in report.findings] == ["loss-above-threshold"] * 2
    assert report.exit_code("never") == 2


def test_evaluate_max_findings(healthy_run: Path) -> None:
    rules = apply_overrides([fixture_rule("loss-above-threshold.yaml")],
                            ["loss-above-threshold.threshold=0"])
    with Run.open(healthy_run) as run:
        report = evaluate(run, rules, max_findings=3)
    assert [f.step_start for f in report.findings] == [0, 1, 2]
    assert report.warnings == [
        "rule 'loss-above-threshold' produced more than 3 findings; the rest are not shown"
    ]


def test_evaluate_max_findings_exact_count_no_warning(spiking_run: Path) -> None:
    with Run.open(spiking_run) as run:
        report = evaluate(run, [fixture_rule("loss-above-threshold.yaml")], max_findings=2)
    assert len(report.findings) == 2
    assert report.warnings == []


def test_evaluate_not_evaluated_sorted_by_id(healthy_run: Path, tmp_path: Path) -> None:
    rules = [
        load_rule_file(write_rule(tmp_path, make_rule(id=rule_id,
                                                      requires={"scalars": ["amp_scale"]})))
        for rule_id in ("zeta", "alpha", "mid")
    ]
    with Run.open(healthy_run) as run:
        report = evaluate(run, rules)
    assert [item.rule_id for item in report.not_evaluated] == ["alpha", "mid", "zeta"]


def test_evaluate_corrupt_data_pages_raises_run_error(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    part = corrupt_data_pages(tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0))
    with Run.open(tmp_path) as run:
        with pytest.raises(RunError, match=rf"^{part}: cannot read Parquet data: .*"
                                           r"move it aside or rerun with --skip-corrupt$"):
            evaluate(run, [fixture_rule("loss-above-threshold.yaml")])


def test_run_rule_data_error_names_part(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    part = corrupt_data_pages(tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0))
    # threshold 0 matches every row, so the Parquet statistics cannot skip the pages
    rule = apply_overrides([fixture_rule("loss-above-threshold.yaml")],
                           ["loss-above-threshold.threshold=0"])[0]
    with Run.open(tmp_path) as run:
        with pytest.raises(RunError, match=rf"^{part}: cannot read Parquet data: "):
            run_rule(run, rule)


def test_sandbox_read_outside_run_errors(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        report = evaluate(run, [fixture_rule("read-passwd.yaml")])
    assert report.findings == []
    assert [failure.rule_id for failure in report.errored] == ["read-outside-run"]
    assert "Permission Error" in report.errored[0].error
    assert "root:" not in report.errored[0].error


@pytest.mark.parametrize("inside_run", [False, True])
def test_sandbox_copy_rule_rejected_at_load(
    healthy_run: Path, tmp_path: Path, inside_run: bool
) -> None:
    target = (healthy_run if inside_run else tmp_path) / "stolen.csv"
    rule = make_rule(query=f"COPY (SELECT loss FROM scalars WHERE loss > $threshold) "
                           f"TO '{target}'")
    path = write_rule(tmp_path / "rules", rule)
    with pytest.raises(RuleFileError, match=r"field 'query': is a COPY statement"):
        load_rules([path], builtin=False)
    assert not target.exists()


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT 1) TO '{outside}/out.csv'",
        "ATTACH '{outside}/other.duckdb'",
        "INSTALL httpfs",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_text('{run}/../outside.txt')",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
        "COPY (SELECT 1) TO '{run}/out.csv'",
        "COPY (SELECT 1) TO '{run}/scalars/rank-0/part-9999-000000.parquet'",
        "SELECT count(*) FROM read_text('{run}/run.json')",
    ],
)
def test_sandbox_connection_rejects(healthy_run: Path, tmp_path: Path, statement: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    sql = statement.format(outside=outside, run=healthy_run.resolve())
    with Run.open(healthy_run) as run:
        with pytest.raises(duckdb.Error, match=r"Permission Error|configuration has been locked"):
            run.connection.execute(sql).fetchall()
    assert list(outside.iterdir()) == []
    assert not (healthy_run / "out.csv").exists()
    assert not (healthy_run / "scalars" / "rank-0" / "part-9999-000000.parquet").exists()


def test_sandbox_allows_reads_of_parts(healthy_run: Path) -> None:
    part = sorted((healthy_run / "scalars").glob("rank-*/part-*.parquet"))[0]
    with Run.open(healthy_run) as run:
        rows = run.connection.execute(f"SELECT count(*) > 0 FROM read_parquet('{part.resolve()}')").fetchall()
    assert rows == [(True,)]


def test_sandbox_memory_and_threads(healthy_run: Path) -> None:
    with Run.open(healthy_run, memory_limit="512MB", threads=1) as run:
        threads, temp = run.connection.execute(
            "SELECT current_setting('threads'), current_setting('temp_directory')"
        ).fetchall()[0]
    assert threads == 1
    assert temp == ""


def test_evaluate_builtin_rules_on_healthy_run(healthy_run: Path) -> None:
    rules = load_rules(builtin=True)
    with Run.open(healthy_run) as run:
        report = evaluate(run, rules)
    assert report.errored == []
    assert len(report.passed) + len(report.not_evaluated) + len(
        {f.rule_id for f in report.findings}
    ) == len(rules)
    assert report.run.steps == 100
