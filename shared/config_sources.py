"""Where configuration values come from: the environment, then ``.env``, then ``crosstalk.toml``.

``shared.config`` parses and validates; this module only finds the values and remembers where each
came from, so an error names the file and ``crosstalk config show`` the source.

* **Precedence**: a variable set in the environment (even empty) wins; else ``.env``'s (the
  environment written down: ``CROSSTALK_MAX_CONCURRENCY=50``); else ``crosstalk.toml``'s; else the
  default in ``shared.config``.
* **Lookup**: ``crosstalk.toml`` is ``$CROSSTALK_CONFIG`` when set (it must exist), else
  ``./crosstalk.toml``, else the checkout's. ``.env`` is ``./.env``, else the checkout's. ``./ct``
  runs in the checkout, so both of its lookups land there.
* **Keys**: a variable's name without ``CROSSTALK_``, in lower case (``max_concurrency = 50``,
  ``nats_url = "nats://a:4222"``, ``openai_api_key = "..."``); flat, no ``[sections]``. A key crosstalk
  does not read is an error naming the closest one it does (:func:`unknown_key`).
* **TOML values**: strings, numbers and booleans (``true`` -> ``1``) as the variable's text; a list
  joined with commas (``nats_url = ["nats://a:4222", "nats://b:4222"]``, ``services = ["worker"]``).

The files are read as text into variables, then parsed by the one parser the environment goes
through: a value means the same wherever it is written, and the validation is the same.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[1]
CONFIG_VAR = "CROSSTALK_CONFIG"
TOML_NAME = "crosstalk.toml"
DOTENV_NAME = ".env"
DEFAULT, ENV = "default", "env"  # the sources that are not a file

# Settings (shared.config) whose variable is not CROSSTALK_<FIELD>: their variables, the first one set
# being where the value came from. A setting that follows the rule needs no line here.
VARIABLES_OF: dict[str, tuple[str, ...]] = {
    "nats_url": ("NATS_URL",), "livekit_url": ("LIVEKIT_URL",),
    "livekit_api_key": ("LIVEKIT_API_KEY",), "livekit_api_secret": ("LIVEKIT_API_SECRET",),
    "model_base_url": ("CROSSTALK_MODEL_URL", "OPENAI_BASE_URL"), "model_api_key": ("OPENAI_API_KEY",),
    "model_choice": ("CROSSTALK_MODEL",), "llm_base_url": ("CROSSTALK_LLM_URL",),
    "real_model": ("OPENAI_API_KEY", "OPENAI_BASE_URL"),
    "speech_base_url": ("CROSSTALK_SPEECH_URL", "OPENAI_BASE_URL"), "speech_api_key": ("OPENAI_API_KEY",),
    "real_speech": ("CROSSTALK_SPEECH",),
    "speech_tts_model": ("CROSSTALK_TTS_MODEL",), "speech_stt_model": ("CROSSTALK_STT_MODEL",),
}
# Variables read outside shared.config.Settings, by their readers: with the settings' own
# (shared.config.variables) they are every key a crosstalk.toml may hold.
READ_ELSEWHERE: dict[str, tuple[str, ...]] = {
    "shared/streams.py": ("CROSSTALK_STREAM_REPLICAS",),
    "shared/natsauth.py": (
        "CROSSTALK_NATS_USER", "CROSSTALK_NATS_PASSWORD", "CROSSTALK_NATS_PASSWORD_FILE",
        "CROSSTALK_NATS_NKEY_SEED_FILE", "CROSSTALK_NATS_CREDENTIALS_DIR", "CROSSTALK_NATS_TLS_CA",
        "CROSSTALK_NATS_TLS_CERT", "CROSSTALK_NATS_TLS_KEY"),
    "services/judge": ("CROSSTALK_JUDGE_URL", "CROSSTALK_JUDGE_MODEL", "CROSSTALK_JUDGE_API_KEY",
                       "CROSSTALK_JUDGE_WAIT_S"),
    # ./ct up (infra/stack): its servers' ports and the /metrics ports are infra/stack/config.py's PORTS
    # (tests/unit/test_settings_file.py keeps this list complete)
    "infra/stack": (
        "CROSSTALK_WORKERS", "CROSSTALK_SERVICES", "CROSSTALK_RUN_DIR", "CROSSTALK_HOST", "CROSSTALK_UP_TIMEOUT_S",
        "CROSSTALK_LIVEKIT_UDP_PORTS", "CROSSTALK_NATS_CONF", "CROSSTALK_NATS_NODES", "CROSSTALK_LIVEKIT_NODES",
        "CROSSTALK_NATS_SERVER_BIN", "CROSSTALK_LIVEKIT_SERVER_BIN", "CROSSTALK_REDIS_SERVER_BIN",
        "CROSSTALK_PROMETHEUS_LIFECYCLE", "CROSSTALK_DEMO_CONVERSATIONS",
        "CROSSTALK_NATS_PORT", "CROSSTALK_NATS_MONITOR_PORT", "CROSSTALK_NATS_CLUSTER_PORT",
        "CROSSTALK_NATS_2_PORT", "CROSSTALK_NATS_2_MONITOR_PORT", "CROSSTALK_NATS_2_CLUSTER_PORT",
        "CROSSTALK_NATS_3_PORT", "CROSSTALK_NATS_3_MONITOR_PORT", "CROSSTALK_NATS_3_CLUSTER_PORT",
        "CROSSTALK_LIVEKIT_PORT", "CROSSTALK_LIVEKIT_TCP_PORT", "CROSSTALK_LIVEKIT_METRICS_PORT",
        "CROSSTALK_LIVEKIT_2_PORT", "CROSSTALK_LIVEKIT_2_TCP_PORT", "CROSSTALK_LIVEKIT_2_METRICS_PORT",
        "CROSSTALK_REDIS_PORT", "CROSSTALK_PROMETHEUS_PORT", "CROSSTALK_GRAFANA_PORT",
        *(f"CROSSTALK_{name.upper()}_METRICS_PORT" for name in (
            "dispatcher", "allocator", "sink", "webhook", "worker", "model", "speech", "llm", "judge"))),
}
# Never printed by `crosstalk config show` (nor logged): names holding a secret, besides the settings
# kept out of repr. Paths to secrets (*_FILE, *_DIR) are not secrets themselves.
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "CREDS")  # whole words of the name, or *API_KEY


class ConfigError(ValueError):
    """A bad value: ``var`` says where to fix it, ``reason`` what is wrong.

    ``var`` is the variable's name (``CROSSTALK_MAX_CONCURRENCY``), or for a value from a file the file
    and its key (``crosstalk.toml: max_concurrency``), so every message that prints ``var`` names it."""

    def __init__(self, var: str, reason: str) -> None:
        super().__init__(f"{var}: {reason}")
        self.var = var
        self.reason = reason


def variables_of(setting: str) -> tuple[str, ...]:
    """The variables a setting (a field of shared.config.Settings) is read from."""
    return VARIABLES_OF.get(setting, (f"CROSSTALK_{setting.upper()}",))


def variables(settings: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(var for name in settings for var in variables_of(name)))


def known(settings_variables: Iterable[str]) -> list[str]:
    """Every variable crosstalk reads: the settings' and :data:`READ_ELSEWHERE`'s."""
    return list(dict.fromkeys([*settings_variables, *(var for group in READ_ELSEWHERE.values() for var in group)]))


def key_of(var: str) -> str:
    """``CROSSTALK_MAX_CONCURRENCY`` -> ``max_concurrency``; ``NATS_URL`` -> ``nats_url``."""
    return var.removeprefix("CROSSTALK_").lower()


def is_secret(var: str) -> bool:
    if var.endswith(("_FILE", "_DIR")):
        return False
    return var.endswith("API_KEY") or bool(set(var.split("_")) & set(SECRET_WORDS))


def unknown_key(key: str, known_keys: Collection[str]) -> str:
    """The reason for a key crosstalk does not read: with the closest one it does (difflib)."""
    close = difflib.get_close_matches(key_of(key.upper()), list(known_keys), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"not a crosstalk setting{hint} (the keys: docs/development.md#configuration)"


def find(env: Mapping[str, str]) -> tuple[Path | None, Path | None]:
    """The ``crosstalk.toml`` and the ``.env`` this process reads (None: there is none)."""
    raw = env.get(CONFIG_VAR, "").strip()
    if raw and not Path(raw).expanduser().is_file():
        raise ConfigError(CONFIG_VAR, f"{raw} is not a file")
    return (Path(raw).expanduser() if raw else _first(TOML_NAME)), _first(DOTENV_NAME)


def _first(name: str) -> Path | None:
    # ./name as the user sees it ("crosstalk.toml" in messages), else the checkout's, absolute
    return next((p for p in (Path(name), ROOT / name) if p.is_file()), None)


def _text(value: object) -> str | None:
    """A TOML value as the variable's text; None for one no variable can hold (a table, a date)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and value:
        parts = [_text(v) for v in value if not isinstance(v, list)]
        return ",".join(p for p in parts if p is not None) if len(parts) == len(value) and None not in parts else None
    return None


def read_toml(path: Path, known: Collection[str]) -> dict[str, str]:
    """``{VARIABLE: text}`` of a crosstalk.toml; ConfigError names the file (and the key)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    by_key = {key_of(var): var for var in known}
    values: dict[str, str] = {}
    for key, value in data.items():
        text = _text(value)
        if key not in by_key and text is not None:
            raise ConfigError(f"{path}: {key}", unknown_key(key, by_key))
        if text is None:
            raise ConfigError(f"{path}: {key}", f"must be a string, a number, true/false or a list of them, got "
                                                f"{type(value).__name__} (keys are flat: no [sections])")
        values[by_key[key]] = text
    return values


def read_dotenv(path: Path, known: Collection[str]) -> dict[str, str]:
    """``{VARIABLE: value}`` of a .env (python-dotenv's syntax); variables of other programs are left alone,
    a ``CROSSTALK_`` one crosstalk does not read is an error."""
    known_set = set(known)
    values: dict[str, str] = {}
    for var, value in dotenv_values(path).items():
        if var in known_set and value is not None:
            values[var] = value
        elif var.startswith("CROSSTALK_") and var not in known_set:
            raise ConfigError(f"{path}: {var}", unknown_key(var, {key_of(v): v for v in known_set}))
    return values


class Layers(Mapping[str, str]):
    """The environment over the files: each variable's value, and (:meth:`origin`) where it came from."""

    def __init__(self, env: Mapping[str, str], files: tuple[tuple[Path, dict[str, str]], ...] = (),
                 toml: Path | None = None) -> None:
        self.env = dict(env)  # a copy: what export() later adds to the process's is not "env"
        self.files = files  # (path, its variables), the one that wins first
        self.toml = toml  # the crosstalk.toml among them

    @classmethod
    def read(cls, env: Mapping[str, str], known: Collection[str], *, toml: Path | None = None,
             dotenv: Path | None = None) -> Layers:
        files = ((dotenv, read_dotenv(dotenv, known)),) if dotenv else ()
        return cls(env, files + (((toml, read_toml(toml, known)),) if toml else ()), toml)

    def __getitem__(self, var: str) -> str:
        if var in self.env:
            return self.env[var]
        for _, values in self.files:
            if var in values:
                return values[var]
        raise KeyError(var)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self.env, *(var for _, values in self.files for var in values)]))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def file_of(self, var: str) -> Path | None:
        """The file ``var``'s value comes from (None: the environment, or unset)."""
        if var in self.env:
            return None
        return next((path for path, values in self.files if var in values), None)

    def origin(self, var: str) -> str:
        """``env``, the file's path, or ``default`` (unset)."""
        path = self.file_of(var)
        return str(path) if path else ENV if var in self.env else DEFAULT

    def located(self, exc: ConfigError) -> ConfigError:
        """``exc`` naming the file and key when its variable's value came from a file."""
        path = self.file_of(exc.var)
        return ConfigError(f"{path}: {key_of(exc.var)}" if path == self.toml else f"{path}: {exc.var}",
                           exc.reason) if path else exc

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """The files' values into the process environment (never over a variable already set), so the code
        that reads the environment itself (NATS credentials, stream replicas, the judge, the stack) and the
        processes started from this one see the same configuration; the crosstalk.toml is pinned by
        ``CROSSTALK_CONFIG`` for them, whatever their directory."""
        environ = os.environ if environ is None else environ
        if self.toml is not None and CONFIG_VAR not in environ:
            environ[CONFIG_VAR] = str(self.toml.resolve())
        for var in self:
            environ.setdefault(var, self[var])
