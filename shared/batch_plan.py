"""Which scenario and trial each conversation of a batch runs, and where a batch's scenarios come from.

A batch with ``scenarios`` (a file or an inline list) and/or ``trials: k`` runs every scenario
k times: ``conversations = len(scenarios) * k``. Conversation ``i`` runs
``scenarios[i % S]`` as trial ``i // S + 1``, so the first S conversations are one trial of
each scenario (a batch stopped early still covers every scenario). The batch carries the
scenario entries (:class:`~shared.contracts.BatchScenario`) in its accepted event, and each
job's metadata carries its own, so a worker needs no copy of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from shared import scenario_files
from shared.contracts import BatchScenario, BatchSpec, JobMetadata, encode
from shared.scenarios import Scenario

# livekit-server refuses room and dispatch metadata over 512 KiB ("metadata size exceeds limits
# 524288", measured with v1.13.5), and each job's metadata carries its scenario's entry; NATS
# carries a message up to 1 MiB (infra/nats.conf), and BatchAccepted carries every entry.
MAX_ENTRY_BYTES = 256 * 1024
MAX_BATCH_SCENARIO_BYTES = 768 * 1024


class Refusal(NamedTuple):
    field: str
    reason: str


class Slot(NamedTuple):
    scenario_id: str
    trial: int
    doc: BatchScenario | None


def conversation_index(conversation_id: str) -> int:
    """``<batch_id>-00012`` -> 12 (the dispatcher's naming, services/dispatcher/state.py)."""
    return int(conversation_id.rsplit("-", 1)[1])


def slot(spec: BatchSpec, index: int) -> Slot:
    """The scenario and trial of conversation ``index``."""
    if not spec.scenarios:
        return Slot(spec.scenario, index + 1, None)
    n = len(spec.scenarios)
    entry = spec.scenarios[index % n]
    return Slot(entry.id, index // n + 1, entry)


def resolve_file(relative: str, scenario_dir: Path | None) -> Path | Refusal:
    """A ``scenarios`` path as given in ``batch.start``: relative, no ``..``, inside the scenario directory."""
    if scenario_dir is None:
        return Refusal("scenarios", "no scenario directory is configured on the dispatcher (CROSSTALK_SCENARIO_DIR); "
                                    "send the scenarios inline as a list instead")
    pure = PurePosixPath(relative)
    if not relative.strip() or pure.is_absolute() or relative.startswith("~") or "\\" in relative:
        return Refusal("scenarios", f"{relative!r} must be a path relative to the scenario directory")
    if ".." in pure.parts:
        return Refusal("scenarios", f"{relative!r} must not contain '..'")
    if pure.suffix not in (".yaml", ".yml"):
        return Refusal("scenarios", f"{relative!r} must be a .yaml or .yml file")
    root = scenario_dir.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        return Refusal("scenarios", f"{relative!r} resolves outside the scenario directory")
    if not path.is_file():
        return Refusal("scenarios", f"no file {relative!r} in the scenario directory")
    return path


def requested_scenarios(raw: str | list[dict[str, object]], scenario_dir: Path | None
                        ) -> tuple[list[Scenario], str | None] | Refusal:
    """The scenarios ``batch.start`` names (file or inline list), and the file's relative path."""
    try:
        if isinstance(raw, str):
            path = resolve_file(raw, scenario_dir)
            if isinstance(path, Refusal):
                return path
            return scenario_files.load_path(path).scenarios, raw
        return scenario_files.from_entries(raw), None
    except scenario_files.ScenarioFileError as exc:
        first = exc.problems[0]
        more = f" (and {len(exc.problems) - 1} more problem(s))" if len(exc.problems) > 1 else ""
        where = f"{raw}:{first.line}: " if isinstance(raw, str) and first.line else ""
        inner = first.field if not isinstance(raw, str) else f"scenarios:{first.field}"
        return Refusal(inner or "scenarios", f"{where}{first.field}: {first.reason}{more}")
    except (OSError, UnicodeDecodeError) as exc:
        return Refusal("scenarios", f"cannot read {raw!r}: {exc}")


def batch_scenarios(scenarios: list[Scenario]) -> tuple[BatchScenario, ...]:
    return tuple(BatchScenario(id=sc.id, doc=scenario_files.to_doc(sc)) for sc in scenarios)


def too_large(entries: tuple[BatchScenario, ...]) -> Refusal | None:
    """A refusal when an entry could not ride in a job's metadata, or all of them in one NATS message."""
    total = 0
    for i, entry in enumerate(entries):
        size = len(encode(entry))
        total += size
        if size > MAX_ENTRY_BYTES:
            return Refusal(f"scenarios[{i}]", f"is {size} bytes as JSON; at most {MAX_ENTRY_BYTES} (it travels in "
                                              f"LiveKit job metadata)")
    if total > MAX_BATCH_SCENARIO_BYTES:
        return Refusal("scenarios", f"are {total} bytes as JSON together; at most {MAX_BATCH_SCENARIO_BYTES} "
                                    f"(they travel in one NATS message); split the batch")
    return None


def job_scenario(meta: JobMetadata, library: Mapping[str, Scenario], *, embed_script: bool) -> Scenario:
    """The scenario a job plays: the entry its metadata carries, else the library's (KeyError if unknown).

    ``embed_script``: write the script into the instructions (the scripted model may not know an
    inline scenario); pass ``not settings.real_model``.
    """
    if meta.scenario_doc is not None:
        return scenario_files.from_doc(meta.scenario_doc, embed_script=embed_script)
    return library[meta.scenario]
