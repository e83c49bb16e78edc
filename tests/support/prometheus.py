"""A real Prometheus for tests, and the dashboard's queries ready to evaluate.

``start_prometheus(workdir, {"dispatcher": ["127.0.0.1:9101"], ...})`` runs the
``prometheus`` binary (the pinned build in .tools/bin that ``./ct`` makes, or one on PATH) on a
free loopback port, scraping the given targets every second, one job per key,
optionally with rule files. ``Prometheus.query(expr)`` evaluates PromQL through
the HTTP API. ``dashboard_exprs()`` lists every panel expression of the
dashboards in infra/grafana/dashboards with Grafana's macros substituted, and
``metric_names(expr)`` lists the metric names an expression reads.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.servers import free_port, terminate, wait_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
DASHBOARD_DIR = ROOT / "infra" / "grafana" / "dashboards"

INSTALL_HINT = ("run the tests through `./ct test` (it builds the pinned prometheus and promtool into .tools/bin), "
                "or install Debian's `prometheus` package")

# Grafana's interval macros, as a test evaluates them (Prometheus scraping every second).
GRAFANA_MACROS = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "5m",
    "${__range}": "5m",
}


def find_tool(name: str) -> str:
    """Path of ``prometheus`` or ``promtool``; AssertionError (never a skip) if missing."""
    found = next((str(p) for p in (ROOT / ".tools" / "bin" / name,) if p.exists()), None) or shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/local/bin") / name) if p.exists()), None
    )
    if not found:
        raise AssertionError(f"{name} not found on PATH or in /usr/bin: {INSTALL_HINT}")
    return found


class PrometheusError(RuntimeError):
    pass


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    workdir: Path

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET /api/v1/<path>; returns ``data``, raises PrometheusError on an error status."""
        qs = "?" + urllib.parse.urlencode(params) if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{qs}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params or {})}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result as a list of ``{"metric": {...}, "value": [t, "v"]}``."""
        data = self.api("query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", {"state": "active"})["activeTargets"])

    def wait_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every configured target has been scraped successfully."""
        return wait_for(
            lambda: (ts := self.targets()) and all(t["health"] == "up" for t in ts) and ts,
            timeout,
            lambda: f"targets not all up: {[(t['labels'].get('job'), t['scrapeUrl'], t['health'], t.get('lastError')) for t in self.targets()]}",
        )

    def wait_data(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``expr`` returns at least one finite sample; return the result."""
        return wait_for(lambda: (r := self.query(expr)) and has_finite(r) and r, timeout,
                        lambda: f"{expr!r} returned {self.query(expr)!r}")

    def stop(self) -> None:
        terminate(self.proc)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]


def has_finite(result: Iterable[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def wait_for(probe: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"after {timeout}s: {describe()}")
        time.sleep(0.25)


def scrape_config(
    targets: Mapping[str, Iterable[str]],
    *,
    scrape_interval: str = "1s",
    rule_files: Iterable[Path] = (),
) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addrs)}]} for job, addrs in targets.items()
        ],
    }


def start_prometheus(
    workdir: Path,
    targets: Mapping[str, Iterable[str]],
    *,
    scrape_interval: str = "1s",
    rule_files: Iterable[Path] = (),
    timeout: float = 30.0,
) -> Prometheus:
    """Run a real Prometheus scraping ``targets`` ({job: ["host:port", ...]}) on a free port."""
    binary = find_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(scrape_config(targets, scrape_interval=scrape_interval, rule_files=rule_files)))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - owned by the child process
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", workdir)
    try:
        wait_port(port, timeout=timeout, proc=proc)
        wait_for(lambda: _ready(prom.url), timeout, lambda: f"prometheus not ready: {prom.log()}")
    except BaseException:
        prom.stop()
        raise
    return prom


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


# --------------------------------------------------------------------------- dashboards


@dataclass(frozen=True)
class PanelExpr:
    dashboard: str
    panel: str
    ref_id: str
    expr: str  # macros substituted
    raw: str  # as written in the dashboard


def substitute_macros(expr: str, macros: Mapping[str, str] = GRAFANA_MACROS) -> str:
    # Longest first so "$__rate_interval" is not eaten by "$__interval"-like prefixes.
    for key in sorted(macros, key=len, reverse=True):
        expr = expr.replace(key, macros[key])
    return expr


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def dashboard_files(folder: Path = DASHBOARD_DIR) -> list[Path]:
    return sorted(folder.glob("*.json"))


def dashboard_exprs(folder: Path = DASHBOARD_DIR, macros: Mapping[str, str] = GRAFANA_MACROS) -> list[PanelExpr]:
    out: list[PanelExpr] = []
    for path in dashboard_files(folder):
        dash = json.loads(path.read_text(encoding="utf-8"))
        for panel in iter_panels(dash.get("panels", [])):
            for target in panel.get("targets", []):
                raw = target.get("expr", "")
                out.append(PanelExpr(dash.get("uid", path.stem), panel.get("title", ""),
                                     target.get("refId", ""), substitute_macros(raw, macros), raw))
    return out


def rule_exprs(path: Path = PROMETHEUS_DIR / "rules.yml") -> list[tuple[str, str]]:
    """(name, expr) of every recording and alerting rule in a rules file."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [(r.get("record") or r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


# --------------------------------------------------------------------------- PromQL names

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*+)(?!\s*\()")
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
})


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names, labels and keywords left out).

    A selector like ``{__name__="x"}`` has no visible name; it is reported as
    ``{__name__}`` so a caller can refuse it.
    """
    if "__name__" in expr:
        return {"{__name__}"}
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def promtool_check_exprs(exprs: Iterable[tuple[str, str]], workdir: Path) -> subprocess.CompletedProcess[str]:
    """Parse expressions with Prometheus's own parser (as recording rules through promtool)."""
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path = workdir / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return subprocess.run([find_tool("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
