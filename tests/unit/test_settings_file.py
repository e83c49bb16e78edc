"""Settings from crosstalk.toml and .env (shared/config_sources.py): the file is used, the environment
wins, a bad or unknown key names the file, secrets never reach ``crosstalk config show``, and every
variable crosstalk reads has a key of its own."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from infra.stack.config import PORTS, Config, StackError
from shared import config, config_sources

SECRETS = ("lk-secret-4f2a", "sk-test-9c1e", "nats-pw-77d0")


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crosstalk.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def process_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private os.environ (load() exports the file's values into it) and a directory without files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSTALK_", "NATS_", "LIVEKIT_", "OPENAI_"))}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_sources, "ROOT", tmp_path)  # no checkout's crosstalk.toml or .env either
    yield env


def test_a_file_value_is_used(tmp_path: Path) -> None:
    path = toml(tmp_path, 'max_concurrency = 50\nnats_url = ["nats://a:4222", "nats://b:4222"]\ndispatch_rate = 2.5\n')
    s = config.load({}, toml=path)
    assert (s.max_concurrency, s.nats_url, s.dispatch_rate) == (50, "nats://a:4222,nats://b:4222", 2.5)
    assert config.load({}) == config.load({}, toml=None)  # an explicit env reads no file unless given


def test_the_environment_overrides_the_file_and_dotenv_sits_between(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_concurrency = 50\nmax_attempts = 5\nlease_s = 12\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text("CROSSTALK_MAX_ATTEMPTS=7\nCROSSTALK_LEASE_S=9\nUNRELATED_TOOL_VAR=1\n", encoding="utf-8")
    s = config.load({"CROSSTALK_MAX_CONCURRENCY": "7", "CROSSTALK_LEASE_S": "3"}, toml=path, dotenv=dotenv)
    assert (s.max_concurrency, s.max_attempts, s.lease_s) == (7, 7, 3.0)
    src = config.sources({"CROSSTALK_MAX_CONCURRENCY": "7"}, toml=path, dotenv=dotenv)
    assert src.origin("CROSSTALK_MAX_CONCURRENCY") == "env"
    assert src.origin("CROSSTALK_MAX_ATTEMPTS") == str(dotenv)
    assert src.origin("CROSSTALK_LEASE_S") == str(dotenv)
    assert src.origin("CROSSTALK_DISPATCH_RATE") == "default"


def test_a_bad_file_value_names_the_file_and_key(tmp_path: Path) -> None:
    path = toml(tmp_path, "max_concurrency = 0\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load({}, toml=path)
    assert str(exc.value) == f"{path}: max_concurrency: must be between 1 and 100000, got 0"
    assert exc.value.var == f"{path}: max_concurrency"
    # the same value from the environment still names the variable, as before
    with pytest.raises(config.ConfigError, match=r"^CROSSTALK_MAX_CONCURRENCY: must be between"):
        config.load({"CROSSTALK_MAX_CONCURRENCY": "0"}, toml=path)
    for text, reason in (("worker_executor = 'fork'", "must be 'thread' or 'process'"),
                         ("lease_s = 'soon'", "must be a number, got 'soon'"),
                         ("[nats]\nurl = 'x'", "no [sections]"),
                         ("max_concurrency = ", "not valid TOML")):
        with pytest.raises(config.ConfigError, match=re.escape(reason)) as exc:
            config.load({}, toml=toml(tmp_path, text))
        assert str(path) in str(exc.value)


def test_an_unknown_key_names_it_and_the_closest_known(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.load({}, toml=toml(tmp_path, "max_concurency = 5\n"))
    assert exc.value.var == f"{tmp_path / 'crosstalk.toml'}: max_concurency"
    assert "did you mean 'max_concurrency'?" in exc.value.reason
    with pytest.raises(config.ConfigError, match="did you mean 'worker_max_jobs'"):
        config.load({}, toml=toml(tmp_path, "CROSSTALK_WORKER_MAX_JOBS = 5\n"))  # the variable's name, not the key
    dotenv = tmp_path / ".env"
    dotenv.write_text("CROSSTALK_MAX_CONCURENCY=5\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="did you mean 'max_concurrency'"):
        config.load({}, dotenv=dotenv)


def test_lookup_and_export_for_the_process(process_env: dict[str, str], tmp_path: Path) -> None:
    assert config.load() == config.load({})  # no file anywhere: the defaults
    toml(tmp_path, "max_joining = 4\nworkers = 2\njudge_model = 'gpt-4o'\n")  # ./crosstalk.toml
    assert config.load().max_joining == 4
    # exported: what reads the environment itself (the stack, the judge, child processes) sees the file
    assert (process_env["CROSSTALK_WORKERS"], process_env["CROSSTALK_JUDGE_MODEL"]) == ("2", "gpt-4o")
    assert process_env["CROSSTALK_CONFIG"] == str((tmp_path / "crosstalk.toml").resolve())
    other = toml(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path, "max_joining = 6")
    assert config.load({"CROSSTALK_CONFIG": str(other)}, toml=other).max_joining == 6
    process_env["CROSSTALK_CONFIG"] = str(tmp_path / "missing.toml")
    with pytest.raises(config.ConfigError, match="^CROSSTALK_CONFIG: .*missing.toml is not a file"):
        config.load()


def test_the_stack_reads_the_file_and_names_it(process_env: dict[str, str], tmp_path: Path) -> None:
    toml(tmp_path, "workers = 3\nnats_port = 4333\nworker_max_jobs = 8\n")
    cfg = Config.from_env()
    assert (cfg.workers, cfg.nats_port, cfg.settings.worker_max_jobs) == (3, 4333, 8)
    assert process_env["CROSSTALK_NATS_PORT"] == "4333"  # what the stack's programs inherit
    process_env.clear()
    toml(tmp_path, "nats_nodes = 2\n")
    with pytest.raises(StackError, match=r"^crosstalk.toml: nats_nodes: must be 1 or 3"):
        Config.from_env()


def test_config_show_masks_secrets(process_env: dict[str, str], tmp_path: Path) -> None:
    toml(tmp_path, f'livekit_api_secret = "{SECRETS[0]}"\nnats_user = "u"\nnats_password = "{SECRETS[2]}"\n'
                   "max_concurrency = 50\n")
    process_env["OPENAI_API_KEY"] = SECRETS[1]
    runner, fresh = CliRunner(), dict(process_env)
    text = runner.invoke(app, ["config", "show"])
    process_env.clear()
    process_env.update(fresh)  # as a new process: what the first run exported is not "env"
    shown = runner.invoke(app, ["config", "show", "--json"])
    assert text.exit_code == 0 and shown.exit_code == 0, text.output + shown.output
    for secret in SECRETS:
        assert secret not in text.output and secret not in shown.output
    doc = json.loads(shown.output)
    by_name = {row["setting"]: row for row in doc["settings"]}
    assert by_name["max_concurrency"] == {"setting": "max_concurrency", "variable": "CROSSTALK_MAX_CONCURRENCY",
                                          "key": "max_concurrency", "value": 50, "source": "crosstalk.toml"}
    assert by_name["livekit_api_secret"]["value"] == by_name["model_api_key"]["value"] == "***"
    assert by_name["model_api_key"]["source"] == "env" and by_name["lease_s"]["source"] == "default"
    assert {r["variable"]: r["value"] for r in doc["other"]} == {"CROSSTALK_NATS_USER": "u",
                                                                  "CROSSTALK_NATS_PASSWORD": "***"}
    assert re.search(r"^max_concurrency +50 +crosstalk.toml +CROSSTALK_MAX_CONCURRENCY", text.output, re.M)


def test_every_variable_has_a_key_of_its_own() -> None:
    known = config_sources.known(config.variables())
    keys = [config_sources.key_of(var) for var in known]
    assert len(set(keys)) == len(keys), "two variables would share a crosstalk.toml key"
    assert set(PORTS) <= set(known), "a stack port missing from config_sources.READ_ELSEWHERE"


class Recorder(dict[str, str]):
    """A mapping that remembers every variable asked for."""

    asked: set[str]

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("env", [{}, {"OPENAI_API_KEY": "k", "CROSSTALK_SPEECH": "real", "CROSSTALK_MODEL": "auto"}])
def test_settings_variables_are_the_ones_parse_reads(env: dict[str, str]) -> None:
    """A new setting whose variable breaks the CROSSTALK_<FIELD> rule fails here until VARIABLES_OF names it."""
    rec = Recorder(env)
    rec.asked = set()
    config.parse(rec)
    known = set(config_sources.known(config.variables()))
    assert rec.asked <= known, f"read but no crosstalk.toml key: {sorted(rec.asked - known)}"
    unread = set(config.variables()) - rec.asked - {"CROSSTALK_MODEL_URL", "CROSSTALK_SPEECH_URL", "CROSSTALK_LLM_URL"}
    assert not unread, f"settings variables parse never reads: {sorted(unread)}"
