"""summary.md's last section: the runs that failed, and the errors of those that did not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.report import Results

# A collapsed run can fail each of its thousands of sessions with a message of its own: the
# summary shows the commonest, results.jsonl keeps them all.
MAX_ERROR_KINDS = 12


def failures(res: Results, records: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    errs = [r for r in records if r.get("ok") and r.get("errors")]
    if res.failed or errs:
        out += ["## Failed runs and errors", ""]
        for r in res.failed:
            out.append(f"- {r['workload']} {r['param']} {r['target']} run {r['run']}: {r.get('error')}")
        for r in errs:
            out.append(f"- {r['workload']} {r['param']} {r['target']} run {r['run']}: {top_errors(r['errors'])}")
        out.append("")
    return out


def top_errors(errors: dict[str, int]) -> str:
    """The MAX_ERROR_KINDS commonest kinds with their counts, and how many more there were."""
    ranked = sorted(errors.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{kind!r}: {n:,}" for kind, n in ranked[:MAX_ERROR_KINDS])
    rest = ranked[MAX_ERROR_KINDS:]
    if rest:
        shown += f", and {len(rest):,} other kinds ({sum(n for _, n in rest):,} errors; all in results.jsonl)"
    return "{" + shown + "}"
