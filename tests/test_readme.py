"""The grpcurl examples in README.md, run as written against a test broker.

The fenced block below the marker `<!-- test: grpcurl -->` is read line by line, the way a reader
pastes it into a shell:

- `grpcurl ...` (with a `<<EOF` here-document if it has one) runs through bash with the venv's
  grpcurl binary, after the README's address 127.0.0.1:50051 is replaced by the test broker's.
  Shell variables set so far (`$SESSION`, `$TOKEN`) are in its environment, so bash expands them
  exactly as it would for the reader.
- `# {...}` after a command is the shape of its answer: the same keys (`...` as a key: more keys
  may follow; `"..."` as a value: any value) and the same values, except the example's ids, which
  stand for the reader's own.
- `# ERROR: Code: X ... fragment ...`: the command fails with that status (grpcurl exits 64 + the
  code) and prints each fragment (spaces ignored).
- `NAME=VALUE  # ...` sets NAME from the answer above: VALUE is an example value in that answer's
  `# {...}` line, and NAME takes the real answer's value at the same place.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from lockbroker.server.app import Broker
from tests.etcdutil import EtcdProbe
from tests.procutil import REPO, clean_env, stop_process
from tests.test_grpcurl import grpcurl_binary

MARKER = "<!-- test: grpcurl -->"
README_ADDRESS = "127.0.0.1:50051"
ANY = "..."
SERVICE = "lockbroker.v1.LockService"
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S+)(?:\s+#.*)?$")
HEREDOC = re.compile(r"<<-?\s*'?\"?([A-Za-z_]+)'?\"?\s*$")


@dataclass
class Step:
    """One line of the block, with the here-document that belongs to a command."""

    kind: str  # "command", "answer", "error", "assign"
    text: str
    heredoc: list[str] = field(default_factory=list)  # its body and, last, its end word


def readme_block() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines.count(MARKER) == 1, f"README.md must have exactly one {MARKER!r} marker"
    at = lines.index(MARKER) + 1
    assert lines[at].startswith("```"), f"{MARKER} must stand right above a fenced block, found {lines[at]!r}"
    end = lines.index("```", at + 1)
    return lines[at + 1 : end]


def parse_steps(lines: list[str]) -> list[Step]:
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if not line.strip():
            continue
        if line.startswith("# ERROR:"):
            steps.append(Step("error", line.removeprefix("# ERROR:").strip()))
        elif line.startswith("# {"):
            steps.append(Step("answer", line.removeprefix("#").strip()))
        elif line.startswith("#"):
            continue
        elif ASSIGNMENT.match(line):
            steps.append(Step("assign", line))
        else:
            assert line.startswith("grpcurl "), f"the block may hold only grpcurl commands, found {line!r}"
            while line.endswith("\\"):
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            step = Step("command", line)
            if m := HEREDOC.search(line):
                end = lines.index(m.group(1), i)
                step.heredoc = lines[i : end + 1]
                i = end + 1
            steps.append(step)
    return steps


def parse_shape(text: str) -> Any:
    """`{"a": 1, ...}` → {"a": 1, "...": "..."}: the README's shorthand made into JSON."""
    return json.loads(re.sub(r"(?<=[{,])\s*\.\.\.\s*(?=[}\]])", ' "...": "..."', text))


def paths_of(value: Any, wanted: str, at: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in paths_of(v, wanted, (*at, k))]
    return [at] if value == wanted else []


def get_path(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        assert isinstance(doc, dict) and key in doc, f"answer has no {'.'.join(path)}: {doc}"
        doc = doc[key]
    return doc


def match_shape(expected: Any, actual: Any, examples: dict[str, str], where: str = "answer") -> None:
    """`examples` maps an example value in the README to the value it stands for in this run."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        keys = set(expected) - {ANY}
        missing = keys - set(actual)
        assert not missing, f"{where}: missing {sorted(missing)} in {actual}"
        if ANY not in expected:
            assert set(actual) == keys, f"{where}: unexpected keys {sorted(set(actual) - keys)} in {actual}"
        for key in keys:
            match_shape(expected[key], actual[key], examples, f"{where}.{key}")
    elif expected == ANY:
        return
    elif isinstance(expected, str) and expected in examples:
        stands_for = examples[expected]
        if stands_for == ANY:  # captured from this very answer by the next line
            assert isinstance(actual, str) and actual, f"{where}: expected a value, got {actual!r}"
        else:
            assert actual == stands_for, f"{where}: expected {stands_for!r} (README {expected!r}), got {actual!r}"
    else:
        assert actual == expected, f"{where}: expected {expected!r}, got {actual!r}"


async def run_command(step: Step, target: str, variables: dict[str, str]) -> tuple[int, str]:
    binary = grpcurl_binary()
    words = shlex.split(step.text)
    assert words[0] == "grpcurl"
    script = shlex.quote(binary) + step.text.removeprefix("grpcurl").replace(README_ADDRESS, target)
    if step.heredoc:
        script += "\n" + "\n".join(step.heredoc)
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        env=clean_env(**variables),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await stop_process(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_readme_grpcurl_block_runs_as_written(broker: Broker, probe: EtcdProbe) -> None:
    steps = parse_steps(readme_block())
    target = f"127.0.0.1:{broker.port}"
    variables: dict[str, str] = {}
    examples: dict[str, str] = {}  # README example value -> the value it stands for in this run
    pending: tuple[Step, int, str] | None = None  # a command whose outcome no line has checked yet
    answer: tuple[Any, Any] | None = None  # (README shape, real answer) of the last checked answer
    methods: list[str] = []
    checked = 0

    for n, step in enumerate(steps):
        if step.kind == "command":
            if pending is not None:
                _check_exit(*pending)
            rc, out = await run_command(step, target, variables)
            pending, answer = (step, rc, out), None
            methods += [w.rsplit("/", 1)[1] for w in shlex.split(step.text) if w.startswith(f"{SERVICE}/")]
        elif step.kind == "answer":
            assert pending is not None, f"{step.text} follows no command"
            cmd, rc, out = pending
            _check_exit(cmd, rc, out)
            shape, real = parse_shape(step.text), json.loads(out)
            # An example value that the next lines capture stands for whatever this run answers.
            captured = {example: ANY for _, example in _assignments_after(steps, n)}
            match_shape(shape, real, {**examples, **captured})
            pending, answer, checked = None, (shape, real), checked + 1
        elif step.kind == "error":
            assert pending is not None, f"ERROR: {step.text} follows no command"
            cmd, rc, out = pending
            code = re.match(r"Code: (\w+)", step.text)
            assert code is not None, f"an ERROR line starts with 'Code: <name>': {step.text}"
            status = next(s for s in grpc.StatusCode if s.name.replace("_", "").lower() == code.group(1).lower())
            assert rc == 64 + status.value[0], f"{cmd.text}: expected exit {64 + status.value[0]}, got {rc}:\n{out}"
            flat = re.sub(r"\s+", "", out)
            for fragment in (f.strip() for f in step.text.split(ANY)):
                assert re.sub(r"\s+", "", fragment) in flat, f"{fragment!r} not in the output of {cmd.text}:\n{out}"
            pending, checked = None, checked + 1
        else:
            name, example = _assignment(step)
            assert answer is not None, f"{step.text}: an assignment must follow an answer's # {{...}} line"
            shape, real = answer
            paths = paths_of(shape, example)
            assert len(paths) == 1, f"{step.text}: {example!r} must appear once in the answer above"
            variables[name] = str(get_path(real, paths[0]))
            examples[example] = variables[name]
    if pending is not None:
        _check_exit(*pending)

    assert {"CreateSession", "Acquire", "Describe", "Release", "CloseSession"} <= set(methods), methods
    assert set(variables) == {"SESSION", "TOKEN", "LEADER"}
    assert checked >= 6, f"only {checked} answers were checked"
    # The walk-through cleans up after itself: no lock, queue entry or session is left in etcd.
    assert await probe.keys() == []


def _assignment(step: Step) -> tuple[str, str]:
    """NAME=VALUE → (NAME, the README's example VALUE)."""
    m = ASSIGNMENT.match(step.text)
    assert m is not None, step.text
    return m.group(1), m.group(2)


def _assignments_after(steps: list[Step], n: int) -> list[tuple[str, str]]:
    found = []
    for step in steps[n + 1 :]:
        if step.kind != "assign":
            break
        found.append(_assignment(step))
    return found


def _check_exit(step: Step, rc: int, out: str) -> None:
    assert rc == 0, f"{step.text} exited {rc}:\n{out}"


PYTHON_MARKER = "<!-- test: python -->"


def readme_python_block() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines.count(PYTHON_MARKER) == 1, f"README.md must have exactly one {PYTHON_MARKER!r} marker"
    at = lines.index(PYTHON_MARKER) + 1
    assert lines[at] == "```python", f"{PYTHON_MARKER} must stand right above a python block, found {lines[at]!r}"
    end = lines.index("```", at + 1)
    return "\n".join(lines[at + 1 : end]) + "\n"


async def test_readme_python_snippet_runs_as_a_script(broker: Broker, probe: EtcdProbe, tmp_path: Path) -> None:
    """The README's Python block, saved as a file and run with `python lock.py` as the reader would."""
    code = readme_python_block()
    assert README_ADDRESS in code and "asyncio.run(main())" in code
    script = tmp_path / "lock.py"
    script.write_text(code.replace(README_ADDRESS, f"127.0.0.1:{broker.port}"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env=clean_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await stop_process(proc)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {out.decode()}\nstderr: {err.decode()}"
    match = re.fullmatch(r"order 42 written with fencing token (\d+)\n", out.decode())
    assert match, out.decode()
    assert 0 < int(match.group(1)) <= await probe.revision()
    assert await probe.keys() == []  # the lock was released and its session closed on the way out
