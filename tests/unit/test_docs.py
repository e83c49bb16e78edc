"""The docs say what the code does: README.md and docs/*.md checked against the code they describe.

* the ``batch.start`` table in docs/ARCHITECTURE.md: one row per ``StartBatch`` field, each default
  the one the dispatcher fills in (``validate`` on an empty command), each range the contract's;
  no prose anywhere gives a field another default;
* the configuration table in docs/development.md: setting a variable to its documented default
  changes nothing, setting it to something else changes something (so it is the variable read);
  it lists every setting of ``shared.config`` and no other, each with its crosstalk.toml key;
* every ``crosstalk <command> --flag`` in a code span or code block exists in the CLI (the typer
  app walked through click), every ``./ct <recipe>`` is a recipe of the justfile;
* README.md stays short, and every relative link in README.md and docs/*.md points to a file that
  exists (and, into a Markdown file, to a heading it has).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import typer.main

from cli.app import app
from services.dispatcher.validate import Rejection, validate
from shared import config, scenarios
from shared.config_sources import key_of
from shared.contracts import BatchSpec, StartBatch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ALL_DOCS = [README, *DOCS]
README_MAX_LINES = 160
ELLIPSIS = "…"


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- markdown pieces


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def prose(text: str) -> str:
    return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)


def code_snippets(text: str) -> Iterator[str]:
    """Each command-line of a code block (backslash continuations joined) and each inline code span."""
    for block in fenced_blocks(text):
        yield from block.replace("\\\n", " ").splitlines()
    yield from (m.replace("\n", " ") for m in re.findall(r"`([^`]+)`", prose(text)))


def table_rows(section: str) -> list[list[str]]:
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def section_of(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line), up to the next heading of its level or above."""
    m = re.search(rf"^(#+) {re.escape(heading)}\n", text, flags=re.M)
    assert m, f"heading {heading!r} not found"
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[m.end():], flags=re.M)
    return text[m.end(): m.end() + end.start() if end else len(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


# --------------------------------------------------------------------------- batch.start


def batch_start_table() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = table_rows(section_of(text, "`batch.start` (command)"))
    assert rows and rows[0] == ["field", "default", "meaning"], rows[:1]
    return {unquote(r[0]): (r[1], r[2]) for r in rows[1:]}


@pytest.fixture(scope="module")
def settings() -> config.Settings:
    return config.load({})


def spec_of(cmd: StartBatch, settings: config.Settings) -> BatchSpec | Rejection:
    return validate(cmd, settings, scenarios.library(), received_at=1_795_000_000.0, seed="docs")


def effective(settings: config.Settings, **fields: object) -> BatchSpec:
    got = spec_of(StartBatch(**fields), settings)  # type: ignore[arg-type]
    assert isinstance(got, BatchSpec), got
    return got


def first_token(cell: str) -> str:
    return unquote(re.split(r"\s+\(|\s+", cell.strip(), maxsplit=1)[0])


def test_batch_start_table_lists_every_field_of_the_contract() -> None:
    assert sorted(batch_start_table()) == sorted(StartBatch.__struct_fields__)


def test_batch_start_documented_defaults_are_the_dispatchers(settings: config.Settings) -> None:
    """Each default as the dispatcher fills it in for ``{}``: what a user gets when leaving the field out."""
    table = batch_start_table()
    spec = effective(settings)
    library = scenarios.library()
    documented = {name: first_token(default) for name, (default, _) in table.items()}
    expected = {
        "batch_id": "generated",
        "conversations": str(spec.conversations),
        "scenario": spec.scenario,
        "scenarios": "none",
        "trials": str(spec.trials),
        "max_turns": str(spec.max_turns),
        "mode": spec.mode,
        "target_agent": "none",
        "target_metadata": "none",
    }
    for name, want in expected.items():
        assert documented[name] == want, f"batch.start {name}: documented default {table[name][0]!r}, code {want!r}"
    assert spec.conversations == 1 and spec.max_turns == 8 and spec.mode == "text" and spec.trials == 1
    assert spec.scenario == scenarios.DEFAULT_SCENARIO
    assert spec.batch_id and StartBatch().batch_id is None  # "generated"
    assert spec.scenarios == () and spec.target_agent is None and spec.target_metadata is None  # "none"
    # language: "the scenario's"
    assert table["language"][0].startswith("the scenario's")
    assert spec.language == library[spec.scenario].language
    # concurrency: min(conversations, CROSSTALK_MAX_CONCURRENCY), shown at both sides of the cap
    assert table["concurrency"][0] == "min(conversations, `CROSSTALK_MAX_CONCURRENCY`)"
    assert effective(settings).concurrency == 1
    assert effective(settings, conversations=3).concurrency == 3
    over = settings.max_concurrency + 5
    assert effective(settings, conversations=over).concurrency == settings.max_concurrency


def documented_range(meaning: str) -> tuple[str, str] | None:
    m = re.search(rf"(\d+) {ELLIPSIS} (`[A-Z_]+`|\d+)", meaning)
    return (m.group(1), unquote(m.group(2))) if m else None


def test_batch_start_documented_ranges_are_the_contracts(settings: config.Settings) -> None:
    table = batch_start_table()
    info = {f.name: f for f in msgspec.inspect.type_info(StartBatch).fields}  # type: ignore[attr-defined]

    def int_bounds(name: str) -> tuple[int | None, int | None]:
        t = info[name].type
        types = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
        (it,) = [x for x in types if isinstance(x, msgspec.inspect.IntType)]
        return it.ge, it.le

    for name in ("max_turns", "trials"):
        rng = documented_range(table[name][1])
        assert rng is not None, f"batch.start {name}: no '1 … N' range documented"
        assert (int(rng[0]), int(rng[1])) == int_bounds(name), f"batch.start {name}: documented {rng}"
    assert documented_range(table["conversations"][1]) == ("1", "CROSSTALK_MAX_CONVERSATIONS")
    assert int_bounds("conversations")[0] == 1
    top = settings.max_conversations
    assert isinstance(spec_of(StartBatch(conversations=top), settings), BatchSpec)
    assert isinstance(spec_of(StartBatch(conversations=top + 1), settings), Rejection)
    assert documented_range(table["concurrency"][1]) == ("1", "CROSSTALK_MAX_CONCURRENCY")
    assert isinstance(spec_of(StartBatch(concurrency=settings.max_concurrency + 1), settings), Rejection)
    assert f"≤ {info['target_metadata'].type.types[0].max_length} characters" in table["target_metadata"][1]


def test_no_prose_gives_a_batch_start_field_another_default() -> None:
    """``conversations`` (1 … `CROSSTALK_MAX_CONVERSATIONS`, default 10000) must never be written again."""
    spec = effective(config.load({}))
    defaults = {"conversations": spec.conversations, "max_turns": spec.max_turns, "trials": spec.trials,
                "mode": spec.mode, "scenario": spec.scenario}
    bad = []
    for path in ALL_DOCS:
        text = path.read_text(encoding="utf-8")
        for field, value in defaults.items():
            for m in re.finditer(rf"`{field}`\s*\(([^()]*)\)", text):
                said = re.search(r"\bdefault:?\s+`?([\w.-]+)`?", m.group(1))
                if said and said.group(1) != str(value):
                    bad.append(f"{rel(path)}: {m.group(0)!r} (the default is {value})")
    assert not bad, "\n".join(bad)


def test_max_conversations_documented_default_is_the_settings(settings: config.Settings) -> None:
    for path in ALL_DOCS:
        for var, value in (("CROSSTALK_MAX_CONVERSATIONS", settings.max_conversations),
                           ("CROSSTALK_MAX_CONCURRENCY", settings.max_concurrency)):
            for m in re.finditer(rf"`{var}`\W{{0,4}}\(?default (\d+)", path.read_text(encoding="utf-8")):
                assert int(m.group(1)) == value, f"{rel(path)}: {m.group(0)!r}, the code says {value}"


# --------------------------------------------------------------------------- configuration table


def config_table() -> list[tuple[list[str], list[str], str]]:
    """(variables, crosstalk.toml keys, default cell) per row of docs/development.md's configuration table."""
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    rows = table_rows(section_of(text, "Configuration"))
    assert rows[0] == ["variable", "crosstalk.toml key", "default", "what it sets"]
    return [(re.findall(r"`([A-Z][A-Z0-9_]+)`", var_cell), re.findall(r"`([a-z0-9_]+)`", key_cell), default_cell)
            for var_cell, key_cell, default_cell, _ in rows[1:]]


def config_rows() -> list[tuple[str, str]]:
    pairs = []
    for names, _, default_cell in config_table():
        if not re.fullmatch(r"`[^`]*`(,\s*`[^`]*`)*", default_cell):
            continue  # a default in words ("unset", "the checkout's `data/`"): not a literal to check
        values = re.findall(r"`([^`]*)`", default_cell)
        assert len(names) == len(values), f"config table: {names} | {default_cell}: one default per variable"
        pairs.extend(zip(names, values, strict=True))
    return pairs


def test_configuration_table_is_every_setting_and_its_key() -> None:
    documented = [var for names, _, _ in config_table() for var in names]
    assert sorted(documented) == sorted(set(documented)), "a variable in two rows"
    settings = config.variables()
    assert not set(settings) - set(documented), f"settings missing from the table: {sorted(set(settings) - set(documented))}"
    assert not set(documented) - set(settings), f"documented, not settings: {sorted(set(documented) - set(settings))}"
    for names, keys, _ in config_table():
        assert keys == [key_of(var) for var in names], f"config table: {names}: keys {keys}"


def perturbed(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value + "x"
    doubled = number * 2 if number else 1
    return str(int(doubled)) if value.isdigit() else str(doubled)


def test_configuration_documented_defaults_are_the_codes() -> None:
    rows = config_rows()
    assert len(rows) >= 20, rows
    base = config.load({})
    for var, value in rows:
        assert config.load({var: value}) == base, f"{var}={value} (documented default) changes the settings"
        try:
            changed = config.load({var: perturbed(value)}) != base
        except config.ConfigError as exc:
            changed = exc.var == var
        assert changed, f"{var}: setting it to {perturbed(value)!r} changes nothing: not a variable config reads"


# --------------------------------------------------------------------------- the CLI


Command = Any  # typer's own (vendored) click command: duck-typed, ``.commands`` on groups, ``.params``


def cli_tree() -> dict[tuple[str, ...], Command]:
    """Every command of ``crosstalk`` by its path (``("batch", "start")``), the root as ``()``."""
    root = typer.main.get_command(app)
    tree: dict[tuple[str, ...], Command] = {}

    def walk(path: tuple[str, ...], cmd: Command) -> None:
        tree[path] = cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk((*path, name), sub)

    walk((), root)
    return tree


def option_names(cmd: Command) -> set[str]:
    names = {"-h", "--help"}
    for p in cmd.params:
        if p.param_type_name == "option":
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


STOP = {"#", "&&", ";", "||", ">", "2>&1", "|&"}


def crosstalk_invocations(snippet: str, tree: dict[tuple[str, ...], Command]) -> Iterator[
        tuple[tuple[str, ...], list[str]]]:
    """(command path, flags) of every ``crosstalk ...`` in one snippet (``.venv/bin/crosstalk`` too)."""
    for m in re.finditer(r"(?:^|[\s(/\"'])crosstalk(?=\s)", snippet):
        tokens = snippet[m.end():].split()
        path: tuple[str, ...] = ()
        i = 0
        while i < len(tokens) and (*path, tokens[i]) in tree:
            path = (*path, tokens[i])
            i += 1
        if not path and not (i < len(tokens) and tokens[i].startswith("-")):
            continue  # prose like "crosstalk runs": no command, no flag
        flags = []
        for j, tok in enumerate(tokens[i:], start=i):
            if tok in STOP or tok.startswith("#"):
                break
            if tok == "|" and not (j + 1 < len(tokens) and tokens[j + 1].startswith("-")):
                break  # a pipe; "[--a | --b]" is alternatives
            if tok in ("crosstalk", ".venv/bin/crosstalk", "./ct"):
                break
            flag = re.match(r"^\[?(--?[A-Za-z][\w-]*)", tok)
            if flag:
                flags.append(flag.group(1))
        yield path, flags


def test_every_documented_crosstalk_flag_exists() -> None:
    tree = cli_tree()
    seen, bad = 0, []
    for path in ALL_DOCS:
        for snippet in code_snippets(path.read_text(encoding="utf-8")):
            for cmd_path, flags in crosstalk_invocations(snippet, tree):
                seen += 1
                known = option_names(tree[cmd_path])
                for flag in flags:
                    if flag not in known:
                        bad.append(f"{rel(path)}: crosstalk {' '.join(cmd_path)} {flag}: no such option "
                                   f"(has {', '.join(sorted(known))})")
    assert seen >= 20, f"only {seen} crosstalk commands found: the scanner is broken"
    assert not bad, "\n".join(bad)


def test_the_scanner_catches_a_wrong_flag() -> None:
    tree = cli_tree()
    got = list(crosstalk_invocations(".venv/bin/crosstalk batch start -n 5 --folow # a comment --x", tree))
    assert got == [(("batch", "start"), ["-n", "--folow"])]
    assert "--folow" not in option_names(tree[("batch", "start")])
    got = list(crosstalk_invocations("crosstalk compare A B [--allow-not-judged | --thresholds g.yaml] | tee x", tree))
    assert got == [(("compare",), ["--allow-not-judged", "--thresholds"])]
    assert list(crosstalk_invocations("crosstalk runs batches", tree)) == []


# --------------------------------------------------------------------------- ./ct recipes


def justfile_recipes() -> set[str]:
    just = shutil.which("just") or str(Path(sys.executable).parent / "just")
    out = subprocess.run([just, "--justfile", str(ROOT / "justfile"), "--summary"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_every_documented_ct_recipe_exists() -> None:
    recipes = justfile_recipes()
    assert {"demo", "test", "up", "down", "status"} <= recipes
    bad, seen = [], 0
    for path in ALL_DOCS:
        for m in re.finditer(r"\./ct\s+([a-z][\w-]*)", path.read_text(encoding="utf-8")):
            seen += 1
            if m.group(1) not in recipes:
                bad.append(f"{rel(path)}: ./ct {m.group(1)}: no such recipe (justfile: {', '.join(sorted(recipes))})")
    assert seen >= 10
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- README size and links


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES} (details go in docs/)"


def anchors(md: Path) -> set[str]:
    text = prose(md.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_slug_is_githubs() -> None:
    assert slug("### `batch.start` (command)".lstrip("# ")) == "batchstart-command"
    assert slug("Testing the user's own agent (`target_agent`)") == "testing-the-users-own-agent-target_agent"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=rel)
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{target}: {rel(dest) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target}: no heading #{fragment} in {rel(dest)}")
    assert not bad, f"{rel(doc)}:\n" + "\n".join(bad)
