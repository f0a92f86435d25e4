"""`--event-loop`: which asyncio loop `lockbroker serve` runs on."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from lockbroker.server import config, loops
from lockbroker.server.cli import build_parser
from lockbroker.server.config import ConfigError


def test_auto_picks_uvloop_when_it_is_installed() -> None:
    assert importlib.util.find_spec("uvloop") is not None  # in the dev group; an extra for users
    assert config.load(build_parser().parse_args(["serve"]), {}).server.event_loop == "asyncio"  # the default
    assert loops.resolve("auto") == "uvloop"
    assert loops.resolve("asyncio") == "asyncio"
    assert loops.factory("asyncio") is None


def test_auto_falls_back_to_asyncio_and_a_named_uvloop_is_refused_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert loops.resolve("auto") == "asyncio"
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loops.resolve("uvloop")


def test_run_runs_on_the_chosen_loop() -> None:
    async def which() -> str:
        return loops.name(asyncio.get_running_loop())

    assert loops.run(which, "uvloop") == "uvloop"
    assert loops.run(which, "asyncio") == "asyncio"


def test_an_unknown_loop_is_a_usage_error() -> None:
    args = build_parser().parse_args(["serve", "--event-loop", "trio"])
    with pytest.raises(ConfigError, match="--event-loop"):
        config.load(args, {})
