"""``crosstalk config show``: the effective settings, where each came from, secrets masked.

Reads what every process reads (``shared.config.sources``: the environment over ``.env`` over
``crosstalk.toml``) and prints each setting with its variable, its crosstalk.toml key, its value and
its source (``env``, a file's path, or ``default``), then the other crosstalk variables set (the
stack's, the judge's, NATS credentials). Secrets (the LiveKit API secret, API keys, NATS passwords)
are printed as ``***``, never their value. Registered on ``crosstalk`` by :func:`register` (cli/app.py).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import EXIT_BAD_INPUT
from shared import config, config_sources
from shared.config_sources import DEFAULT, Layers, is_secret, key_of

MASK = "***"

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

config_app = typer.Typer(help="The effective configuration (environment, .env, crosstalk.toml).",
                         no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


def rows(settings: config.Settings, src: Layers) -> list[dict[str, Any]]:
    """One row per setting: name, variable, key, value (masked when secret), source."""
    found = []
    for f in fields(settings):
        names = config_sources.variables_of(f.name)
        var = next((v for v in names if v in src), names[0])
        value = getattr(settings, f.name)
        secret = not f.repr or isinstance(value, str) and is_secret(names[0])
        found.append({"setting": f.name, "variable": var, "key": key_of(var),
                      "value": MASK if secret and value else str(value) if isinstance(value, Path) else value,
                      "source": src.origin(var) if var in src else DEFAULT})
    return found


def other_rows(src: Layers) -> list[dict[str, Any]]:
    """The variables read outside the settings (config_sources.READ_ELSEWHERE) that are set."""
    return [{"variable": var, "key": key_of(var), "read_by": reader,
             "value": MASK if is_secret(var) else src[var], "source": src.origin(var)}
            for reader, group in config_sources.READ_ELSEWHERE.items() for var in group if var in src]


def show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Print the effective settings and where each came from (default, env, or a file); secrets masked."""
    try:
        src = config.sources()
        settings = config.load()
    except config.ConfigError as exc:
        err.print(f"error: configuration: {exc.var}: {exc.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    files = {"crosstalk.toml": str(src.toml) if src.toml else None,
             ".env": next((str(p) for p, _ in src.files if p != src.toml), None)}
    settings_rows, others = rows(settings, src), other_rows(src)
    if as_json:
        print(json.dumps({"files": files, "settings": settings_rows, "other": others}, indent=2))
        return
    for name, path in files.items():
        out.print(f"{name}: {path or 'none'}", markup=False)
    # plain columns, not a rich table: long URLs and paths stay whole and greppable at any width
    lines = [("setting", "value", "source", "variable (crosstalk.toml key)")]
    lines += [(r["setting"], _text(r["value"]), r["source"], f"{r['variable']} ({r['key']})") for r in settings_rows]
    lines += [("", "", "", ""), ("other variables set", "", "", "")] if others else []
    lines += [(r["key"], _text(r["value"]), r["source"], f"{r['variable']} ({r['read_by']})") for r in others]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    for line in lines:
        out.print("  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[3]]).rstrip(),
                  markup=False)


def _text(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def register(app: typer.Typer) -> None:
    config_app.command("show")(show)
    app.add_typer(config_app, name="config")
