"""Rule files: schema and semantic validation, discovery, built-in rules, --set overrides."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runlens.analyze import (
    ParamOverrideError,
    RuleFileError,
    apply_overrides,
    builtin_rules_dir,
    load_rule_file,
    load_rules,
)
from conftest import RULES_FIXTURES, make_rule, write_rule

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_load_fixture_rule_fields() -> None:
    rule = load_rule_file(RULES_FIXTURES / "loss-above-threshold.yaml")
    assert rule.id == "loss-above-threshold"
    assert rule.severity == "error"
    assert rule.requires == {"scalars": ("step", "loss")}
    assert rule.params["threshold"].value == 5.0
    assert rule.params["threshold"].minimum == 0.0
    assert rule.query_params == frozenset({"threshold"})
    assert rule.bound_params() == {"threshold": 5.0}
    assert rule.references[0].url == "https://duckdb.org/docs/"


def test_load_docs_defaults_to_rule_page(tmp_path: Path) -> None:
    rule = load_rule_file(write_rule(tmp_path, make_rule()))
    assert rule.docs == "docs/rules/loss-above-threshold.md"
    assert rule.references == ()


@pytest.mark.parametrize("docs", ["javascript:alert(1)", "data:text/html,x",
                                  "https://example.org/page", "/etc/passwd", "../up.md"])
def test_load_docs_must_be_relative_path(tmp_path: Path, docs: str) -> None:
    path = write_rule(tmp_path, make_rule(docs=docs))
    with pytest.raises(RuleFileError, match=r"field 'docs'"):
        load_rule_file(path)


def test_load_invalid_yaml(tmp_path: Path) -> None:
    path = write_rule(tmp_path, "id: foo\ntitle: [unclosed\n", name="broken.yaml")
    with pytest.raises(RuleFileError, match=r"broken\.yaml: invalid YAML: .* at line \d+ column"):
        load_rule_file(path)


def test_load_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = write_rule(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(RuleFileError, match=r"list\.yaml: expected a mapping of rule fields"):
        load_rule_file(path)


def test_load_missing_field(tmp_path: Path) -> None:
    rule = make_rule()
    del rule["title"]
    path = write_rule(tmp_path, rule)
    with pytest.raises(
        RuleFileError,
        match=r"loss-above-threshold\.yaml: rule 'loss-above-threshold': field 'title': "
        r"missing; this field is required",
    ):
        load_rule_file(path)


def test_load_bad_severity(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(id="foo", severity="fatal"))
    with pytest.raises(
        RuleFileError,
        match=r"foo\.yaml: rule 'foo': field 'severity': 'fatal' is not one of "
        r"error, warning, info$",
    ):
        load_rule_file(path)


def test_load_unknown_field(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(threshold=3))
    with pytest.raises(
        RuleFileError, match=r"field 'threshold': unknown field; allowed fields: id, title"
    ):
        load_rule_file(path)


def test_load_id_not_kebab_case(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(id="Loss_Above"), name="x.yaml")
    with pytest.raises(RuleFileError, match=r"x\.yaml: rule 'Loss_Above': field 'id': .*'-'"):
        load_rule_file(path)


def test_load_two_statements(tmp_path: Path) -> None:
    query = "SELECT 1 AS step_start, 1 AS step_end WHERE $threshold > 0; SELECT 2"
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(
        RuleFileError,
        match=r"rule 'loss-above-threshold': field 'query': contains 2 statements; "
        r"a rule query must be exactly one SELECT",
    ):
        load_rule_file(path)


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ("COPY (SELECT $threshold) TO 'out.csv'", "COPY"),
        ("CREATE TABLE t AS SELECT $threshold AS x", "CREATE"),
        ("ATTACH 'other.db'", "ATTACH"),
        ("PRAGMA version", "PRAGMA"),
    ],
)
def test_load_non_select_rejected(tmp_path: Path, query: str, kind: str) -> None:
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(
        RuleFileError, match=rf"field 'query': is a {kind} statement; a rule query must be one"
    ):
        load_rule_file(path)


def test_load_invalid_sql(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(query="SELEC step FROM scalars"))
    with pytest.raises(RuleFileError, match=r"field 'query': invalid SQL: Parser Error"):
        load_rule_file(path)


def test_load_undeclared_param_in_query(tmp_path: Path) -> None:
    query = "SELECT step AS step_start, step AS step_end FROM scalars WHERE loss > $limit " \
            "AND loss > $threshold"
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(
        RuleFileError,
        match=r"field 'query': uses \$limit but 'params' declares no such parameter "
        r"\(declared: threshold\)",
    ):
        load_rule_file(path)


def test_load_positional_param_rejected(tmp_path: Path) -> None:
    query = "SELECT step AS step_start, step AS step_end FROM scalars WHERE loss > ?"
    path = write_rule(tmp_path, make_rule(query=query, params={}))
    with pytest.raises(RuleFileError, match=r"field 'query': uses \$1 but 'params' declares"):
        load_rule_file(path)


def test_load_unused_param(tmp_path: Path) -> None:
    query = "SELECT step AS step_start, step AS step_end FROM scalars WHERE loss > 5"
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(
        RuleFileError, match=r"field 'params\.threshold': declared but the query never reads"
    ):
        load_rule_file(path)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {"type": "number", "default": "1e-3"},
            r"expected a number, got the string '1e-3'.*write it as 1\.0e-3",
        ),
        ({"type": "integer", "default": 2.5}, r"expected an integer, got float 2\.5"),
        ({"type": "integer", "default": True}, r"expected an integer, got bool True"),
        ({"type": "boolean", "default": "yes"}, r"expected true or false, got str 'yes'"),
        ({"type": "string", "default": 3}, r"expected a string, got int 3"),
    ],
)
def test_load_param_default_type(tmp_path: Path, spec: dict, problem: str) -> None:
    params = {"threshold": {**spec, "description": "d"}}
    path = write_rule(tmp_path, make_rule(params=params))
    with pytest.raises(RuleFileError, match=r"field 'params\.threshold\.default': " + problem):
        load_rule_file(path)


def test_load_param_default_out_of_bounds(tmp_path: Path) -> None:
    params = {"threshold": {"type": "number", "default": 5.0, "maximum": 1.0, "description": "d"}}
    path = write_rule(tmp_path, make_rule(params=params))
    with pytest.raises(
        RuleFileError, match=r"field 'params\.threshold\.default': 5\.0 is above the maximum 1\.0"
    ):
        load_rule_file(path)


def test_load_bounds_on_string_param(tmp_path: Path) -> None:
    params = {"threshold": {"type": "string", "default": "a", "minimum": 1, "description": "d"}}
    path = write_rule(tmp_path, make_rule(params=params))
    with pytest.raises(RuleFileError, match=r"'params\.threshold\.minimum': applies to integer"):
        load_rule_file(path)


def test_load_unknown_required_table(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(requires={"scalar": ["loss"]}))
    with pytest.raises(
        RuleFileError, match=r"field 'requires\.scalar': unknown table; tables are: scalars, "
    ):
        load_rule_file(path)


@pytest.mark.parametrize("message", ["{loss.__class__}", "{loss[0]}", "{}", "{0}"])
def test_load_message_field_rejected(tmp_path: Path, message: str) -> None:
    path = write_rule(tmp_path, make_rule(message=message))
    with pytest.raises(RuleFileError, match=r"field 'message': .*(attribute|positional)"):
        load_rule_file(path)


def test_load_message_unbalanced_brace(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(message="loss {loss"))
    with pytest.raises(RuleFileError, match=r"field 'message': invalid format template"):
        load_rule_file(path)


def test_load_reports_every_problem(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(severity="fatal", category="Bad Category"))
    with pytest.raises(RuleFileError) as info:
        load_rule_file(path)
    assert len(info.value.lines) == 2
    assert "field 'category'" in info.value.lines[0]
    assert "field 'severity'" in info.value.lines[1]


def test_load_rules_duplicate_id(tmp_path: Path) -> None:
    write_rule(tmp_path / "a", make_rule())
    write_rule(tmp_path / "b", make_rule())
    with pytest.raises(
        RuleFileError,
        match=r"b/loss-above-threshold\.yaml: rule 'loss-above-threshold': field 'id': "
        r"also defined in .*a/loss-above-threshold\.yaml",
    ):
        load_rules([tmp_path], builtin=False)


def test_load_rules_folder_recursive(tmp_path: Path) -> None:
    write_rule(tmp_path / "deep" / "deeper", make_rule(id="one"))
    write_rule(tmp_path, make_rule(id="two"), name="two.yml")
    write_rule(tmp_path, "not a rule", name="notes.txt")
    write_rule(tmp_path, "id: [broken", name=".hidden.yaml")
    rules = load_rules([tmp_path], builtin=False)
    assert sorted(rule.id for rule in rules) == ["one", "two"]


def test_load_rules_same_file_twice(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule())
    rules = load_rules([path, tmp_path], builtin=False)
    assert [rule.id for rule in rules] == ["loss-above-threshold"]


def test_load_rules_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match=r"nowhere: rule file or folder not found"):
        load_rules([tmp_path / "nowhere"], builtin=False)


def test_load_rules_collects_errors_across_files(tmp_path: Path) -> None:
    write_rule(tmp_path, make_rule(id="aa", severity="fatal"))
    write_rule(tmp_path, make_rule(id="bb", title=""))
    with pytest.raises(RuleFileError) as info:
        load_rules([tmp_path], builtin=False)
    assert len(info.value.lines) == 2
    assert "rule 'aa': field 'severity'" in info.value.lines[0]
    assert "rule 'bb': field 'title': must not be empty" in info.value.lines[1]


def test_builtin_rules_dir_in_checkout() -> None:
    assert builtin_rules_dir() == REPO_ROOT / "rules"


def test_builtin_rules_all_load() -> None:
    rules = load_rules(builtin=True)
    for rule in rules:
        assert rule.source.is_relative_to(builtin_rules_dir())


def test_override_sets_value() -> None:
    rules = load_rules([RULES_FIXTURES], builtin=False)
    updated = apply_overrides(rules, ["loss-above-threshold.threshold=1.5"])
    by_id = {rule.id: rule for rule in updated}
    assert by_id["loss-above-threshold"].bound_params() == {"threshold": 1.5}
    assert by_id["loss-above-threshold"].params["threshold"].default == 5.0
    assert [rule.id for rule in updated] == [rule.id for rule in rules]


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("no-such-rule.threshold=1", r"unknown rule 'no-such-rule'; rules: amp-scale-collapsed, "),
        ("loss-above-threshold.limit=1", r"has no param 'limit'; params: threshold"),
        ("loss-above-threshold.threshold=high", r"param 'threshold' expects a finite number, "
                                                r"got 'high'"),
        ("loss-above-threshold.threshold=nan", r"expects a finite number, got 'nan'"),
        ("loss-above-threshold.threshold=-1", r"param 'threshold': -1\.0 is below the minimum"),
        ("loss-above-threshold=1", r"expected RULE\.PARAM=VALUE"),
        ("loss-above-threshold.threshold", r"expected RULE\.PARAM=VALUE"),
    ],
)
def test_override_rejected(override: str, problem: str) -> None:
    rules = load_rules([RULES_FIXTURES], builtin=False)
    with pytest.raises(ParamOverrideError, match=r"^--set .*" + problem):
        apply_overrides(rules, [override])


def test_override_integer_and_boolean(tmp_path: Path) -> None:
    params = {
        "window": {"type": "integer", "default": 10, "minimum": 1, "description": "w"},
        "strict": {"type": "boolean", "default": False, "description": "s"},
    }
    query = "SELECT step AS step_start, step AS step_end FROM scalars " \
            "WHERE step > $window AND $strict"
    rule = make_rule(params=params, query=query, message="step {step_start}")
    rules = [load_rule_file(write_rule(tmp_path, rule))]
    updated = apply_overrides(rules, ["loss-above-threshold.window=20",
                                      "loss-above-threshold.strict=true"])
    assert updated[0].bound_params() == {"strict": True, "window": 20}
    with pytest.raises(ParamOverrideError, match=r"param 'window' expects an integer, got '2\.5'"):
        apply_overrides(rules, ["loss-above-threshold.window=2.5"])


def test_load_query_unknown_table(tmp_path: Path) -> None:
    query = "SELECT step AS step_start, step AS step_end FROM scalar WHERE loss > $threshold"
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(
        RuleFileError,
        match=r"rule 'loss-above-threshold': field 'query': Catalog Error: "
        r"Table with name scalar does not exist",
    ) as info:
        load_rule_file(path)
    assert len(info.value.lines) == 1


def test_load_query_unknown_column(tmp_path: Path) -> None:
    query = ("SELECT step AS step_start, step AS step_end, los\nFROM scalars\n"
             "WHERE loss > $threshold")
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(
        RuleFileError,
        match=r"field 'query': Binder Error: Referenced column \"los\" not found",
    ) as info:
        load_rule_file(path)
    assert len(info.value.lines) == 1
    assert "^" not in str(info.value)


def test_load_query_without_step_columns(tmp_path: Path) -> None:
    query = "SELECT step, loss FROM scalars WHERE loss > $threshold"
    path = write_rule(tmp_path, make_rule(query=query, message="{loss}"))
    with pytest.raises(
        RuleFileError, match=r"field 'query': query result lacks column step_start, step_end"
    ):
        load_rule_file(path)


def test_load_query_repeated_column(tmp_path: Path) -> None:
    query = ("SELECT step AS step_start, step AS step_end, loss AS x, loss AS x FROM scalars "
             "WHERE loss > $threshold")
    path = write_rule(tmp_path, make_rule(query=query, message="{x}"))
    with pytest.raises(RuleFileError, match=r"field 'query': query result has column x more"):
        load_rule_file(path)


def test_load_message_field_not_a_column(tmp_path: Path) -> None:
    path = write_rule(tmp_path, make_rule(message="loss {los} at step {step_start}"))
    with pytest.raises(
        RuleFileError,
        match=r"rule 'loss-above-threshold': field 'message': field \{los\} is not a column "
        r"of the query result; columns: step_start, step_end, loss$",
    ):
        load_rule_file(path)


def test_load_query_reads_declared_user_scalar(tmp_path: Path) -> None:
    query = ("SELECT step AS step_start, step AS step_end, val_acc FROM scalars "
             "WHERE val_acc > $threshold")
    rule = make_rule(query=query, requires={"scalars": ["step", "val_acc"]},
                     message="{val_acc}")
    assert load_rule_file(write_rule(tmp_path, rule)).id == "loss-above-threshold"


def test_load_query_undeclared_user_scalar(tmp_path: Path) -> None:
    query = ("SELECT step AS step_start, step AS step_end FROM scalars "
             "WHERE val_acc > $threshold")
    path = write_rule(tmp_path, make_rule(query=query))
    with pytest.raises(RuleFileError, match=r"Referenced column \"val_acc\" not found.*"
                                            r"list user scalars and run\.json fields"):
        load_rule_file(path)


def test_load_query_reads_declared_run_params_field(tmp_path: Path) -> None:
    query = ("SELECT NULL AS step_start, NULL AS step_end, name, betas[2] AS beta2 "
             "FROM run_params WHERE momentum > $threshold")
    rule = make_rule(query=query, requires={"run_params": ["name", "betas", "momentum"]},
                     message="{name}")
    assert load_rule_file(write_rule(tmp_path, rule)).query_params == {"threshold"}


def test_load_query_reads_segment_fields(tmp_path: Path) -> None:
    query = ("SELECT start_step AS step_start, start_step AS step_end, argv, started "
             "FROM segments WHERE segment > $threshold")
    rule = make_rule(query=query, requires={"segments": []}, message="{argv}")
    assert load_rule_file(write_rule(tmp_path, rule)).id == "loss-above-threshold"


def test_load_query_not_executed(tmp_path: Path) -> None:
    query = ("SELECT NULL AS step_start, NULL AS step_end, sum(hash(a.range * 7 + 1) % 13) "
             "AS n FROM range(100000000000) a WHERE $threshold > 0")
    started = time.monotonic()
    load_rule_file(write_rule(tmp_path, make_rule(query=query, message="{n}")))
    assert time.monotonic() - started < 5


def test_load_query_file_read_left_to_sandbox() -> None:
    # Whether a file read is allowed depends on the run directory, which a rule file
    # does not know, so the loader accepts it and the run's sandbox decides.
    rule = load_rule_file(RULES_FIXTURES / "read-passwd.yaml")
    assert rule.id == "read-outside-run"


def test_load_query_check_cannot_read_files(tmp_path: Path) -> None:
    # With file access the query would bind, and the message check would reject {nope}.
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    query = (f"SELECT 1 AS step_start, 1 AS step_end, content "
             f"FROM read_text('{secret}') WHERE $threshold > 0")
    path = write_rule(tmp_path, make_rule(query=query, message="{nope}"))
    rule = load_rule_file(path)
    assert rule.id == "loss-above-threshold"


@pytest.mark.parametrize("query", ["DESCRIBE scalars", "SUMMARIZE scalars", "SHOW TABLES"])
def test_load_describe_style_query_reaches_column_check(tmp_path: Path, query: str) -> None:
    # DuckDB 1.x reports these statements as SELECT; they fail the step column check.
    path = write_rule(tmp_path, make_rule(query=query, params={}, message="m"))
    with pytest.raises(RuleFileError, match=r"field 'query': query result lacks column"):
        load_rule_file(path)


def test_load_strips_description_and_remediation(tmp_path: Path) -> None:
    text = (RULES_FIXTURES / "loss-above-threshold.yaml").read_text()
    text = text.replace("description: Flags each step whose loss is above the threshold.",
                        "description: >\n  Flags each step whose loss\n  is above it.\n\n")
    text = text.replace("remediation: Lower the learning rate.",
                        "remediation: |\n  Lower the learning rate.  \n")
    rule = load_rule_file(write_rule(tmp_path, text, name="r.yaml"))
    assert rule.description == "Flags each step whose loss is above it."
    assert rule.remediation == "Lower the learning rate."


def test_load_rules_folder_without_rule_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no rules here")
    with pytest.raises(
        RuleFileError, match=rf"^no rule files \(\.yaml, \.yml\) found in {tmp_path}$"
    ):
        load_rules([tmp_path], builtin=False)


def test_override_malformed_example_names_loaded_rule() -> None:
    rules = load_rules([RULES_FIXTURES], builtin=False)
    with pytest.raises(
        ParamOverrideError,
        match=r"expected RULE\.PARAM=VALUE, such as --set loss-above-threshold\.threshold=5\.0$",
    ):
        apply_overrides(rules, ["threshold=3"])


def test_override_malformed_example_without_params(tmp_path: Path) -> None:
    rule = make_rule(params={}, query="SELECT 1 AS step_start, 1 AS step_end", message="m")
    rules = [load_rule_file(write_rule(tmp_path, rule))]
    with pytest.raises(
        ParamOverrideError, match=r"such as --set clipping-every-step\.min_share=0\.95$"
    ):
        apply_overrides(rules, ["threshold=3"])
