"""Rule files: schema and semantic validation, discovery, built-in rules, --set overrides."""

from __future__ import annotations

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
    rules = [load_rule_file(write_rule(tmp_path, make_rule(params=params, query=query)))]
    updated = apply_overrides(rules, ["loss-above-threshold.window=20",
                                      "loss-above-threshold.strict=true"])
    assert updated[0].bound_params() == {"strict": True, "window": 20}
    with pytest.raises(ParamOverrideError, match=r"param 'window' expects an integer, got '2\.5'"):
        apply_overrides(rules, ["loss-above-threshold.window=2.5"])
