"""The evaluation commands: ``scenarios validate``, ``judge``, ``report``, ``compare``.

Thin wiring of shared/scenario_files.py, services/judge, cli/report.py and cli/compare.py.
``compare`` exits 1 when the candidate regressed past the thresholds or fails an absolute gate
(a CI gate), 2 on bad input, 3 when a batch's files are missing. ``report`` waits for the
judge's ``judged.json`` (``BatchJudged``) before it writes, never a partial report unless asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from cli import EXIT_BAD_INPUT, EXIT_BATCH_FAILED, EXIT_UNAVAILABLE, compare, report
from services.judge.batch import JudgeConfig, judge_to_the_end
from services.judge.store import BatchFiles
from shared import config, contracts, scenario_files, scenarios

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(code: int, message: str) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _files(batch_id: str) -> BatchFiles:
    try:
        settings = config.load()
        files = BatchFiles(settings.data_dir, batch_id)
    except config.ConfigError as exc:
        raise _fail(EXIT_BAD_INPUT, f"configuration: {exc.var}: {exc.reason}") from None
    except contracts.ContractError as exc:
        raise _fail(EXIT_BAD_INPUT, f"{exc.field}: {batch_id!r} {exc.reason}") from None
    if not files.batch_json.is_file():
        raise _fail(EXIT_UNAVAILABLE, f"no batch.json at {files.batch_json} (CROSSTALK_DATA_DIR is {settings.data_dir})")
    return files


batch_files = _files  # for the other commands over a batch's files (cli/export.py)
fail = _fail


def inline_entries(path: Path) -> list[dict[str, Any]]:
    """A local scenarios.yaml's entries, to send inline; ContractError (field ``scenarios``) if it is bad."""
    try:
        return [scenario_files.to_doc(s) for s in scenario_files.load_path(path).scenarios]
    except scenario_files.ScenarioFileError as exc:
        raise contracts.ContractError("scenarios", str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise contracts.ContractError("scenarios", f"cannot read {path}: {exc}") from None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def validate_files(paths: Annotated[list[Path], typer.Argument(help="scenarios.yaml file(s) to check.")],
                   as_json: JsonOpt = False) -> None:
    """Check LiveKit scenario files (with crosstalk's extension); every error names its line and field."""
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            loaded = scenario_files.load_path(path)
        except scenario_files.ScenarioFileError as exc:
            results.append({"file": str(path), "ok": False, "errors": [p.render(str(path)) for p in exc.problems]})
            continue
        except (OSError, UnicodeDecodeError) as exc:
            results.append({"file": str(path), "ok": False, "errors": [f"{path}: cannot read: {exc}"]})
            continue
        results.append({"file": str(path), "ok": True, "scenarios": [s.id for s in loaded.scenarios],
                        "scripted": sum(1 for s in loaded.scenarios if s.script)})
    if as_json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    for r in results if not as_json else ():
        if r["ok"]:
            out.print(f"{r['file']}: ok, {len(r['scenarios'])} scenario(s) ({', '.join(r['scenarios'])}); "
                      f"{r['scripted']} with an offline script", markup=False)
        for line in r.get("errors", ()):
            out.print(line, markup=False)
    if not all(r["ok"] for r in results):
        raise typer.Exit(EXIT_BAD_INPUT)


def judge(batch_id: Annotated[str, typer.Argument(help="The batch id.")],
          force: Annotated[bool, typer.Option("--force", help="Judge again conversations already judged.")] = False,
          retry: Annotated[bool, typer.Option("--retry", help="Judge again conversations whose judge model failed.")
                           ] = False,
          as_json: JsonOpt = False,
          ) -> None:
    """Judge a finished batch here, as the judge service does (LLM judge: CROSSTALK_JUDGE_URL, else OPENAI_BASE_URL / OPENAI_API_KEY; without one, expectations are not_judged)."""
    files = _files(batch_id)
    try:
        cfg = JudgeConfig.from_env()
    except ValueError as exc:
        raise _fail(EXIT_BAD_INPUT, str(exc)) from None

    async def run() -> tuple[int, contracts.BatchJudged | None]:
        llm = cfg.make_llm()
        try:
            written, event = await judge_to_the_end(files, scenarios.library(), llm, force=force, retry=retry)
            return len(written), event
        finally:
            if llm is not None:
                await llm.aclose()

    n, event = asyncio.run(run())
    if as_json:
        print(json.dumps({"batch_id": batch_id, "judged_now": n, "judged": msgspec.to_builtins(event) if event else None}))
        return
    out.print(f"judged {n} conversation(s) of {batch_id}; judgments in {files.dir / 'judgments'}", markup=False)
    if event is not None:
        counts = ", ".join(f"{v} {k}" for k, v in event.verdicts.items())
        out.print(f"all {event.conversations} judged: {counts}; {event.not_judged} not judged (no judge), "
                  f"{event.judge_errors} judge error(s)", markup=False)


def wait_judged(files: BatchFiles, wait_s: float, partial: bool) -> None:
    """Until the judge has written ``judged.json`` (its BatchJudged); exit 3 after ``wait_s`` unless ``partial``."""
    deadline = time.monotonic() + wait_s
    while files.judged() is None:
        if time.monotonic() >= deadline:
            if partial and files.judgments():
                err.print(f"warning: judging of {files.batch_id} has not finished: this report is partial",
                          markup=False)
                return
            doc = files.batch_doc() or {}
            state = ("the batch is still running" if doc.get("status") == "running"
                     else "the batch finished but the judge service has not finished judging it")
            raise _fail(EXIT_UNAVAILABLE, f"batch {files.batch_id} not judged after {wait_s:g}s: {state} "
                                          f"(is the judge service up? `just status`; or judge here: crosstalk "
                                          f"judge {files.batch_id}; or --partial)")
        time.sleep(0.5)


def make_report(batch_id: Annotated[str, typer.Argument(help="The batch id.")],
                out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the files (default: the batch's).")] = None,
                wait_s: Annotated[float, typer.Option("--wait", min=0, help="Seconds to wait for judging to finish.")
                                  ] = 120.0,
                partial: Annotated[bool, typer.Option("--partial", help="Write what is judged if judging has not finished.")
                                   ] = False,
                as_json: JsonOpt = False,
                ) -> None:
    """Write report.html (self-contained), report.json and junit.xml once the batch is judged."""
    files = _files(batch_id)
    wait_judged(files, wait_s, partial)
    paths = report.write(files, out_dir)
    data = report.build(files)
    if as_json:
        print(json.dumps({"batch_id": batch_id, "totals": data["totals"], "scenarios": data["scenarios"],
                          "files": {k: str(v) for k, v in paths.items()}}, ensure_ascii=False, indent=2))
        return
    t = data["totals"]
    rate = f"{t['pass_rate']:.1%}" if t["pass_rate"] is not None else "-"
    out.print(f"{t['passed']}/{t['judged']} passed ({rate}), {t['failed']} failed, {t['inconclusive']} inconclusive "
              f"({t['not_judged']} with expectations no judge decided); {t['infra_failures']} infrastructure failure(s) apart", markup=False)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}", markup=False)


def _report_of(ref: str) -> dict[str, Any]:
    path = Path(ref)
    if ref.endswith(".json") or path.is_file():
        try:
            return compare.load_report(path)
        except (OSError, ValueError) as exc:
            raise _fail(EXIT_BAD_INPUT, f"{ref}: {exc}") from None
    files = _files(ref)
    wait_judged(files, 120.0, partial=False)  # a half-judged batch would gate on missing data
    return report.build(files)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def compare_cmd(
    reports: Annotated[list[str], typer.Argument(
        help="[BASELINE] CANDIDATE: batch ids or report.json files; the candidate alone is gated by the absolute gates.",
        show_default=False)],
    thresholds: Annotated[Path | None, typer.Option("--thresholds", help="YAML/JSON file of thresholds.")] = None,
    max_pass_rate_drop: Annotated[float | None, typer.Option(help="Allowed pass-rate drop (0..1).")] = None,
    max_pass_k_drop: Annotated[float | None, typer.Option(help="Allowed pass^k drop (0..1).")] = None,
    max_latency_p95_increase_s: Annotated[float | None, typer.Option(help="Allowed latency p95 rise (s).")] = None,
    min_pass_rate: Annotated[float | None, typer.Option(help="Lowest pass rate per scenario (0..1).")] = None,
    min_pass_k: Annotated[float | None, typer.Option(help="Lowest pass^k per scenario (0..1); n < k fails.")] = None,
    max_infra_rate: Annotated[float | None, typer.Option(
        help="Highest share of conversations lost to crosstalk's own faults (0..1; default 0.1).")] = None,
    allow_not_judged: Annotated[bool, typer.Option(
        "--allow-not-judged", help="Do not fail on expectations no judge decided (no judge configured).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Per scenario and metric, what got better or worse; exit 1 past a threshold or an absolute gate."""
    if not 1 <= len(reports) <= 2:
        raise _fail(EXIT_BAD_INPUT, f"reports: give [BASELINE] CANDIDATE, got {len(reports)} argument(s)")
    baseline, candidate = (None, reports[0]) if len(reports) == 1 else (reports[0], reports[1])
    try:
        th = compare.load_thresholds(thresholds, {"max_pass_rate_drop": max_pass_rate_drop,
                                                  "max_pass_k_drop": max_pass_k_drop,
                                                  "max_latency_p95_increase_s": max_latency_p95_increase_s,
                                                  "min_pass_rate": min_pass_rate, "min_pass_k": min_pass_k,
                                                  "max_infra_rate": max_infra_rate,
                                                  "allow_not_judged": allow_not_judged or None})
    except (OSError, ValueError) as exc:
        raise _fail(EXIT_BAD_INPUT, f"thresholds: {exc}") from None
    result = compare.compare(_report_of(baseline) if baseline else None, _report_of(candidate), th)
    if as_json:
        out.print(msgspec.json.encode(result).decode(), markup=False)
    else:
        table = Table(title=f"{baseline or '(no baseline)'} -> {candidate}", title_justify="left")
        for col in ("scenario", "metric", "baseline", "candidate", "delta", "change"):
            table.add_column(col)
        for r in result.rows:
            change = ("REGRESSION" + (" (missing)" if r.change == "missing" else "")) if r.regression else r.change
            table.add_row(r.scenario_id, r.metric, _fmt(r.baseline), _fmt(r.candidate), _fmt(r.delta), change)
        out.print(table)
        for title, reasons in (("newly failing", result.newly_failing), ("no longer failing", result.no_longer_failing)):
            for sid, names in reasons.items():
                out.print(f"{title} in {sid}: {'; '.join(names)}", markup=False)
    for v in result.violations:
        err.print(f"regression: {v}", markup=False)
    if result.violations:
        raise typer.Exit(EXIT_BATCH_FAILED)


def register(app: typer.Typer, scenarios_app: typer.Typer) -> None:
    scenarios_app.command("validate")(validate_files)
    app.command("judge")(judge)
    app.command("report")(make_report)
    app.command("compare")(compare_cmd)
