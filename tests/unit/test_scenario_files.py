"""LiveKit scenario files: loaded unchanged, crosstalk's extension read beside them, every error with its line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app as cli_app
from shared import batch_plan, scenario_files, scenarios
from shared.contracts import BatchSpec, JobMetadata
from shared.scenario_files import ScenarioFileError

LIVEKIT_ONLY = """\
name: from-lk
scenarios:
  - label: Angry about a late order
    instructions: |
      You ordered a pizza 90 minutes ago.
      You are angry.

      Demand a refund.
    agent_expectations: |
      - Apologises
      - Offers a refund
    tags:
      team: food
      tier: "2"
    userdata:
      order: {id: 77, items: [{sku: P1, qty: 2}]}
    some_future_field: [1, 2]
"""


def test_a_plain_livekit_file_loads_unchanged() -> None:
    f = scenario_files.load_text(LIVEKIT_ONLY, "lk.yaml")
    (sc,) = f.scenarios
    raw = yaml.safe_load(LIVEKIT_ONLY)["scenarios"][0]
    assert sc.doc == raw  # unknown fields, multi-line text and nested userdata as written
    assert sc.id == "angry-about-a-late-order" and sc.language == "en" and f.name == "from-lk"
    assert sc.agent_expectations == raw["agent_expectations"] and sc.tags == {"team": "food", "tier": "2"}
    assert sc.userdata == {"order": {"id": 77, "items": [{"sku": "P1", "qty": 2}]}}
    assert sc.roles["customer"].persona == raw["instructions"].strip()
    assert "Offers a refund" in sc.roles["support"].goal  # the support role works to the expectations
    assert scenario_files.from_doc(scenario_files.to_doc(sc)) == sc


BAD = """\
name: broken
scenarios:
  - label: ok one
    instructions: fine
    crosstalk:
      script: [{role: customer, text: hi}]
  - label: bad tags
    instructions: x
    tags:
      priority: 1
  - instructions: no label here
  - label: bad extension
    instructions: x
    crosstalk:
      max_turns: many
  - label: typo
    instructions: x
    crosstalk:
      checks:
        must_mentoin: [a]
  - label: support first
    instructions: x
    crosstalk:
      script:
        - {role: support, text: hello}
"""


def test_every_error_names_its_line_and_field() -> None:
    with pytest.raises(ScenarioFileError) as err:
        scenario_files.load_text(BAD, "bad.yaml")
    got = [(p.line, p.field) for p in err.value.problems]
    assert got == [
        (10, "scenarios[1].tags.priority"),
        (11, "scenarios[2].label"),
        (15, "scenarios[3].crosstalk.max_turns"),
        (20, "scenarios[4].crosstalk.checks.must_mentoin"),
        (25, "scenarios[5].crosstalk.script[0].role"),
    ]
    text = str(err.value)
    assert "bad.yaml:10: scenarios[1].tags.priority: tag values must be strings" in text
    assert "crosstalk.checks.must_mentoin: unknown key; did you mean must_mention? (known: must_mention," in text


MISSPELT = """\
name: typos
scenarios:
  - label: Locked out
    instructions: You are locked out.
    agent_expectation: |
      - Verifies the caller
    tag: {team: auth}
    crosstalk:
      max_turn: 4
      languge: en
      checks: {must_mention: [reset], ended_by: nobody}
"""


def test_a_misspelt_livekit_key_is_an_error_naming_the_line_and_the_closest_key() -> None:
    with pytest.raises(ScenarioFileError) as err:
        scenario_files.load_text(MISSPELT, "typos.yaml")
    text = str(err.value)
    assert "typos.yaml:5: scenarios[0].agent_expectation: unknown key; did you mean agent_expectations?" in text
    assert "typos.yaml:7: scenarios[0].tag: unknown key; did you mean tags?" in text


def test_every_unknown_key_of_a_mapping_is_reported_not_only_the_first() -> None:
    with pytest.raises(ScenarioFileError) as err:
        scenario_files.load_text(MISSPELT, "typos.yaml")
    got = [(p.line, p.field, p.reason.split(" (known")[0]) for p in err.value.problems]
    assert got == [
        (5, "scenarios[0].agent_expectation", "unknown key; did you mean agent_expectations?"),
        (7, "scenarios[0].tag", "unknown key; did you mean tags?"),
        (9, "scenarios[0].crosstalk.max_turn", "unknown key; did you mean max_turns?"),
        (10, "scenarios[0].crosstalk.languge", "unknown key; did you mean language?"),
        (11, "scenarios[0].crosstalk.checks.ended_by", "Invalid enum value 'nobody'"),
    ]


def test_an_unknown_livekit_key_far_from_every_known_one_is_kept() -> None:
    text = "description: team file\nscenarios:\n  - label: a\n    instructions: b\n    metadata: {x: 1}\n"
    (sc,) = scenario_files.load_text(text, "f.yaml").scenarios
    assert sc.doc is not None and sc.doc["metadata"] == {"x": 1}
    with pytest.raises(ScenarioFileError) as err:  # inside crosstalk: every unknown key is an error
        scenario_files.load_text(text + "    crosstalk: {metadata: 1}\n", "f.yaml")
    assert [(p.line, p.field) for p in err.value.problems] == [(6, "scenarios[0].crosstalk.metadata")]


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("name: x\nscenarios:\n  - label: a\n    instructions: [unclosed\n", 5, "not valid YAML"),
    ("scenarios:\n  - label: a\n    label: b\n    instructions: c\n", 3, "appears twice"),
    ("name: x\n", 1, "must be a non-empty list"),
    ("scenarios:\n  - label: a\n    instructions: x\n  - label: a\n    instructions: y\n", 4, "already used"),
])
def test_syntax_and_structure_errors_have_lines(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ScenarioFileError) as err:
        scenario_files.load_text(text, "f.yaml")
    assert err.value.problems[0].line == line and fragment in str(err.value)


def test_inline_entries_name_the_field_path() -> None:
    with pytest.raises(ScenarioFileError) as err:
        scenario_files.from_entries([{"label": "a", "instructions": "b"}, {"label": "c", "userdata": 3}])
    assert [(p.line, p.field) for p in err.value.problems] == [
        (None, "scenarios[1].userdata"), (None, "scenarios[1].instructions")]
    with pytest.raises(ScenarioFileError) as err:
        scenario_files.from_entries([{"label": "a", "instructions": "b", "agent_expectation": "- greets",
                                      "crosstalk": {"checks": {"must_mentoin": ["x"], "within_turn": 3}}}])
    assert [(p.line, p.field, p.reason.split(" (known")[0]) for p in err.value.problems] == [
        (None, "scenarios[0].agent_expectation", "unknown key; did you mean agent_expectations?"),
        (None, "scenarios[0].crosstalk.checks.must_mentoin", "unknown key; did you mean must_mention?"),
        (None, "scenarios[0].crosstalk.checks.within_turn", "unknown key; did you mean within_turns?"),
    ]


def test_the_library_has_12_scripted_scenarios_in_three_languages() -> None:
    lib = scenarios.library()
    assert len(lib) >= 12 and {"en-account-help", "hi-account-help", "hinglish-refund"} <= set(lib)
    assert {s.language for s in lib.values()} == {"en", "hi", "hi-Latn"}
    assert all(s.script and s.script[0].role == "customer" and s.script[-1].end for s in lib.values())
    hi = lib["hi-account-help"]
    assert hi.script[0].text == "नमस्ते, मुझे अपने खाते में मदद चाहिए। आज सुबह मेरा खाता लॉक हो गया।"


def test_conversations_map_to_scenarios_and_trials_and_carry_their_entry() -> None:
    lib = scenarios.library()
    chosen = [lib["en-account-help"], lib["hinglish-refund"]]
    spec = BatchSpec(batch_id="b1", conversations=6, concurrency=2, scenario="en-account-help", language="mixed",
                     max_turns=8, mode="text", scenarios=batch_plan.batch_scenarios(chosen), trials=3)
    slots = [batch_plan.slot(spec, i)[:2] for i in range(6)]
    assert slots == [("en-account-help", 1), ("hinglish-refund", 1), ("en-account-help", 2),
                     ("hinglish-refund", 2), ("en-account-help", 3), ("hinglish-refund", 3)]
    from services.dispatcher.state import job_metadata

    meta = job_metadata(spec, "b1-00003", 1)
    assert (meta.scenario, meta.trial, meta.language) == ("hinglish-refund", 2, "hi-Latn")
    played = batch_plan.job_scenario(meta, {}, embed_script=True)  # no library needed: the entry travels
    assert played.script == lib["hinglish-refund"].script
    assert "[crosstalk script]" in played.instructions("support")
    legacy = JobMetadata(batch_id="b1", conversation_id="b1-00000", attempt=1, scenario="en-account-help",
                         language="en", mode="text", max_turns=8)
    assert batch_plan.job_scenario(legacy, lib, embed_script=True) is lib["en-account-help"]


@pytest.mark.parametrize(("rel", "fragment"), [
    ("../x.yaml", "must not contain '..'"), ("/abs/x.yaml", "relative"), ("a/none.yaml", "no file"),
    ("a/x.txt", ".yaml or .yml"), ("link/x.yaml", "outside the scenario directory"),
])
def test_scenario_file_paths_are_confined(tmp_path: Path, rel: str, fragment: str) -> None:
    root = tmp_path / "scen"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.yaml").write_text(LIVEKIT_ONLY)
    (root / "link").symlink_to(tmp_path / "elsewhere")
    got = batch_plan.resolve_file(rel, root)
    assert isinstance(got, batch_plan.Refusal) and got.field == "scenarios" and fragment in got.reason
    assert isinstance(batch_plan.resolve_file("x.yaml", None), batch_plan.Refusal)


def test_cli_validate_prints_lines_and_exits_2(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(BAD)
    good.write_text(LIVEKIT_ONLY)
    res = CliRunner().invoke(cli_app.app, ["scenarios", "validate", str(good), str(bad)])
    assert res.exit_code == 2
    assert f"{good}: ok, 1 scenario(s)" in res.output
    assert f"{bad}:10: scenarios[1].tags.priority:" in res.output
    assert f"{bad}:25: scenarios[5].crosstalk.script[0].role: the customer speaks first" in res.output
    typos = tmp_path / "typos.yaml"
    typos.write_text(MISSPELT)
    res = CliRunner().invoke(cli_app.app, ["scenarios", "validate", str(typos)])
    assert res.exit_code == 2
    assert [line.split(": ")[1] for line in res.output.splitlines()] == [
        "scenarios[0].agent_expectation", "scenarios[0].tag", "scenarios[0].crosstalk.max_turn",
        "scenarios[0].crosstalk.languge", "scenarios[0].crosstalk.checks.ended_by"]


def test_entries_too_large_for_job_metadata_or_one_nats_message_are_refused() -> None:
    big = scenario_files.from_entries([{"label": "big", "instructions": "x" * (300 * 1024)}])
    got = batch_plan.too_large(batch_plan.batch_scenarios(big))
    assert got is not None and got.field == "scenarios[0]" and "job metadata" in got.reason
    many = scenario_files.from_entries([{"label": f"s{i}", "instructions": "y" * (200 * 1024)} for i in range(4)])
    got = batch_plan.too_large(batch_plan.batch_scenarios(many))
    assert got is not None and got.field == "scenarios" and "split the batch" in got.reason
    assert batch_plan.too_large(batch_plan.batch_scenarios([scenarios.get("hi-account-help")])) is None
