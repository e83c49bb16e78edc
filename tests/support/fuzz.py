"""Hypothesis strategies for fuzzing the decoders of external input (tests/unit/test_fuzz_decoders.py,
tests/integration/test_fuzz_wire.py): JSON objects over a type's own fields, well typed or not."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from shared import scenarios

LIBRARY = scenarios.library()

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids,
                                                                                                max_size=4), max_leaves=12)
ids = st.sampled_from(["b1", "room-00000-a1", "", "../etc", "a.b", "x" * 300, "ह", "AJ_x", "en-account-help"]) | st.text(
    max_size=20)


def objects(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    """JSON objects over a type's own fields (each value well typed or not) and stray keys, or any bytes."""
    per_field = {k: v | json_values for k, v in fields.items()}
    obj = st.fixed_dictionaries({}, optional=per_field) | st.dictionaries(st.text(max_size=10), json_values, max_size=3)
    return st.one_of(obj.map(lambda d: json.dumps(d).encode()), json_values.map(lambda v: json.dumps(v).encode()),
                     st.binary(max_size=200))


def named(field: str, reason: str) -> None:
    assert field and isinstance(field, str), field
    assert reason and isinstance(reason, str), reason


start_bodies = objects({
    "batch_id": ids, "conversations": st.integers(-5, 20_000), "concurrency": st.integers(-5, 500),
    "scenario": st.sampled_from([*LIBRARY, "nope"]) | ids, "language": st.sampled_from(["en", "hi", "xx", "EN"]),
    "max_turns": st.integers(-1, 300), "mode": st.sampled_from(["text", "voice", "video"]),
    "target_agent": ids,
})

role_fields = {"room": ids, "job_id": ids, "identity": ids, "prefer": st.sampled_from(["customer", "support", "boss"]),
               "role": st.sampled_from(["customer", "support", "x"]), "lease": st.integers(-3, 2**64)}
