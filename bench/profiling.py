"""Where the broker's CPU goes: py-spy's collapsed stacks summed by category.

Self time goes to the category of the innermost frame (where the CPU actually was); inclusive
time to every category on the stack, so "core" inclusive includes the etcd calls the core made.
With --native, grpc's Cython and C frames show up on their own; without it their time lands on
the Python frame that called into them (mostly asyncio's Handle._run).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Matched against the "function (path:line)" frames of py-spy's raw output, recorded with
# --full-filenames (without it py-spy shortens paths so far that opentelemetry's trace/__init__.py
# cannot be told from anything else). First match wins.
ENTRY = "(entry: cli, app, asyncio.run)"
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    (ENTRY, re.compile(r"(^|[ (/])server/(cli|app)\.py|asyncio/runners\.py|<module>")),
    ("tracing (opentelemetry)", re.compile(r"opentelemetry|interceptors/tracing\.py")),
    ("interceptors: audit", re.compile(r"interceptors/audit\.py")),
    ("interceptors: other", re.compile(r"(^|[ (/])interceptors/")),
    ("core (lock recipe)", re.compile(r"(^|[ (/])server/core/")),
    ("etcd client (ours)", re.compile(r"(^|[ (/])server/etcd/")),
    ("service edge (service, validation, convert)", re.compile(r"(^|[ (/])server/")),
    ("protobuf", re.compile(r"google/protobuf|_pb2|_message\.abi3|upb")),
    ("grpc", re.compile(r"grpc|cygrpc|\.pyx")),
    ("json", re.compile(r"json/")),
    ("logging", re.compile(r"logging/")),
    ("asyncio event loop", re.compile(r"asyncio/|selectors\.py|_asyncio")),
    ("libc / kernel calls", re.compile(r"libc\.so|libpthread")),
    ("CPython interpreter", re.compile(r"\.h:\d+|\.c:\d+|libpython")),
    ("stdlib (other)", re.compile(r"(^|[ (/])lib/python3\.\d+/|<frozen ")),
]
_PREFIX = re.compile(r"\((?:(?:site-packages|lib/python3\.\d+)/|(?:server|client|interceptors|proto)/(?=lockbroker/))")
# Where this machine keeps things, cut from recorded frames so result files name no local paths:
# the repository, any Python install or venv (down to site-packages or the stdlib folder), and
# the CPython build tree of native frames.
_LOCAL = [
    (re.compile(r"\((?:[^()]*/)?(site-packages|lib/python3\.\d+)/"), r"(\1/"),
    (re.compile(r"\(" + re.escape(str(REPO)) + "/"), "("),
    (re.compile(r"\([^()]*?/Python-3[^/()]*/(?:\./)?"), "(cpython/"),
    (re.compile(r"\((?:[^()]*/)?(lib[^/()]*\.so[^/()]*)\)"), r"(\1)"),
]

OURS = {name for name, _ in CATEGORIES[1:7]}
OTHER = "other"


def scrub(text: str) -> str:
    """Recorded stacks with this machine's paths cut (see _LOCAL); categories still apply."""
    for pattern, repl in _LOCAL:
        text = pattern.sub(repl, text)
    return text


def category(frame: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(frame):
            return name
    return OTHER


def short(frame: str) -> str:
    """The frame with its path cut to the package: (.../site-packages/grpc/aio/_call.py:1) -> (grpc/aio/_call.py:1)."""
    return _PREFIX.sub("(", frame)


def _function(frame: str) -> str:
    """ "LockCore.acquire (server/core/locks.py:180)" -> "LockCore.acquire (server/core/locks.py)" """
    name, _, where = short(frame).rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in scrub(path.read_text(errors="replace")).splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    stacks = parse(path)
    total = sum(n for _, n in stacks)
    self_by: Counter[str] = Counter()
    incl_by: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        self_by[category(frames[-1])] += n
        leaf[short(frames[-1])] += n
        for cat in {category(f) for f in frames}:
            incl_by[cat] += n
        for f in {_function(f) for f in frames if category(f) in OURS}:
            ours[f] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in c.most_common()] if total else []

    return {
        "samples": total,
        "self": pct(self_by),
        "inclusive": pct(incl_by),
        "top_self": pct(Counter(dict(leaf.most_common(top)))),
        "top_ours_inclusive": pct(Counter(dict(ours.most_common(top)))),
    }


def markdown(summary: dict[str, Any], title: str) -> str:
    lines = [f"### {title}", "", f"{summary['samples']:,} samples.", ""]
    lines += ["| category | self % | inclusive % |", "|---|---:|---:|"]
    incl = dict(summary["inclusive"])
    for name, share in summary["self"]:
        if name not in (ENTRY, OTHER):
            lines.append(f"| {name} | {share:.1f} | {incl.get(name, 0.0):.1f} |")
    lines.append(f"| {OTHER} | {dict(summary['self']).get(OTHER, 0.0):.1f} | |")
    lines += ["", "Hottest frames (self %):", "", "| frame | % |", "|---|---:|"]
    lines += [f"| `{f}` | {s:.1f} |" for f, s in summary["top_self"]]
    lines += ["", "lockbroker functions on the stack (inclusive %):", "", "| function | % |", "|---|---:|"]
    lines += [f"| `{f}` | {s:.1f} |" for f, s in summary["top_ours_inclusive"]]
    return "\n".join(lines) + "\n"
