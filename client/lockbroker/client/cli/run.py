"""`lockbroker run`: hold a lock while a command runs (like flock, etcdctl lock, consul lock)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from lockbroker.client._lock import HeldLock, LockContext
from lockbroker.client.aio import Client
from lockbroker.client.cli._common import (
    DEFAULT_GRACE,
    EXIT_CANNOT_EXECUTE,
    EXIT_COMMAND_NOT_FOUND,
    EXIT_LOST,
    EXIT_NOT_ACQUIRED,
    EXIT_SIGNAL_BASE,
    EXIT_SOFTWARE,
    Output,
    _exit_code_arg,
    _positive,
    add_mode_arguments,
    default_owner,
    duration_arg,
    error_json,
    error_text,
    exit_code_of,
)
from lockbroker.client.cli._runner import Signals, add_command
from lockbroker.client.election import CampaignContext
from lockbroker.client.errors import LockBrokerError, LockLost, NotAcquired


def _interactive() -> bool:
    """Whether we are the terminal's foreground job: then Ctrl-C already reaches the child."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _exit_status(returncode: int) -> int:
    return EXIT_SIGNAL_BASE - returncode if returncode < 0 else returncode


class _Child:
    """The command run under the lock.

    Not interactive, it leads its own process group, so a signal (and above all the SIGKILL
    after a lost lock) reaches everything it started, not just the first process. At a
    terminal it stays in ours, so that it can still read the terminal and Ctrl-C reaches it
    directly (which is also why SIGINT is then not forwarded a second time).
    """

    def __init__(self, proc: asyncio.subprocess.Process, own_group: bool) -> None:
        self.proc = proc
        self.own_group = own_group

    def signal(self, signo: int, *, after_exit: bool = False) -> None:
        """Signal the child (its group, if it leads one). Once it has exited, only with
        `after_exit`: to kill what it left running in its group."""
        if self.proc.returncode is not None and not (after_exit and self.own_group):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.proc.pid, signo)
            else:
                self.proc.send_signal(signo)


async def _start_child(cmd: Sequence[str], env: dict[str, str], own_group: bool) -> _Child:
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, process_group=0 if own_group else None)
    return _Child(proc, own_group)


async def _supervise(child: _Child, held: HeldLock, grace: float) -> tuple[int, str | None]:
    """Wait for the child; if the lock is lost first, SIGTERM it, then SIGKILL after `grace`.

    Returns the child's exit status and, if the lock was lost, why.
    """
    exited = asyncio.ensure_future(child.proc.wait())
    lost = asyncio.ensure_future(held.lost.wait())
    try:
        while not exited.done():
            try:
                held.check()  # also marks the lock lost once its last confirmed expiry has passed
            except LockLost:
                break
            await asyncio.wait({exited, lost}, timeout=max(held.remaining, 0.05), return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            return _exit_status(exited.result()), None
        reason = held.lost_reason or "the session's last confirmed expiry has passed"
        print(
            f"lockbroker: lock {held.name} lost ({reason}): stopping the command (SIGTERM, SIGKILL after {grace:g}s)",
            file=sys.stderr,
            flush=True,
        )
        child.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), grace)
        # Also after a clean exit within the grace: nothing the command left behind in its
        # process group may go on working without the lock.
        child.signal(signal.SIGKILL, after_exit=True)
        return _exit_status(await exited), reason
    finally:
        lost.cancel()
        if not exited.done():
            exited.cancel()


class _Run:
    """One `lockbroker run`: acquire, start the command, watch it and the lock, release."""

    def __init__(
        self, client: Client, args: argparse.Namespace, out: Output, signals: Signals, *, campaign: bool = False
    ) -> None:
        """`campaign`: lead election args.name instead of holding lock args.name (`lockbroker elect`)."""
        self.args = args
        self.out = out
        self.signals = signals
        self.cmd: list[str] = args.cmd
        self.interactive = _interactive()
        self.summary: dict[str, Any] = {"name": args.name, "command": self.cmd, "child_started": False}
        owner = args.owner if args.owner is not None else default_owner(f" pid {os.getpid()}")
        self.ctx: LockContext | CampaignContext
        if campaign:
            value = (args.value if args.value is not None else owner).encode()
            self.ctx = client.election(args.name).campaign(value, ttl=args.ttl, wait=args.wait, owner=owner)
        else:
            self.ctx = client.lock(
                args.name, ttl=args.ttl, wait=args.wait, owner=owner, shared=args.shared, limit=args.permits or 0
            )
        self.acquiring: asyncio.Future[HeldLock] | None = None
        self.child: _Child | None = None

    def report(self, code: int) -> int:
        self.out.result({**self.summary, "exit_code": code}, None)
        return code

    def on_signal(self, signo: int) -> None:
        if self.child is not None:
            if not (signo == signal.SIGINT and self.interactive):
                self.child.signal(signo)
        elif self.acquiring is not None and not self.acquiring.done():
            self.acquiring.cancel()  # LockContext undoes whatever the broker queued or granted

    def failed(self, err: LockBrokerError, code: int) -> int:
        self.out.note(error_text(err, self.out.target))
        self.summary["error"] = error_json(err, code)
        return self.report(code)

    async def __call__(self) -> int:
        self.acquiring = asyncio.ensure_future(self.ctx.__aenter__())
        self.signals.handler = self.on_signal
        try:
            held = await self.acquiring
        except asyncio.CancelledError:
            if self.signals.first is None:
                raise
            return self.report(EXIT_SIGNAL_BASE + self.signals.first)
        except NotAcquired as e:
            return self.failed(e, self.args.conflict_exit_code)
        except LockBrokerError as e:
            return self.failed(e, exit_code_of(e))
        self.summary.update(fencing_token=held.fencing_token, session_id=held.session_id)
        code = EXIT_SOFTWARE
        try:
            code = await self.hold(held)
        except LockLost as e:
            self.out.note(str(e))
            self.summary["lost"] = held.lost_reason
            code = self.args.lost_exit_code
        finally:
            await _release(self.ctx, self.out)
            self.report(code)
        return code

    async def hold(self, held: HeldLock) -> int:
        held.check()
        if self.signals.first is not None:  # arrived while the lock was being granted
            return EXIT_SIGNAL_BASE + self.signals.first
        env = dict(os.environ)
        env.update(
            LOCKBROKER_FENCING_TOKEN=str(held.fencing_token),
            LOCKBROKER_LOCK_NAME=held.name,
            LOCKBROKER_SESSION_ID=held.session_id,
        )
        seen = len(self.signals.received)
        try:
            self.child = await _start_child(self.cmd, env, own_group=not self.interactive)
        except FileNotFoundError:
            self.out.note(f"{self.cmd[0]}: command not found")
            return EXIT_COMMAND_NOT_FOUND
        except OSError as e:
            self.out.note(f"{self.cmd[0]}: cannot execute: {e.strerror}")
            return EXIT_CANNOT_EXECUTE
        self.summary.update(child_started=True, pid=self.child.proc.pid)
        for signo in self.signals.received[seen:]:  # arrived while the child was being started
            self.on_signal(signo)
        status, lost_reason = await _supervise(self.child, held, self.args.grace)
        self.summary["child_exit_code"] = status
        if lost_reason is None:
            return status
        self.summary["lost"] = lost_reason
        return int(self.args.lost_exit_code)


async def cmd_run(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    return await _Run(client, args, out, signals)()


async def _release(ctx: LockContext | CampaignContext, out: Output) -> None:
    try:
        await ctx.__aexit__(None, None, None)
    except LockBrokerError as e:
        held = ctx.held if isinstance(ctx, LockContext) else ctx.leadership
        out.note(f"could not release {held.name if held else 'the lock'}: {e}; it lapses with its session")


def add_run_command(subparsers: Any, common: argparse.ArgumentParser) -> None:
    run = add_command(
        subparsers,
        "run",
        cmd_run,
        "run a command while holding a lock",
        common,
        stream=lambda: sys.stderr,
        usage="lockbroker run NAME [--ttl S] [--wait S] [--grace S] [options] -- CMD [ARGS...]",
        description="Hold NAME while CMD runs (like flock, etcdctl lock, consul lock). The command "
        "starts only once the lock is held, and gets LOCKBROKER_FENCING_TOKEN, LOCKBROKER_LOCK_NAME "
        "and LOCKBROKER_SESSION_ID. The session is kept alive meanwhile; if the lock is lost the "
        "command gets SIGTERM, then SIGKILL after --grace. SIGTERM, SIGINT and SIGHUP are forwarded "
        "to it; the lock is released when it exits. -o json writes its summary to stderr: stdout "
        "belongs to the command.",
    )
    run.add_argument("name")
    run.add_argument("cmd", nargs="*", metavar="CMD", help="the command and its arguments, after --")
    run.add_argument("--ttl", type=_positive, help="session TTL in whole seconds (default: broker's)")
    run.add_argument("--wait", type=duration_arg, default=0.0, help="queue up to this long (default 0: try once)")
    run.add_argument(
        "--grace", type=duration_arg, default=DEFAULT_GRACE, help="SIGTERM to SIGKILL delay on a lost lock"
    )
    run.add_argument("--owner", help="owner label (default user@host pid N)")
    add_mode_arguments(run)
    run.add_argument(
        "--conflict-exit-code",
        type=_exit_code_arg,
        default=EXIT_NOT_ACQUIRED,
        metavar="N",
        help="exit code when the lock is not acquired (default 1; like flock -E)",
    )
    run.add_argument(
        "--lost-exit-code",
        type=_exit_code_arg,
        default=EXIT_LOST,
        metavar="N",
        help="exit code when the lock is lost while the command runs (default 3)",
    )
