"""Turn-taking decisions (worker/lifecycle/turns.py): who speaks which turn, and when the call ends. No room, no clock.

Between crosstalk's two agents turns alternate; against the user's own agent (the target) its turns take
the next free index: it may greet first and speak several turns in a row.
"""

from __future__ import annotations

from worker.lifecycle.turns import TIMEOUT, End, Speak, Turns, peer_left, turn_failed


def test_the_customer_speaks_even_turns_the_support_agent_odd_ones() -> None:
    customer, support = Turns("customer", 6), Turns("support", 6)
    assert customer.speak(now=10.0, first_token_s=0.5) == Speak(0, 9.5)  # turn 0 starts when the model was asked
    assert support.heard(0, at=10.0) is None  # reply
    assert support.speak(now=11.0, first_token_s=0.2) == Speak(1, 10.0)  # timed from hearing turn 0
    assert support.spoken(1) is None
    assert customer.heard(1, at=11.0) is None
    assert customer.speak(now=12.0, first_token_s=None) == Speak(2, 11.0)
    assert (customer.count, support.count) == (3, 2)


def test_the_last_turn_ends_the_call_on_both_sides() -> None:
    support = Turns("support", 4)
    assert support.heard(2, at=1.0) is None
    assert support.speak(now=2.0, first_token_s=None) == Speak(3, 1.0)
    assert support.spoken(3) == End("max_turns", ok=True, mine=True)  # the speaker reports it
    customer = Turns("customer", 4)
    assert customer.heard(3, at=2.0) == End("max_turns", ok=True, mine=False)
    assert customer.ended == End("max_turns", ok=True, mine=False)
    assert customer.speak(now=3.0, first_token_s=None) is None  # nothing after the end
    assert customer.count == 4


def test_nothing_is_said_past_max_turns() -> None:
    t = Turns("customer", 1)
    assert t.speak(now=0.0, first_token_s=None) == Speak(0, 0.0)
    assert t.speak(now=1.0, first_token_s=None) is None


def test_a_requested_end_comes_after_the_goodbye_turn() -> None:
    t = Turns("support", 10)
    t.heard(0, at=1.0)
    t.request_end("end_conversation: support")
    assert t.speak(now=2.0, first_token_s=None) == Speak(1, 1.0)
    assert t.spoken(1) == End("end_conversation: support", ok=True, mine=True)


def test_never_speaks_on_a_lease_that_may_have_ended() -> None:
    t = Turns("customer", 10)
    assert t.speak(now=0.0, first_token_s=None, lease_lost="superseded") == End("lease_lost: superseded",
                                                                                 ok=False, mine=True)
    assert t.count == 0 and t.next_turn == 0


def test_the_first_end_stands() -> None:
    t = Turns("customer", 10)
    assert t.control({"kind": "end", "reason": "end_conversation: support"}) == End(
        "end_conversation: support", ok=True, mine=False)
    assert t.control({"kind": "other"}) is None
    assert t.finish(peer_left("customer")) == End("agent_left: support", ok=False, mine=True)
    assert t.finish(TIMEOUT) == End("agent_left: support", ok=False, mine=True)
    assert t.heard(3, at=5.0) == t.ended and t.count == 0  # after the end, nothing moves


def test_a_failed_turn_names_the_error() -> None:
    end = turn_failed("support", RuntimeError("stream gone"))
    assert end == End("agent_error: support: turn failed: RuntimeError: stream gone", ok=False, mine=True)
    assert len(turn_failed("support", RuntimeError("x" * 1000)).reason) == 300


# --------------------------------------------------------------------------- the user's own agent (the target)


def test_a_target_that_greets_first_speaks_turn_0_and_the_customer_answers_it_at_turn_1() -> None:
    customer = Turns("customer", 10, heard_at=1.0)
    assert customer.peer_turn(at=2.0, prompted=False) == (0, None)  # the greeting
    customer.heard_at = 3.0  # the customer's model is asked once the greeting is over
    assert customer.speak(now=4.0, first_token_s=0.2) == Speak(1, 3.0) and customer.waiting
    assert customer.peer_turn(at=5.0) == (2, None) and not customer.waiting  # its answer
    assert customer.peer_turn(at=6.0, prompted=False) == (3, None)  # a follow-up nobody asked for
    # the customer's next turn answers the answer, timed from it; nothing reserved an index
    assert customer.speak(now=7.0, first_token_s=None) == Speak(4, 5.0)
    assert customer.count == 5


def test_words_the_target_began_before_the_customers_turn_reached_it_answer_nothing() -> None:
    customer = Turns("customer", 10)
    assert customer.speak(now=1.0, first_token_s=None) == Speak(0, 1.0)
    assert customer.peer_turn(at=2.0, prompted=False) == (1, None) and customer.waiting  # still owed its answer
    assert customer.peer_turn(at=3.0) == (2, None) and not customer.waiting
    assert customer.speak(now=4.0, first_token_s=None) == Speak(3, 3.0)


def test_an_unprompted_turn_counts_toward_max_turns() -> None:
    customer = Turns("customer", 2)
    assert customer.peer_turn(at=1.0, prompted=False) == (0, None)
    assert customer.speak(now=2.0, first_token_s=None) == Speak(1, 0.0)
    assert customer.spoken(1) == End("max_turns", ok=True, mine=True)
    t = Turns("customer", 1)
    assert t.peer_turn(at=1.0, prompted=False) == (0, End("max_turns", ok=True, mine=False))


def test_nothing_is_said_once_the_peer_left() -> None:
    t = Turns("customer", 10)
    assert t.speak(now=0.0, first_token_s=None) == Speak(0, 0.0)
    t.peer_gone()
    assert t.speak(now=1.0, first_token_s=None) is None and t.count == 1 and t.waiting
