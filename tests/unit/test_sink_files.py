"""The sink's files: paths never leave the data dir, writes are durable and atomic, recovery repairs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.sink import core, files
from shared.contracts import ContractError, TurnRecorded

HINDI = "मुझे अपने खाते का पासवर्ड बदलना है"

BAD_BATCH_IDS = [
    "..", "../x", "../../etc", "a/b", "a\\b", "/etc", "", ".", ".hidden", "a.b", "A1", "a*", "a>", "a b",
    "a\x00b", "%2e%2e", "x" * 65, "-lead", "ब", "b1\n",
]
BAD_CONVERSATION_IDS = [
    "..", "../x", "../../../../tmp/pwn", "a/b", "a\\b", "/etc/passwd", "", ".", ".hidden", "a.b", "a*", "a>",
    "a b", "a\x00b", "c" * 129, "-lead", "क", "c1\n",
]


def turn(n: int, attempt: int = 1, text: str = "hi") -> TurnRecorded:
    return TurnRecorded(
        batch_id="b1", conversation_id="c1", attempt=attempt, turn=n, role="customer", text=text,
        started_at=1.0, ended_at=2.0,
    )


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("bad", BAD_BATCH_IDS)
def test_bad_batch_ids_never_become_paths(tmp_path: Path, bad: str) -> None:
    dirs = files.DataDir(tmp_path / "data")
    with pytest.raises(ContractError) as err:
        dirs.transcript(bad, "c1")
    assert err.value.field == "batch_id"
    with pytest.raises(ContractError):
        dirs.batch_json(bad)
    assert tree(tmp_path) == {"data"}


@pytest.mark.parametrize("bad", BAD_CONVERSATION_IDS)
def test_bad_conversation_ids_never_become_paths(tmp_path: Path, bad: str) -> None:
    dirs = files.DataDir(tmp_path / "data")
    with pytest.raises(ContractError) as err:
        dirs.transcript("b1", bad)
    assert err.value.field == "conversation_id"
    assert tree(tmp_path) == {"data"}


def test_a_symlink_out_of_the_data_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "data" / "batches").mkdir(parents=True)
    (tmp_path / "data" / "batches" / "evil").symlink_to(outside, target_is_directory=True)
    dirs = files.DataDir(tmp_path / "data")
    with pytest.raises(ContractError) as err:
        dirs.transcript("evil", "c1")
    assert "outside the data directory" in err.value.reason
    with pytest.raises(ContractError):
        dirs.batch_json("evil")
    good = dirs.transcript("b1", "AJ_x-1")
    assert good == (tmp_path / "data").resolve() / "batches" / "b1" / "conversations" / "AJ_x-1.jsonl"


def test_write_atomic_then_append_and_recover(tmp_path: Path) -> None:
    dirs = files.DataDir(tmp_path)
    path = dirs.transcript("b1", "c1")
    dirs.ensure_dir(path.parent)
    files.write_atomic(path, core.encode_line(turn(0, text=HINDI)))
    files.append(path, core.encode_line(turn(1)) + core.encode_line(turn(2)))
    assert sorted(os.listdir(path.parent)) == ["c1.jsonl"]  # no temporary left behind
    assert HINDI.encode() in path.read_bytes()
    assert files.recover_transcript(path) == files.Recovered(1, 3)
    assert files.recover_transcript(path.with_name("nope.jsonl")) == files.Recovered(0, 0)


def test_append_to_a_missing_file_fails_instead_of_starting_one_mid_way(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        files.append(tmp_path / "gone.jsonl", b"x\n")
    assert not (tmp_path / "gone.jsonl").exists()


def test_recover_cuts_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "c1.jsonl"
    whole = core.encode_line(turn(0)) + core.encode_line(turn(1, text=HINDI))
    partial = core.encode_line(turn(2, text=HINDI))[:-9]  # SIGKILL mid-append, mid-character even
    path.write_bytes(whole + partial)
    found = files.recover_transcript(path)
    assert found == files.Recovered(1, 2, truncated_bytes=len(partial))
    assert path.read_bytes() == whole


def test_recover_keeps_the_valid_prefix_of_a_tampered_file(tmp_path: Path) -> None:
    path = tmp_path / "c1.jsonl"
    good = core.encode_line(turn(0)) + core.encode_line(turn(1))
    path.write_bytes(good + b"not json\n" + core.encode_line(turn(3)))
    found = files.recover_transcript(path)
    assert (found.attempt, found.lines) == (1, 2) and found.quarantined is not None
    assert path.read_bytes() == good
    assert found.quarantined.read_bytes().startswith(good + b"not json\n")
    # a gap or a second attempt in one file is just as foreign
    path.write_bytes(good + core.encode_line(turn(2, attempt=2)))
    assert files.recover_transcript(path).lines == 2


def test_read_doc_moves_an_unreadable_batch_json_aside(tmp_path: Path) -> None:
    path = tmp_path / "batch.json"
    assert files.read_doc(path) is None
    doc = core.BatchDoc(batch_id="b1", requested=3)
    files.write_atomic(path, core.encode_doc(doc))
    assert files.read_doc(path) == doc
    path.write_bytes(b'{"batch_id": "b1", "status": "runn')
    assert files.read_doc(path) is None
    assert not path.exists() and any(p.name.startswith(".batch.json.corrupt-") for p in tmp_path.iterdir())
