"""infra/prometheus and infra/grafana: valid for promtool, and every query reads metrics that exist.

The last test runs a real Prometheus against real /metrics endpoints (one per
crosstalk process, each exposing its shared.metrics group) and a real
livekit-server, and evaluates every dashboard expression and recording rule
through the HTTP API: each must return data.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from support.prometheus import (
    DASHBOARD_DIR,
    PROMETHEUS_DIR,
    ROOT,
    dashboard_exprs,
    dashboard_files,
    find_tool,
    iter_panels,
    metric_names,
    promtool_check_exprs,
    rule_exprs,
    start_prometheus,
)
from support.servers import Server, free_port

from shared import metrics

GRAFANA_DIR = ROOT / "infra" / "grafana"
DATASOURCE_UID = "crosstalk-prom"
DASHBOARD_UID = "crosstalk-overview"
GROUPS = {
    "dispatcher": metrics.DispatcherMetrics,
    "allocator": metrics.AllocatorMetrics,
    "sink": metrics.SinkMetrics,
    "model": metrics.ModelMetrics,
    "worker": metrics.WorkerMetrics,
    "webhook": metrics.WebhookMetrics,
    "speech": metrics.SpeechMetrics,
    "llm": metrics.LlmMetrics,
    "judge": metrics.JudgeMetrics,
}
# livekit-server v1.13.5's own gauges (seen on its prometheus_port; the real-Prometheus test re-checks them).
LIVEKIT_METRICS = {"livekit_room_total", "livekit_participant_total"}
# Series Prometheus itself writes for every target.
PROMETHEUS_SYNTHETIC = {"up"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def crosstalk_series_names() -> set[str]:
    """Every series name shared.metrics exports, from each group on a fresh registry."""
    names: set[str] = set()
    for group in GROUPS.values():
        registry = CollectorRegistry()
        group(registry)
        for family in registry.collect():
            names.update(family.name + s for s in SUFFIXES[family.type])
    return names


def allowed_names() -> set[str]:
    return crosstalk_series_names() | LIVEKIT_METRICS | PROMETHEUS_SYNTHETIC


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def load_dashboard() -> dict[str, Any]:
    return json.loads((DASHBOARD_DIR / "crosstalk.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- promtool


def test_promtool_check_config() -> None:
    res = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    assert "WARNING" not in res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    res = promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in res.stdout


def test_promtool_rule_unit_tests_fire_the_alerts() -> None:
    res = promtool("test", "rules", str(PROMETHEUS_DIR / "rules_test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    tested = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tested["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {name for name, _ in rule_exprs() if not name.startswith("crosstalk:")}
    assert alerts and fired == alerts, f"alerts without a firing test: {alerts - fired}"


# --------------------------------------------------------------------------- prometheus.yml


def test_scrape_config_covers_every_process_and_livekit() -> None:
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == set(metrics.DEFAULT_PORTS) | {"livekit"}
    livekit_port = yaml.safe_load((ROOT / "infra" / "livekit.yaml").read_text())["prometheus_port"]
    ports = {**metrics.DEFAULT_PORTS, "livekit": livekit_port}
    for name, job in jobs.items():
        static = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert static == [f"127.0.0.1:{ports[name]}"], name
        # Extra instances come from file_sd files the user (or `just up`) edits.
        files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
        assert files == [f"targets/{name}-*.json"], name
        extra = PROMETHEUS_DIR / "targets" / f"{name}-extra.json"
        assert isinstance(json.loads(extra.read_text()), list), extra
    assert cfg["rule_files"] == ["rules.yml"]


# --------------------------------------------------------------------------- grafana files


def test_grafana_provisioning_points_at_the_dashboards_and_a_fixed_datasource() -> None:
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "crosstalk.yml").read_text())
    [provider] = prov["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.endswith("/infra/grafana/dashboards")
    assert path.replace("${CROSSTALK_ROOT}", str(ROOT)) == str(DASHBOARD_DIR)
    assert dashboard_files() == [DASHBOARD_DIR / "crosstalk.json"]


def test_dashboard_json_is_well_formed_with_fixed_uids() -> None:
    dash = load_dashboard()
    assert dash["uid"] == DASHBOARD_UID
    assert dash["title"]
    panels = list(iter_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
            assert t["expr"].strip(), p["title"]


def test_dashboard_has_the_promised_panels() -> None:
    titles = {p["title"] for p in iter_panels(load_dashboard()["panels"])}
    exprs = " ".join(e.raw for e in dashboard_exprs())
    for title in ("Conversations / min", "In flight", "Success ratio", "Dispatch to both joined",
                  "Turn latency: first token", "Turn latency: total", "Role requests / min by role and outcome",
                  "Sink lag", "Load per worker", "Active jobs per worker", "Batches by outcome (since dispatcher start)"):
        assert title in titles
    for name in ("crosstalk_dispatch_to_join_seconds_bucket", "crosstalk_turn_first_token_seconds_bucket",
                 "crosstalk_turn_seconds_bucket", "crosstalk_role_grants_total", "crosstalk_sink_lag_messages",
                 "crosstalk_worker_load", "crosstalk_worker_active_jobs", "crosstalk_batches_total"):
        assert name in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(crosstalk_dispatch_to_join_seconds_bucket" in exprs


# --------------------------------------------------------------------------- expressions


def test_metric_names_finds_selectors_only() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, role) (rate(crosstalk_turn_seconds_bucket{role="customer"}[1m])))'
    ) == {"crosstalk_turn_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m] offset 1h)) / on (job) group_left (x) b or vector(0)") == {"a_total", "b"}
    assert metric_names('max(x) > 1e3 and absent(up{job="worker"} == 1)') == {"x", "up"}
    assert metric_names('crosstalk:ratio:rate5m{quantile="0.5"} * 60') == {"crosstalk:ratio:rate5m"}
    assert metric_names('{__name__=~"crosstalk_.*"}') == {"{__name__}"}


def test_grafana_macros_are_substituted() -> None:
    exprs = dashboard_exprs()
    assert any("$__rate_interval" in e.raw for e in exprs)
    for e in exprs:
        assert "$" not in e.expr, (e.panel, e.expr)


def test_every_dashboard_and_rule_expression_parses(tmp_path: Path) -> None:
    exprs = [(f"{e.panel}/{e.ref_id}", e.expr) for e in dashboard_exprs()] + rule_exprs()
    res = promtool_check_exprs(exprs, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout


def test_every_expression_reads_only_metrics_that_exist() -> None:
    allowed = allowed_names()
    assert "crosstalk_conversations_total" in allowed and "crosstalk_turn_seconds_bucket" in allowed
    exprs = [(f"dashboard {e.panel}/{e.ref_id}", e.expr) for e in dashboard_exprs()]
    exprs += [(f"rule {name}", expr) for name, expr in rule_exprs()]
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - allowed
        assert not unknown, f"{where}: {sorted(unknown)} not exported by shared/metrics.py or livekit-server"


# --------------------------------------------------------------------------- real Prometheus


def _activity(groups: dict[str, Any]) -> None:
    """One round of what a batch does, touching every metric (and label set) the queries read."""
    d, a, s, m = groups["dispatcher"], groups["allocator"], groups["sink"], groups["model"]
    d.batch_commands.labels("accepted").inc()
    d.batches.labels("completed").inc()
    d.batches_running.set(1)
    d.conversations.labels("completed", "end_conversation").inc(3)
    d.conversations.labels("failed", "join_timeout").inc()
    d.attempts.inc(4)
    d.retries.labels("join_timeout").inc()
    d.in_flight.set(3)
    d.pending.set(2)
    for v in (0.8, 1.5, 4.0):
        d.dispatch_to_join.observe(v)
    d.livekit_api.labels("create_room").observe(0.02)
    d.livekit_api_errors.labels("create_room").inc()
    for role in ("customer", "support"):
        a.grants.labels(role, "granted").inc()
        a.lease_expiries.labels(role).inc()
    a.request_seconds.observe(0.003)
    a.releases.labels("released").inc()
    a.conflicts.inc()
    a.bad_requests.labels("room").inc()
    s.turns_written.inc(5)
    s.duplicates.inc()
    s.events.labels("turn").inc(5)
    s.lag.set(4)
    s.write_seconds.observe(0.004)
    for i, w in enumerate(groups["workers"]):
        w.active_jobs.set(2 + i)
        w.load.set(0.2 + 0.1 * i)
        w.jobs.labels("completed").inc()
        for role in ("customer", "support"):
            w.turns.labels(role).inc()
            w.first_token.labels(role).observe(0.15)
            w.turn_seconds.labels(role).observe(0.6)
    m.requests.labels("customer").inc()
    m.request_seconds.observe(0.3)
    sp = groups["speech"]
    sp.requests.labels("speech", "ok").inc()
    sp.first_audio.labels("piper").observe(0.2)
    sp.rtf.labels("piper").observe(0.1)
    sp.busy.set(1)


@pytest.fixture
def process_endpoints() -> Iterator[tuple[dict[str, list[str]], dict[str, Any]]]:
    """One real /metrics HTTP server per crosstalk process (two workers), each with its own registry."""
    servers, targets, groups = [], {}, {}
    try:
        for job, group in [*GROUPS.items(), ("worker", metrics.WorkerMetrics)]:
            registry = CollectorRegistry()
            port = free_port()
            httpd, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
            servers.append(httpd)
            targets.setdefault(job, []).append(f"127.0.0.1:{port}")
            instance = group(registry)
            if job == "worker":
                groups.setdefault("workers", []).append(instance)
            else:
                groups[job] = instance
        yield targets, groups
    finally:
        for httpd in servers:
            httpd.shutdown()
            httpd.server_close()


def test_real_prometheus_evaluates_every_dashboard_expression(
    tmp_path: Path, process_endpoints: tuple[dict[str, list[str]], dict[str, Any]], livekit_server: Server
) -> None:
    targets, groups = process_endpoints
    lk_port = livekit_server.extra.get("prometheus_port")
    assert lk_port, "livekit-server's prometheus_port is unknown (CROSSTALK_TEST_LIVEKIT_URL set?)"
    targets = {**targets, "livekit": [f"127.0.0.1:{lk_port}"]}
    _activity(groups)
    prom = start_prometheus(tmp_path / "prometheus", targets, rule_files=[PROMETHEUS_DIR / "rules.yml"])
    try:
        up = prom.wait_targets_up()
        assert {t["labels"]["job"] for t in up} == set(metrics.DEFAULT_PORTS) | {"livekit"}
        assert len(up) == sum(len(v) for v in targets.values())  # every endpoint, livekit-server included
        # A second round after the first scrape, so every rate sees an increase.
        time.sleep(2.5)
        _activity(groups)
        time.sleep(2.5)

        for e in dashboard_exprs():
            result = prom.wait_data(e.expr, timeout=20)
            assert result, f"{e.panel}/{e.ref_id}: {e.expr}"

        workers = prom.query("max by (instance) (crosstalk_worker_load)")
        assert sorted(float(r["value"][1]) for r in workers) == pytest.approx([0.2, 0.3])
        completed = prom.query('sum(crosstalk_conversations_total{outcome="completed"})')
        assert float(completed[0]["value"][1]) == 6.0

        recorded = {name for name, _ in rule_exprs() if name.startswith("crosstalk:")}
        for name in recorded:
            prom.wait_data(name, timeout=20)
        quantiles = prom.query("crosstalk:dispatch_to_join_seconds:quantile5m")
        assert {r["metric"]["quantile"] for r in quantiles} == {"0.5", "0.95", "0.99"}

        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == len(rule_exprs())
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not bad, bad
    finally:
        prom.stop()
