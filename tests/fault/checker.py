"""Check a recorded history (tests/fault/history.py) against the invariants of issue 5.

    1  No two clients hold the same lock at once. A hold starts when its Acquire returns and ends
       at the first of: the holder's own last confirmed expiry running out, its Release or
       CloseSession being sent, or it learning that the session is gone. A write to a fenced
       resource that is refused while its writer still holds the lock is also an overlap: the
       resource had already seen a newer grant.
    2  Fencing tokens per lock are unique (one grant each) and strictly increase in grant order.
    3  A stale token never releases, and a dead session is never refreshed: a Release that reports
       `released` after a newer grant of that lock, or a Refresh confirmed after the session ended.
    4  After a holder dies (killed or paused), the lock goes to the next waiter within its TTL plus
       `Limits.liveness_base`, plus `Limits.per_leader_change` for each etcd leader change between.
    5  No lost release: after a Release returns OK, that grant is never seen again (as holder in
       Describe or in a NotAcquired detail, as a grant, or as an entry in etcd).
    6  A retried Acquire (same request id) never yields two grants.
    7  A failed, timed-out or cancelled Acquire leaves no entry: none is left in etcd, and none is
       ever seen as holder.
    8  During an etcd quorum loss nothing is acknowledged, every call ends by its deadline with
       UNAVAILABLE, and service resumes by itself after the heal.
    0  No call ever ends INTERNAL or UNKNOWN (a broker bug).

Times are the recording clients' time.monotonic(); the checker never looks at server clocks.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.fault.history import Event

MUTATING = {"acquire", "release", "create_session", "refresh", "close_session"}
RPCS = MUTATING | {"describe"}
MONITOR_LAG = 1.0
INF = float("inf")


@dataclass
class Op:
    id: str
    client: str
    op: str
    invoke: float
    complete: float | None
    outcome: str  # ok, fail or info (an invoke never completed counts as info)
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def end(self) -> float:
        return INF if self.complete is None else self.complete

    @property
    def code(self) -> str:
        return str(self.fields.get("code", ""))

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason", ""))


@dataclass(frozen=True)
class Violation:
    invariant: int
    what: str
    ops: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.what}" + (f" (ops {', '.join(self.ops)})" if self.ops else "")


@dataclass
class Hold:
    lock: str
    token: int
    client: str
    session: str
    request_id: str
    start: float
    end: float
    op_id: str

    @property
    def empty(self) -> bool:
        return self.end <= self.start


@dataclass(frozen=True)
class Limits:
    # Beyond the TTL, for etcd to notice the expiry (its lessor checks every 500 ms), revoke the
    # lease, and the waiter's watch, broker and answer to run on a loaded 2-core machine.
    liveness_base: float = 3.0
    # An etcd leader change re-extends every lease to a full TTL plus the election timeout.
    per_leader_change: float = 5.0
    # A call's answer may arrive this much after its deadline (event-loop lateness).
    deadline_slack: float = 1.5
    # After quorum returns, some mutating call must succeed within this.
    resume_within: float = 20.0
    # A cancelled Acquire gets no answer, and one that fails while etcd cannot be written (an
    # election, a quorum loss) is answered before its entry is gone: the broker removes the entry
    # as soon as etcd takes writes again, retrying in the background. Within this long after the
    # caller gave up, the entry may still be seen.
    cleanup_grace: float = 10.0


@dataclass
class Liveness:
    lock: str
    token: int
    delay: float
    leader_changes: int
    allowed: float


@dataclass
class Report:
    violations: list[Violation]
    ops: list[Op]
    holds: list[Hold]
    liveness: list[Liveness]
    nemesis: list[Event]

    def by(self, invariant: int) -> list[Violation]:
        return [v for v in self.violations if v.invariant == invariant]

    def count(self, op: str, outcome: str | None = None) -> int:
        return sum(1 for o in self.ops if o.op == op and (outcome is None or o.outcome == outcome))

    @property
    def grants(self) -> int:
        return len({(h.lock, h.token) for h in self.holds})

    def summary(self) -> str:
        kinds = sorted({o.op for o in self.ops})
        parts = [
            f"{k}: " + "/".join(f"{self.count(k, oc)} {oc}" for oc in ("ok", "fail", "info") if self.count(k, oc))
            for k in kinds
        ]
        lines = [f"{len(self.ops)} ops ({'; '.join(parts)}), {self.grants} grants, {len(self.nemesis)} nemesis events"]
        for lv in self.liveness:
            lines.append(
                f"liveness {lv.lock} after token {lv.token}: {lv.delay:.2f}s "
                f"({lv.leader_changes} leader changes, allowed {lv.allowed:.1f}s)"
            )
        lines += [str(v) for v in self.violations[:30]]
        if len(self.violations) > 30:
            lines.append(f"... and {len(self.violations) - 30} more violations")
        return "\n".join(lines)

    def assert_valid(self) -> None:
        assert not self.violations, "history violates the invariants:\n" + self.summary()


# -- pairing ------------------------------------------------------------------------------------


def pair(events: Iterable[Event]) -> tuple[list[Op], list[Event]]:
    """Operations (invoke joined with its completion) and the other events, in time order."""
    invokes: dict[str, Event] = {}
    completions: dict[str, Event] = {}
    others: list[Event] = []
    for e in events:
        kind = e.get("type")
        if kind == "invoke":
            invokes[str(e["id"])] = e
        elif kind in ("ok", "fail", "info"):
            completions[str(e["id"])] = e
        else:
            others.append(e)
    ops: list[Op] = []
    for op_id, inv in invokes.items():
        done = completions.get(op_id)
        fields = {k: v for k, v in inv.items() if k not in ("id", "type", "time", "client", "op")}
        if done is not None:
            fields.update({k: v for k, v in done.items() if k not in ("id", "type", "time", "client", "op")})
        ops.append(
            Op(
                op_id,
                str(inv["client"]),
                str(inv["op"]),
                float(inv["time"]),
                float(done["time"]) if done is not None else None,
                str(done["type"]) if done is not None else "info",
                fields,
            )
        )
    ops.sort(key=lambda o: o.invoke)
    others.sort(key=lambda e: float(e["time"]))
    return ops, others


# -- the checker --------------------------------------------------------------------------------


class _Checker:
    def __init__(self, events: Iterable[Event], limits: Limits) -> None:
        self.limits = limits
        self.ops, self.others = pair(events)
        self.violations: list[Violation] = []
        self.nemesis = [e for e in self.others if e.get("type") == "nemesis"]
        self.entries = [e for e in self.others if e.get("type") == "entry"]
        self.leader_events = [e for e in self.others if e.get("type") == "leader"]
        self.acquires = [o for o in self.ops if o.op == "acquire"]
        self.grants = [o for o in self.acquires if o.outcome == "ok" and o.get("token") is not None]
        self.releases = [o for o in self.ops if o.op == "release"]
        self.dead_clients = {str(e["client"]) for e in self.nemesis if e["op"] in ("client_killed", "client_paused")}
        self.session_deaths: dict[str, float] = {}
        self.holds: list[Hold] = []
        self.liveness: list[Liveness] = []

    def flag(self, invariant: int, what: str, *ops: Op) -> None:
        self.violations.append(Violation(invariant, what, tuple(o.id for o in ops)))

    def run(self) -> Report:
        self._bugs()
        self._build_holds()
        self._mutual_exclusion()
        self._tokens()
        self._stale()
        self._liveness()
        self._lost_release()
        self._idempotence()
        self._leaks()
        self._quorum_loss()
        return Report(self.violations, self.ops, self.holds, self.liveness, self.nemesis)

    # -- 0 ---------------------------------------------------------------------------------

    def _bugs(self) -> None:
        for o in self.ops:
            if o.outcome != "ok" and o.code in ("INTERNAL", "UNKNOWN"):
                self.flag(0, f"{o.op} by {o.client} ended {o.code}: {o.get('message', '')}", o)

    # -- sessions and holds ----------------------------------------------------------------

    def _confirmations(self) -> dict[str, list[tuple[float, float]]]:
        """Per session: (completion time, expiry the client then knew), in completion order."""
        out: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for o in self.ops:
            if o.outcome == "ok" and o.get("session") and o.get("expiry") is not None and o.complete is not None:
                if o.op == "refresh" and o.get("expired"):
                    continue
                out[str(o["session"])].append((o.complete, float(o["expiry"])))
        for confs in out.values():
            confs.sort()
        return out

    def _stops(self) -> dict[str, list[float]]:
        """Per session: when its client stopped relying on it (close sent, or told it is gone)."""
        out: dict[str, list[float]] = defaultdict(list)
        for o in self.ops:
            session = o.get("session")
            if not session:
                continue
            if o.op == "close_session":
                out[str(session)].append(o.invoke)
            elif o.complete is not None and (
                (o.op == "refresh" and o.get("expired")) or o.reason in ("SESSION_NOT_FOUND", "SESSION_LOST")
            ):
                out[str(session)].append(o.complete)
                self._died(str(session), o.complete)
        for o in self.ops:
            if o.op == "close_session" and o.outcome == "ok" and o.complete is not None:
                self._died(str(o["session"]), o.complete)
        return out

    def _died(self, session: str, at: float) -> None:
        self.session_deaths[session] = min(at, self.session_deaths.get(session, INF))

    def _build_holds(self) -> None:
        confirmations = self._confirmations()
        stops = self._stops()
        release_sent: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in self.releases:
            release_sent[(str(r["lock"]), int(r["token"]))].append(r.invoke)
        merged: dict[tuple[str, int], Hold] = {}
        for g in self.grants:
            assert g.complete is not None
            lock, token, session = str(g["lock"]), int(g["token"]), str(g.get("session", ""))
            start = g.complete
            confs = confirmations.get(session, [])
            known = float(g.get("expiry") or 0.0)
            i = bisect.bisect_right(confs, (start, INF))
            for _, exp in confs[:i]:
                known = max(known, exp)
            for done, exp in confs[i:]:
                if done >= known:
                    break  # the client's knowledge lapsed before this confirmation came back
                known = max(known, exp)
            ends = [known]
            ends += [t for t in release_sent.get((lock, token), []) if t >= g.invoke]
            ends += [t for t in stops.get(session, []) if t >= g.invoke]
            hold = Hold(lock, token, g.client, session, str(g.get("request_id", "")), start, min(ends), g.id)
            prev = merged.get((lock, token))
            if prev is None:
                merged[(lock, token)] = hold
            elif prev.session != session:
                self.flag(
                    2,
                    f"token {token} of {lock!r} granted to two sessions ({prev.session} and {session})",
                    g,
                )
            else:
                # The same grant returned twice (a retry with the same request id): one hold.
                prev.start = min(prev.start, start)
                prev.end = max(prev.end, hold.end)
        self.holds = sorted(merged.values(), key=lambda h: (h.lock, h.start))

    # -- 1 ---------------------------------------------------------------------------------

    def _mutual_exclusion(self) -> None:
        by_lock: dict[str, list[Hold]] = defaultdict(list)
        for h in self.holds:
            if not h.empty:
                by_lock[h.lock].append(h)
        for lock, holds in by_lock.items():
            active: list[Hold] = []
            for h in holds:
                active = [a for a in active if a.end > h.start]
                for a in active:
                    self.violations.append(
                        Violation(
                            1,
                            f"{lock!r}: {a.client} (token {a.token}) held until {a.end:.3f} but {h.client} "
                            f"(token {h.token}) was granted at {h.start:.3f}",
                            (a.op_id, h.op_id),
                        )
                    )
                active.append(h)
        holds_by_token = {(h.lock, h.token): h for h in self.holds}
        for w in self.ops:
            if w.op != "write" or w.outcome != "fail":
                continue
            held = holds_by_token.get((str(w["lock"]), int(w["token"])))
            if held is not None and held.start <= w.invoke < held.end:
                self.flag(
                    1,
                    f"{w['lock']!r}: the resource refused token {w['token']} (it had seen {w.get('highest')}) "
                    f"while {w.client} still held the lock",
                    w,
                )

    # -- 2 ---------------------------------------------------------------------------------

    def _tokens(self) -> None:
        by_lock: dict[str, list[Hold]] = defaultdict(list)
        for h in self.holds:
            if not h.empty:
                by_lock[h.lock].append(h)
        for lock, holds in by_lock.items():
            for a, b in itertools.pairwise(holds):
                if b.token <= a.token:
                    self.violations.append(
                        Violation(
                            2,
                            f"{lock!r}: token {b.token} (granted at {b.start:.3f}) is not above token {a.token} "
                            f"(granted before it, at {a.start:.3f})",
                            (a.op_id, b.op_id),
                        )
                    )

    # -- 3 ---------------------------------------------------------------------------------

    def _stale(self) -> None:
        grants_by_lock: dict[str, list[Op]] = defaultdict(list)
        for g in self.grants:
            grants_by_lock[str(g["lock"])].append(g)
        for r in self.releases:
            if r.outcome != "ok" or not r.get("released"):
                continue
            lock, token = str(r["lock"]), int(r["token"])
            for g in grants_by_lock.get(lock, []):
                if int(g["token"]) > token and g.complete is not None and g.complete < r.invoke:
                    self.flag(
                        3,
                        f"{lock!r}: release of stale token {token} reported released after token {g['token']} "
                        "was granted",
                        r,
                        g,
                    )
                    break
        # A session whose grant vanished without its holder releasing it has lost its lease.
        released_or_closed: dict[tuple[str, int], float] = {}
        for r in self.releases:
            key = (str(r["lock"]), int(r["token"]))
            released_or_closed[key] = min(r.invoke, released_or_closed.get(key, INF))
        closes: dict[str, float] = {}
        for o in self.ops:
            if o.op == "close_session":
                closes[str(o["session"])] = min(o.invoke, closes.get(str(o["session"]), INF))
        for h in self.holds:
            lock_grants = grants_by_lock.get(h.lock, [])
            later = [
                g.complete
                for g in lock_grants
                if int(g["token"]) > h.token and g.complete is not None and str(g.get("session")) != h.session
            ]
            if not later:
                continue
            taken = min(later)
            if released_or_closed.get((h.lock, h.token), INF) < taken or closes.get(h.session, INF) < taken:
                continue
            self._died(h.session, taken)
        for o in self.ops:
            if o.op != "refresh" or o.outcome != "ok" or o.get("expired"):
                continue
            died = self.session_deaths.get(str(o["session"]))
            if died is not None and o.invoke > died:
                self.flag(3, f"session {o['session']} was refreshed after it ended (at {died:.3f})", o)

    # -- 4 ---------------------------------------------------------------------------------

    def _term_at(self, t: float) -> int:
        term = 0
        for e in self.leader_events:
            if float(e["time"]) > t:
                break
            term = max(term, int(e["term"]))
        return term

    def _liveness(self) -> None:
        for e in self.nemesis:
            if e["op"] not in ("client_killed", "client_paused") or e.get("lock") is None:
                continue
            lock, token, ttl, at = str(e["lock"]), int(e["token"]), float(e["ttl"]), float(e["time"])
            later = sorted(
                (g for g in self.grants if str(g["lock"]) == lock and int(g["token"]) > token and g.end >= at),
                key=lambda g: g.end,
            )
            if later:
                g = later[0]
                # The leader monitor polls: an election just before the grant may be seen only after it.
                changes = max(0, self._term_at(g.end + MONITOR_LAG) - self._term_at(at))
                allowed = ttl + self.limits.liveness_base + self.limits.per_leader_change * changes
                delay = g.end - at
                self.liveness.append(Liveness(lock, token, delay, changes, allowed))
                if delay > allowed:
                    self.flag(
                        4,
                        f"{lock!r}: granted {delay:.2f}s after its holder (token {token}) died; allowed "
                        f"{allowed:.2f}s (TTL {ttl:g}s, {changes} leader changes)",
                        g,
                    )
                continue
            allowed = (
                ttl
                + self.limits.liveness_base
                + self.limits.per_leader_change * max(0, self._term_at(INF) - self._term_at(at))
            )
            waiters = [
                a
                for a in self.acquires
                if str(a["lock"]) == lock
                and a.client != e.get("client")
                and a.invoke < at + allowed
                and a.end > at + allowed
            ]
            if waiters:
                self.flag(
                    4,
                    f"{lock!r}: never granted after its holder (token {token}) died although "
                    f"{len(waiters)} acquire(s) waited past {allowed:.1f}s",
                    *waiters,
                )

    # -- 5 ---------------------------------------------------------------------------------

    def _observations(self) -> list[tuple[Op, str, int, str]]:
        """(op, lock, token, session) for every report of a lock's holder."""
        seen: list[tuple[Op, str, int, str]] = []
        for o in self.ops:
            if o.get("holder_token") is None or o.get("lock") is None:
                continue
            if (o.op, o.outcome) in (("describe", "ok"), ("acquire", "fail")):
                seen.append((o, str(o["lock"]), int(o["holder_token"]), str(o.get("holder_session", ""))))
        return seen

    def _lost_release(self) -> None:
        gone: dict[tuple[str, int], Op] = {}
        for r in self.releases:
            if r.outcome == "ok" and r.complete is not None:
                key = (str(r["lock"]), int(r["token"]))
                if key not in gone or r.complete < (gone[key].complete or INF):
                    gone[key] = r
        for o, lock, token, _ in self._observations():
            rel = gone.get((lock, token))
            if rel is not None and rel.complete is not None and o.invoke > rel.complete:
                self.flag(5, f"{lock!r}: token {token} seen as holder after its release returned OK", rel, o)
        for g in self.grants:
            rel = gone.get((str(g["lock"]), int(g["token"])))
            if rel is not None and rel.complete is not None and g.invoke > rel.complete:
                self.flag(5, f"{g['lock']!r}: token {g['token']} granted again after its release returned OK", rel, g)
        for e in self.entries:
            rel = gone.get((str(e["lock"]), int(e["token"])))
            if rel is not None:
                self.flag(5, f"{e['lock']!r}: token {e['token']} still in etcd after its release returned OK", rel)

    # -- 6 ---------------------------------------------------------------------------------

    def _idempotence(self) -> None:
        tokens: dict[tuple[str, str], dict[int, Op]] = defaultdict(dict)
        for g in self.grants:
            rid = str(g.get("request_id", ""))
            if rid:
                tokens[(str(g["lock"]), rid)].setdefault(int(g["token"]), g)
        for (lock, rid), found in tokens.items():
            if len(found) > 1:
                self.flag(
                    6,
                    f"{lock!r}: request id {rid} yielded {len(found)} grants (tokens {sorted(found)})",
                    *found.values(),
                )
        for e in self.entries:
            found = tokens.get((str(e["lock"]), str(e["request_id"])), {})
            if found and int(e["token"]) not in found:
                self.flag(
                    6,
                    f"{e['lock']!r}: request id {e['request_id']} has an entry (token {e['token']}) besides its "
                    f"grant {sorted(found)}",
                    *found.values(),
                )

    # -- 7 ---------------------------------------------------------------------------------

    def _leaks(self) -> None:
        by_request: dict[tuple[str, str], list[Op]] = defaultdict(list)
        by_session_lock: dict[tuple[str, str], list[Op]] = defaultdict(list)
        for a in self.acquires:
            by_request[(str(a["lock"]), str(a.get("request_id", "")))].append(a)
            if a.get("session"):
                by_session_lock[(str(a["session"]), str(a["lock"]))].append(a)
        dead_sessions = {
            str(o["session"]) for o in self.ops if o.client in self.dead_clients and o.get("session") is not None
        }
        granted = {(str(g["lock"]), int(g["token"])) for g in self.grants}
        released = {(str(r["lock"]), int(r["token"])) for r in self.releases if r.outcome == "ok"}
        for e in self.entries:
            lock, token, session = str(e["lock"]), int(e["token"]), str(e["session"])
            if session in dead_sessions or (lock, token) in released:
                continue  # a dead client's entry lapses with its lease; a released one is invariant 5's
            attempts = by_request.get((lock, str(e["request_id"])), [])
            if (lock, token) in granted:
                self.flag(7, f"{lock!r}: token {token} is still held in etcd although its client finished")
            elif attempts and all(a.outcome == "fail" for a in attempts):
                self.flag(7, f"{lock!r}: a failed acquire left its entry (token {token}) in etcd", *attempts)
            else:
                self.flag(7, f"{lock!r}: a stray entry (token {token}, session {session}) is left in etcd", *attempts)
        for o, lock, token, session in self._observations():
            if (lock, token) in granted or not session:
                continue
            attempts = by_session_lock.get((session, lock), [])
            if not attempts or not self._phantom(o, attempts, self.limits.cleanup_grace):
                continue
            self.flag(
                7,
                f"{lock!r}: token {token} of session {session} was seen holding the lock after every acquire "
                "of that session on it had failed",
                o,
                *attempts,
            )

        # An Acquire refused because the session "already holds or waits for" the lock, where the
        # entry in the way belongs to a request that failed or was cancelled: a leaked entry.
        for a in self.acquires:
            if a.reason != "ALREADY_QUEUED" or not a.get("existing_request_id"):
                continue
            before = [
                b for b in by_request.get((str(a["lock"]), str(a["existing_request_id"])), []) if b.end < a.invoke
            ]
            given_up = max((b.end for b in before), default=INF)
            if (
                before
                and all(b.outcome == "fail" or b.code == "CANCELLED" for b in before)
                and given_up + self.limits.cleanup_grace < a.invoke
            ):
                self.flag(
                    7,
                    f"{a['lock']!r}: the entry of request {a['existing_request_id']}, which failed or was "
                    "cancelled, was still queued",
                    a,
                    *before,
                )

    @staticmethod
    def _phantom(seen: Op, attempts: list[Op], grace: float) -> bool:
        """Whether no acquire among `attempts` can explain a grant seen by `seen` (whose token no
        acquire returned): none was running then, and each request had failed or been cancelled
        more than `grace` before."""
        if any(a.invoke <= seen.end and a.end >= seen.invoke for a in attempts):
            return False
        requests: dict[str, list[Op]] = defaultdict(list)
        for a in attempts:
            requests[str(a.get("request_id", ""))].append(a)
        for tries in requests.values():
            if any(a.outcome == "ok" for a in tries):
                continue  # its grant has a known token, which is not the one seen
            failed = [
                a for a in tries if (a.outcome == "fail" or a.code == "CANCELLED") and a.end + grace < seen.invoke
            ]
            # A request not yet definitely failed may have left its entry on purpose: a retry
            # with its request id resumes that place in the queue.
            if not failed or any(a.invoke > max(f.end for f in failed) for a in tries):
                return False
        return True

    # -- 8 ---------------------------------------------------------------------------------

    def _quorum_loss(self) -> None:
        starts = [e for e in self.nemesis if e["op"] == "quorum_lost"]
        ends = [e for e in self.nemesis if e["op"] == "quorum_restored"]
        for lost in starts:
            t0 = float(lost["time"])
            back = next((float(e["time"]) for e in ends if float(e["time"]) >= t0), INF)
            inside = [o for o in self.ops if o.op in RPCS and t0 < o.invoke and o.end < back]
            for o in inside:
                if o.code == "CANCELLED":
                    continue  # the caller gave up first: no answer was due
                if o.outcome == "ok":
                    self.flag(8, f"{o.op} by {o.client} was acknowledged during quorum loss", o)
                elif o.code != "UNAVAILABLE" and (o.code, o.reason) != ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"):
                    # UNAVAILABLE, or the broker's own answer that the caller's deadline came first
                    # (with its ErrorInfo); a DEADLINE_EXCEEDED without details is the client's
                    # timer: the broker never answered.
                    self.flag(
                        8, f"{o.op} by {o.client} ended {o.code} {o.reason or '(no details)'} during quorum loss", o
                    )
                deadline = o.get("deadline")
                if deadline is not None and o.complete is not None:
                    late = o.complete - o.invoke - float(deadline)
                    if late > self.limits.deadline_slack:
                        self.flag(8, f"{o.op} by {o.client} answered {late:.2f}s after its deadline", o)
            if back == INF:
                self.flag(8, "quorum was never restored in this history")
                continue
            resumed = [o for o in self.ops if o.op in MUTATING and o.outcome == "ok" and o.invoke >= back]
            first = min((o.end for o in resumed), default=INF)
            if first > back + self.limits.resume_within:
                self.flag(8, f"no mutating call succeeded within {self.limits.resume_within:g}s after the heal")


def check(events: Iterable[Event], limits: Limits | None = None) -> Report:
    return _Checker(events, limits or Limits()).run()


__all__ = ["Hold", "Limits", "Liveness", "Op", "Report", "Violation", "check", "pair"]
