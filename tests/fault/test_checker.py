"""The history checker on crafted histories: it must flag each kind of violation and pass good runs.

A checker that passes everything proves nothing, so every invariant has a bad history here that
breaks exactly it, beside a good history that is as close to it as possible.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fault.checker import Limits, Report, check
from tests.fault.history import Event, History, dump, load

TTL = 3.0


class Builder:
    """Histories with explicit times: op(client, kind, invoked, completed, outcome, ...)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.n = 0

    def op(
        self,
        client: str,
        op: str,
        t0: float,
        t1: float | None,
        outcome: str = "ok",
        *,
        invoke: dict[str, Any] | None = None,
        **done: Any,
    ) -> str:
        self.n += 1
        op_id = f"{client}:{self.n}"
        self.events.append({"id": op_id, "type": "invoke", "client": client, "op": op, "time": t0, **(invoke or {})})
        if t1 is not None:
            self.events.append({"id": op_id, "type": outcome, "client": client, "op": op, "time": t1, **done})
        return op_id

    def session(self, client: str, session: str, t: float) -> None:
        self.op(client, "create_session", t, t + 0.01, session=session, ttl=TTL, expiry=t + TTL)

    def refresh(self, client: str, session: str, t: float, *, ttl: float = TTL) -> None:
        self.op(client, "refresh", t, t + 0.01, invoke={"session": session}, session=session, ttl=ttl, expiry=t + ttl)

    def grant(
        self, client: str, session: str, lock: str, token: int, t: float, *, rid: str = "", expiry: float = 0.0
    ) -> str:
        rid = rid or f"{client}-{token}"
        inv = {"lock": lock, "session": session, "request_id": rid}
        return self.op(
            client, "acquire", t, t + 0.01, invoke=inv, lock=lock, session=session, request_id=rid, token=token,
            expiry=expiry,
        )  # fmt: skip

    def release(self, client: str, lock: str, token: int, t: float, *, released: bool = True) -> str:
        inv = {"lock": lock, "token": token}
        return self.op(client, "release", t, t + 0.01, invoke=inv, lock=lock, token=token, released=released)

    def nemesis(self, what: str, t: float, **fields: Any) -> None:
        self.events.append({"type": "nemesis", "op": what, "time": t, **fields})

    def check(self, **limits: Any) -> Report:
        return check(self.events, Limits(**limits))


def only(report: Report, invariant: int) -> None:
    found = {v.invariant for v in report.violations}
    assert found == {invariant}, report.summary()


def flags(report: Report, invariant: int) -> None:
    """`invariant` is among those flagged (a history broken one way often breaks another too)."""
    assert invariant in {v.invariant for v in report.violations}, report.summary()


def handoff(b: Builder) -> None:
    """A holds token 5 and releases it at 2.0; B then gets token 9 and releases it: all fine."""
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.release("A", "L", 5, 2.0)
    b.grant("B", "sb", "L", 9, 2.05, expiry=3.0)
    b.release("B", "L", 9, 2.5)


# -- good histories -----------------------------------------------------------------------------


def test_good_handoff_passes() -> None:
    b = Builder()
    handoff(b)
    report = b.check()
    assert report.violations == [], report.summary()
    assert report.grants == 2


def test_good_expiry_then_grant_passes() -> None:
    """A never releases; its session lapses at 3.0 (last confirmation 0.0 + TTL); B's grant at 3.5 is fine."""
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 3.2)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.grant("B", "sb", "L", 9, 3.5, expiry=6.2)
    report = b.check()
    assert report.violations == [], report.summary()
    assert not any(h.empty for h in report.holds)


def test_good_retry_with_same_request_id_passes() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    inv = {"lock": "L", "session": "sa", "request_id": "r1"}
    b.op("A", "acquire", 1.0, 1.5, "info", invoke=inv, code="UNAVAILABLE", reason="")
    b.op("A", "acquire", 1.6, 1.7, invoke=inv, lock="L", session="sa", request_id="r1", token=7, expiry=3.0)
    b.release("A", "L", 7, 2.0)
    report = b.check()
    assert report.violations == [], report.summary()


def test_good_quorum_loss_passes() -> None:
    b = Builder()
    handoff(b)
    b.nemesis("quorum_lost", 3.0, members=[0, 1])
    b.op("A", "refresh", 3.1, 4.1, "info", invoke={"session": "sa", "deadline": 1.0}, code="UNAVAILABLE")
    b.op("B", "describe", 3.2, 4.2, "fail", invoke={"lock": "L", "deadline": 1.0}, code="UNAVAILABLE")
    b.nemesis("quorum_restored", 5.0, members=[0, 1])
    b.session("A", "sa2", 6.0)
    report = b.check()
    assert report.violations == [], report.summary()


def test_good_liveness_passes() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 0.5, expiry=3.0)
    b.nemesis("client_killed", 1.0, client="A", lock="L", token=5, ttl=TTL)
    b.op("B", "acquire", 1.1, 4.5, invoke={"lock": "L", "session": "sb", "request_id": "w"}, lock="L", token=9)
    report = b.check()
    assert report.violations == [], report.summary()
    assert [round(lv.delay, 1) for lv in report.liveness] == [3.5]


def test_history_round_trips_through_json_lines(tmp_path) -> None:
    """A worker process's history file, merged into the test's, checks the same."""
    h = History(tmp_path / "h.jsonl")
    p = h.invoke("A", "create_session", ttl=3)
    p.ok(session="sa", ttl=3, expiry=p.invoked_at + 3)
    q = h.invoke("A", "acquire", lock="L", session="sa", request_id="r")
    q.ok(lock="L", session="sa", request_id="r", token=4, expiry=p.invoked_at + 3)
    h.close()
    with (tmp_path / "h.jsonl").open("a") as f:
        f.write('{"id": "A:9", "type": "inv')  # a torn last line: the writer was killed
    events = load(tmp_path / "h.jsonl")
    assert len(events) == 4
    dump(events, tmp_path / "copy.jsonl")
    report = check(load(tmp_path / "copy.jsonl"))
    assert report.violations == [] and report.grants == 1


# -- 1: mutual exclusion ------------------------------------------------------------------------


def test_overlap_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.grant("B", "sb", "L", 9, 2.0, expiry=3.0)  # A has neither released nor lapsed yet
    b.release("A", "L", 5, 2.5, released=False)
    only(b.check(), 1)


def test_overlap_through_a_refreshed_expiry_is_flagged() -> None:
    """A's refresh at 2.0 extends its hold to 5.0; B's grant at 4.0 overlaps it."""
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 3.5)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.refresh("A", "sa", 2.0)
    b.grant("B", "sb", "L", 9, 4.0, expiry=6.5)
    only(b.check(), 1)


def test_late_refresh_does_not_extend_a_lapsed_hold() -> None:
    """A refresh confirmed after the client's own expiry came too late: the hold had ended."""
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 3.5)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.op("A", "refresh", 2.5, 3.2, invoke={"session": "sa"}, session="sa", ttl=TTL, expiry=5.5)
    b.grant("B", "sb", "L", 9, 4.0, expiry=6.5)
    report = b.check()
    assert report.violations == [], report.summary()
    assert [(h.token, round(h.end, 2)) for h in report.holds] == [(5, 3.0), (9, 6.5)]


def test_refused_write_while_holding_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.op("A", "write", 1.5, 1.5, "fail", invoke={"lock": "L", "token": 5}, reason="STALE_TOKEN", highest=9)
    b.release("A", "L", 5, 2.0)
    only(b.check(), 1)


# -- 2: fencing tokens --------------------------------------------------------------------------


def test_token_reuse_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.release("A", "L", 5, 1.5)
    b.grant("B", "sb", "L", 5, 2.0, expiry=3.0)
    b.release("B", "L", 5, 2.5)
    flags(b.check(), 2)


def test_non_increasing_token_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 9, 1.0, expiry=3.0)
    b.release("A", "L", 9, 1.5)
    b.grant("B", "sb", "L", 5, 2.0, expiry=3.0)
    b.release("B", "L", 5, 2.5)
    flags(b.check(), 2)


def test_tokens_of_different_locks_are_independent() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.grant("A", "sa", "L", 9, 1.0, expiry=3.0)
    b.release("A", "L", 9, 1.5)
    b.grant("A", "sa", "M", 5, 2.0, expiry=3.0)
    b.release("A", "M", 5, 2.5)
    assert b.check().violations == []


# -- 3: stale tokens ----------------------------------------------------------------------------


def test_stale_release_accepted_is_flagged() -> None:
    """A's session lapsed (3.0), B got token 9; A's late release of token 5 must not report released."""
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 3.2)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.grant("B", "sb", "L", 9, 3.5, expiry=6.2)
    b.release("A", "L", 5, 4.0, released=True)
    only(b.check(), 3)


def test_stale_release_refused_passes() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 3.2)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.grant("B", "sb", "L", 9, 3.5, expiry=6.2)
    b.release("A", "L", 5, 4.0, released=False)
    assert b.check().violations == []


def test_refresh_of_a_dead_session_is_flagged() -> None:
    """B got the lock A never released: A's lease ended, so nothing may refresh it afterwards."""
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 3.2)
    b.grant("A", "sa", "L", 5, 1.0, expiry=3.0)
    b.grant("B", "sb", "L", 9, 3.5, expiry=6.2)
    b.refresh("A", "sa", 4.0)
    only(b.check(), 3)


# -- 4: liveness --------------------------------------------------------------------------------


def test_slow_handoff_after_holder_death_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 0.5, expiry=3.0)
    b.nemesis("client_killed", 1.0, client="A", lock="L", token=5, ttl=TTL)
    b.op("B", "acquire", 1.1, 20.0, invoke={"lock": "L", "session": "sb", "request_id": "w"}, lock="L", token=9)
    report = b.check(liveness_base=3.0, per_leader_change=5.0)
    only(report, 4)


def test_leader_changes_extend_the_liveness_bound() -> None:
    """Each etcd election re-extends leases: two of them between death and grant allow 2 x 5 s more."""
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 0.5, expiry=3.0)
    b.events.append({"type": "leader", "leader": 0, "term": 2, "time": 0.2})
    b.nemesis("client_killed", 1.0, client="A", lock="L", token=5, ttl=TTL)
    b.events.append({"type": "leader", "leader": 1, "term": 3, "time": 3.0})
    b.events.append({"type": "leader", "leader": 2, "term": 4, "time": 8.0})
    b.op("B", "acquire", 1.1, 14.0, invoke={"lock": "L", "session": "sb", "request_id": "w"}, lock="L", token=9)
    report = b.check(liveness_base=3.0, per_leader_change=5.0)
    assert report.violations == [], report.summary()
    assert report.liveness[0].leader_changes == 2


def test_never_granted_after_holder_death_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.session("B", "sb", 0.0)
    b.grant("A", "sa", "L", 5, 0.5, expiry=3.0)
    b.nemesis("client_killed", 1.0, client="A", lock="L", token=5, ttl=TTL)
    inv = {"lock": "L", "session": "sb", "request_id": "w"}
    b.op("B", "acquire", 1.1, 21.1, "fail", invoke=inv, code="ABORTED", reason="WAIT_EXPIRED")
    only(b.check(), 4)


# -- 5: lost release ----------------------------------------------------------------------------


def test_lost_release_seen_as_holder_is_flagged() -> None:
    b = Builder()
    handoff(b)
    b.op("C", "describe", 1.5, 1.6, invoke={"lock": "L"}, lock="L", holder_token=5, holder_session="sa")  # fine
    b.op("C", "describe", 2.03, 2.04, invoke={"lock": "L"}, lock="L", holder_token=5, holder_session="sa")
    only(b.check(), 5)


def test_lost_release_in_lock_held_detail_is_flagged() -> None:
    b = Builder()
    handoff(b)
    inv = {"lock": "L", "session": "sc", "request_id": "c1"}
    b.op("C", "acquire", 3.0, 3.1, "fail", invoke=inv, code="ABORTED", reason="LOCK_HELD", holder_token=9)
    only(b.check(), 5)


def test_released_entry_still_in_etcd_is_flagged() -> None:
    b = Builder()
    handoff(b)
    b.events.append({"type": "entry", "lock": "L", "token": 9, "session": "sb", "request_id": "B-9", "time": 5.0})
    only(b.check(), 5)


# -- 6: idempotent retries ----------------------------------------------------------------------


def test_double_grant_for_one_request_id_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.grant("A", "sa", "L", 5, 1.0, rid="r1", expiry=3.0)
    b.release("A", "L", 5, 1.5)
    b.grant("A", "sa", "L", 9, 2.0, rid="r1", expiry=3.0)
    b.release("A", "L", 9, 2.5)
    only(b.check(), 6)


def test_second_entry_for_one_request_id_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    b.grant("A", "sa", "L", 5, 1.0, rid="r1", expiry=3.0)
    b.events.append({"type": "entry", "lock": "L", "token": 8, "session": "sa2", "request_id": "r1", "time": 2.0})
    flags(b.check(), 6)


# -- 7: no entry left by a failed acquire -------------------------------------------------------


def test_entry_left_by_failed_acquire_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    inv = {"lock": "L", "session": "sa", "request_id": "r1"}
    b.op("A", "acquire", 1.0, 2.0, "fail", invoke=inv, code="ABORTED", reason="WAIT_EXPIRED")
    b.events.append({"type": "entry", "lock": "L", "token": 7, "session": "sa", "request_id": "r1", "time": 5.0})
    only(b.check(), 7)


def test_entry_left_by_cancelled_acquire_is_flagged() -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    inv = {"lock": "L", "session": "sa", "request_id": "r1"}
    b.op("A", "acquire", 1.0, 1.2, "info", invoke=inv, code="CANCELLED")
    b.events.append({"type": "entry", "lock": "L", "token": 7, "session": "sa", "request_id": "r1", "time": 5.0})
    only(b.check(), 7)


@pytest.mark.parametrize("after", [1.0, 20.0], ids=["while-cleaning-up", "long-after"])
def test_failed_acquire_seen_as_holder_is_flagged(after: float) -> None:
    """Past the clean-up grace, a failed acquire's entry seen as holder is a leak; within it, a
    clean-up still waiting for etcd to take writes again."""
    b = Builder()
    b.session("A", "sa", 0.0)
    inv = {"lock": "L", "session": "sa", "request_id": "r1"}
    b.op("A", "acquire", 1.0, 2.0, "fail", invoke=inv, code="ABORTED", reason="WAIT_EXPIRED")
    t = 2.0 + after
    b.op("C", "describe", t, t + 0.1, invoke={"lock": "L"}, lock="L", holder_token=7, holder_session="sa")
    report = b.check(cleanup_grace=10.0)
    if after < 10.0:
        assert report.violations == [], report.summary()
    else:
        only(report, 7)


def test_holder_seen_while_its_acquire_runs_passes() -> None:
    """The grant exists before its answer arrives; a Describe in between is no phantom."""
    b = Builder()
    b.session("A", "sa", 0.0)
    inv = {"lock": "L", "session": "sa", "request_id": "r1"}
    b.op("A", "acquire", 1.0, 2.0, invoke=inv, lock="L", session="sa", request_id="r1", token=7, expiry=3.0)
    b.op("C", "describe", 1.5, 1.6, invoke={"lock": "L"}, lock="L", holder_token=7, holder_session="sa")
    b.release("A", "L", 7, 2.5)
    assert b.check().violations == []


@pytest.mark.parametrize("after", [0.8, 20.0], ids=["while-cleaning-up", "long-after"])
def test_already_queued_behind_a_cancelled_acquire_is_flagged(after: float) -> None:
    b = Builder()
    b.session("A", "sa", 0.0)
    inv = {"lock": "L", "session": "sa", "request_id": "r1"}
    b.op("A", "acquire", 1.0, 1.2, "info", invoke=inv, code="CANCELLED")
    inv2 = {"lock": "L", "session": "sa", "request_id": "r2"}
    t = 1.2 + after
    b.op(
        "A", "acquire", t, t + 0.1, "fail", invoke=inv2, code="FAILED_PRECONDITION", reason="ALREADY_QUEUED",
        existing_request_id="r1",
    )  # fmt: skip
    report = b.check(cleanup_grace=10.0)
    if after < 10.0:
        assert report.violations == [], report.summary()
    else:
        only(report, 7)


# -- 8: quorum loss -----------------------------------------------------------------------------


def quorum_window(b: Builder) -> None:
    handoff(b)
    b.nemesis("quorum_lost", 3.0, members=[0, 1])
    b.nemesis("quorum_restored", 6.0, members=[0, 1])


def test_ack_during_quorum_loss_is_flagged() -> None:
    b = Builder()
    quorum_window(b)
    b.op("A", "refresh", 3.5, 3.6, invoke={"session": "sa"}, session="sa", ttl=TTL, expiry=6.5)
    b.session("A", "sa2", 7.0)
    only(b.check(), 8)


def test_call_not_answered_unavailable_during_quorum_loss_is_flagged() -> None:
    """The broker never answered; the client's own deadline ended the call (no status details)."""
    b = Builder()
    quorum_window(b)
    b.op("A", "refresh", 3.5, 4.5, "info", invoke={"session": "sa", "deadline": 1.0}, code="DEADLINE_EXCEEDED")
    b.session("A", "sa2", 7.0)
    only(b.check(), 8)


def test_call_answered_after_its_deadline_is_flagged() -> None:
    b = Builder()
    quorum_window(b)
    b.op("A", "refresh", 3.1, 5.9, "info", invoke={"session": "sa", "deadline": 0.5}, code="UNAVAILABLE")
    b.session("A", "sa2", 7.0)
    only(b.check(deadline_slack=1.0), 8)


def test_no_resumption_after_quorum_loss_is_flagged() -> None:
    b = Builder()
    quorum_window(b)
    b.op("A", "create_session", 7.0, 8.0, "info", invoke={"deadline": 1.0}, code="UNAVAILABLE")
    b.op("A", "create_session", 40.0, 41.0, "info", invoke={"deadline": 1.0}, code="UNAVAILABLE")
    only(b.check(resume_within=20.0), 8)


# -- 0: bugs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["INTERNAL", "UNKNOWN"])
def test_internal_error_is_flagged(code: str) -> None:
    b = Builder()
    handoff(b)
    b.op("A", "describe", 3.0, 3.1, "fail", invoke={"lock": "L"}, code=code, reason="INTERNAL")
    only(b.check(), 0)
