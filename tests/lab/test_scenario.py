"""`healthplane lab scenario` and `lab compare`: the load generator, the judging, real runs.

The real runs use 250 ms checks so each lab is up, failed, recovered and down in seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.main import main
from lab.compare import Comparison, format_table, run_compare
from lab.demoapp import DemoApp
from lab.run import Lab, netns_unavailable_reason
from lab.scenario import ScenarioResult, Step, TimelineEntry, Traffic, format_result, run_scenario
from lab.topology import BACKENDS, HealthCheckSpec, LabConfig, Mode

FAST = HealthCheckSpec(interval=0.25, timeout=0.15)
FAST_ARGS = ["--ports-base", "0", "--interval", "250ms", "--timeout", "150ms"]
NETNS_SKIP = netns_unavailable_reason()


# ----------------------------------------------------------------------------- traffic


async def test_traffic_keeps_its_rate_and_names_who_answered() -> None:
    async with DemoApp("solo") as app:
        traffic = Traffic(app.url + "/", rate=200)
        async with traffic:
            began = time.time()
            while len(traffic.samples) < 60:
                assert time.time() - began < 10, "traffic too slow"
                await _tick()
            first = traffic.last_seen("solo")
        await traffic.aclose()  # idempotent
        assert traffic.started is not None and traffic.stopped is not None
        elapsed = traffic.stopped - traffic.started
        # Open loop: as many requests as the rate says, whatever their latency.
        assert abs(len(traffic.samples) - 200 * elapsed) <= 0.25 * 200 * elapsed + 5
        assert all(s.ok and s.server == "solo" for s in traffic.samples)
        assert app.served == len(traffic.samples)
        assert first is not None and first <= (traffic.last_seen("solo") or 0)
        middle = traffic.samples[len(traffic.samples) // 2].sent
        later = traffic.answered_by("solo", since=middle)
        assert later and all(s.sent >= middle for s in later)
        assert later == sorted(later, key=lambda s: s.sent)


async def test_traffic_counts_requests_that_get_no_answer() -> None:
    app = DemoApp("gone")
    await app.start()
    url = app.url
    await app.stop()
    async with Traffic(url + "/", rate=100, timeout=0.5) as traffic:
        while len(traffic.samples) < 5:
            await _tick()
    assert all(not s.ok and s.status == 0 and s.error for s in traffic.samples)
    assert traffic.last_seen("gone") is None


async def _tick() -> None:
    await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- judging and output


def _result(mode: Mode, fronts: int, detection: float, checks: float, *, ok: bool = True) -> ScenarioResult:
    t0 = 1_000.0
    return ScenarioResult(
        mode=mode, front_proxies=fronts, netns=False, health_check=HealthCheckSpec(), rate=200.0,
        victim="webserver01", slack=1.0, failed_at=t0, recovered_at=t0 + 4, traffic_started=t0 - 2,
        traffic_stopped=t0 + 8, requests=2000, failed=0,
        answered_by={"webserver01": 500, "webserver02": 750, "webserver03": 750},
        health_checks_per_second=dict.fromkeys(BACKENDS, checks),
        last_to_victim=t0 + detection, first_after_recovery=t0 + 5.5,
        front_exclusion={f"front-{i}": t0 + detection + 0.01 * i for i in range(fronts)},
        front_readmission={f"front-{i}": t0 + 5.5 + 0.1 * i for i in range(fronts)},
        timeline=[TimelineEntry(t0, "webserver01 /livez -> FAIL"), TimelineEntry(t0 - 2, "traffic starts")],
        steps=[Step("no failed requests", True), Step("stopped receiving requests", ok)],
    )  # fmt: skip


def test_result_measures_and_prints_relative_to_the_failure() -> None:
    result = _result(Mode.CENTRAL, 3, detection=1.5, checks=1.0)
    assert (result.detection, result.recovery) == (1.5, 1.5)
    assert result.exclusion_spread == pytest.approx(0.02)
    assert result.readmission_spread == pytest.approx(0.2)
    assert _result(Mode.CENTRAL, 1, detection=1.5, checks=1.0).exclusion_spread is None
    assert result.ok
    text = format_result(result)
    assert "   +0.000  webserver01 /livez -> FAIL" in text
    assert "   -2.000  traffic starts" in text
    assert "[ok] no failed requests" in text
    assert text.endswith("every step held")
    failed = _result(Mode.CENTRAL, 1, detection=5.0, checks=1.0, ok=False)
    assert not failed.ok and "[FAILED] stopped receiving requests" in format_result(failed)
    doc = json.loads(json.dumps(result.to_json()))
    assert (doc["mode"], doc["ok"], doc["detection"]) == ("central", True, 1.5)


def test_table_puts_the_modes_side_by_side() -> None:
    comparisons = [
        Comparison(1, Mode.CENTRAL, (_result(Mode.CENTRAL, 1, 1.2, 1.0), _result(Mode.CENTRAL, 1, 1.8, 1.0))),
        Comparison(1, Mode.PER_ENVOY, (_result(Mode.PER_ENVOY, 1, 1.4, 1.0),)),
        Comparison(10, Mode.CENTRAL, (_result(Mode.CENTRAL, 10, 1.5, 1.0),)),
        Comparison(10, Mode.PER_ENVOY, (_result(Mode.PER_ENVOY, 10, 1.9, 10.0, ok=False),)),
    ]
    table = format_table(comparisons).splitlines()
    assert table[0] == (
        "| front proxies | per scenario run (median (min to max) of 2 runs) "
        "| central prober | per-Envoy health checks |"
    )
    assert "| 1 | failure → last request to the failed backend | 1.50 s (1.20 to 1.80) | 1.40 s |" in table
    assert "| 10 | /livez checks per backend per second | 1.0 | 10.0 |" in table
    assert "| 10 | /livez checks per second, all 3 backends | 3.0 | 30.0 |" in table
    assert "| 10 | every step held | yes | **no** |" in table


# ----------------------------------------------------------------------------- real runs


def _check(doc: dict[str, Any], *, mode: str, fronts: int, checks_per_second: float) -> None:
    assert doc["ok"], "\n".join(f"{s['held']}: {s['description']}" for s in doc["steps"])
    assert (doc["mode"], doc["front_proxies"], doc["failed"]) == (mode, fronts, 0)
    hc = doc["health_check"]
    bound = hc["unhealthy_threshold"] * hc["interval"] + hc["timeout"] + doc["slack"]
    assert 0 < doc["detection"] <= bound
    # A failing /livez is noticed only by checks: no front proxy drops the backend before the
    # threshold's worth of them. (Judged on the proxies' own view: on a loaded machine the last
    # request that happened to reach the backend can come earlier than its exclusion.)
    assert doc["front_exclusion"], "no front proxy was seen to drop the failed backend"
    first_exclusion = min(doc["front_exclusion"].values()) - doc["failed_at"]
    assert first_exclusion >= (hc["unhealthy_threshold"] - 1) * hc["interval"] - 0.05
    assert set(doc["answered_by"]) == set(BACKENDS) and all(doc["answered_by"].values())
    for name, value in doc["health_checks_per_second"].items():
        assert checks_per_second * 0.6 <= value <= checks_per_second * 1.4, (name, value)


@pytest.mark.envoy
def test_scenario_command_with_the_central_prober(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    assert main(["lab", "scenario", *FAST_ARGS, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    [doc] = json.loads(out.read_text())
    _check(doc, mode="central", fronts=1, checks_per_second=4.0)
    lines = [e["text"] for e in doc["timeline"]]
    assert any(t.startswith("prober: web ") and t.endswith("-> UNHEALTHY (http 506); EDS version " + t.split()[-1])
               for t in lines), lines  # fmt: skip
    acked = [t for t in lines if " ACKed EDS " in t]
    # Two versions (out, back) ACKed by the front proxy and the three sidecars.
    assert len(acked) == 8, lines
    assert "last request answered by webserver01" in lines
    assert "first request answered by webserver01 again" in lines
    assert "every step held" in text and "timeline (seconds from the failure)" in text


@pytest.mark.envoy
async def test_probe_load_grows_with_the_fleet_only_for_per_envoy_checks() -> None:
    """Two front proxies: the central prober still checks each backend once per interval."""
    config = LabConfig(ports_base=0, health_check=FAST)
    comparisons = await run_compare(config, fleets=[2], rate=150, victim="webserver02", slack=1.0, repeat=1)
    central, per_envoy = comparisons
    assert (central.mode, per_envoy.mode) == (Mode.CENTRAL, Mode.PER_ENVOY)
    _check(central.results[0].to_json(), mode="central", fronts=2, checks_per_second=4.0)
    _check(per_envoy.results[0].to_json(), mode="per-envoy", fronts=2, checks_per_second=8.0)
    # Both front proxies carried traffic and both dropped the failed backend.
    for c in comparisons:
        assert len(c.results[0].front_exclusion) == len(c.results[0].front_readmission) == 2
    assert "| 2 | /livez checks per backend per second |" in format_table(comparisons)


@pytest.mark.envoy
@pytest.mark.skipif(NETNS_SKIP is not None, reason=f"--netns unavailable: {NETNS_SKIP}")
async def test_scenario_in_network_namespaces() -> None:
    n = os.getpid() % 100_000
    config = LabConfig(
        netns=True, ports_base=0, health_check=FAST, netns_prefix=f"s{n}",
        subnet=ipaddress.IPv4Network(f"10.200.{50 + (n + 100) % 200}.0/24"),
    )  # fmt: skip
    async with Lab(config) as lab:
        result = await run_scenario(lab, rate=150, slack=1.0)
    doc = result.to_json()
    _check(doc, mode="central", fronts=1, checks_per_second=4.0)
    assert doc["netns"] and dataclasses.asdict(result.health_check) == dataclasses.asdict(FAST)
