"""The propagation model: parsing with errors naming the field, matching, and seeded draws."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from controlplane.errors import ConfigError
from controlplane.topology.parse import parse_topology_text
from controlplane.topology.propagation import Distribution, PropagationConfig, parse_propagation
from controlplane.xds.delay import DelayModel


def test_no_section_means_no_delay() -> None:
    config = parse_propagation(None)
    assert config == PropagationConfig()
    assert DelayModel(config).delay("any", "svc", "z") == 0.0


def test_the_first_matching_rule_wins_by_node_cluster_or_zone() -> None:
    config = parse_propagation(
        {
            "seed": 1,
            "delays": [
                {"node": "front-*", "fixed": "50ms"},
                {"zone": "eu-*", "cluster": "batch", "fixed": 0.2},
                {"zone": "eu-*", "fixed": "1s"},
            ],
        }
    )
    model = DelayModel(config)
    assert model.delay("front-1", "batch", "eu-1") == 0.05
    assert model.delay("back-1", "batch", "eu-1") == 0.2
    assert model.delay("back-1", "web", "eu-1") == 1.0
    assert model.delay("back-1", "web", "us-1") == 0.0


def test_draws_are_seeded_and_stay_in_range() -> None:
    config = parse_propagation({"seed": 7, "delays": [{"uniform": ["0ms", "200ms"]}]})
    first = [DelayModel(config).delay(f"n{i}") for i in range(1)]
    model = DelayModel(config)
    draws = [model.delay(f"n{i}") for i in range(2000)]
    assert draws[:1] == first
    assert all(0 <= d <= 0.2 for d in draws)
    assert 0.08 < statistics.fmean(draws) < 0.12  # 2000 draws: the mean's sd is 1.3 ms


def test_normal_is_raised_to_its_floor() -> None:
    dist = parse_propagation({"delays": [{"normal": {"mean": "10ms", "stddev": "50ms", "floor": "5ms"}}]}).delays[0]
    rng = random.Random(3)
    draws = [dist.distribution.sample(rng) for _ in range(500)]
    assert min(draws) == 0.005 and max(draws) > 0.05


def test_a_trace_is_read_relative_to_the_topology_file(tmp_path: Path) -> None:
    (tmp_path / "wan.txt").write_text("# recorded\n12ms\n0.5s\n30\n\n", encoding="utf-8")
    topo = tmp_path / "topology.yaml"
    topo.write_text("controlplane:\n  propagation:\n    delays: [{trace: wan.txt}]\n", encoding="utf-8")
    config = parse_topology_text(topo.read_text(), source=str(topo)).controlplane.propagation
    dist = config.delays[0].distribution
    assert dist.samples == (0.012, 0.5, 0.03)
    assert DelayModel(config).delay("x") in dist.samples


@pytest.mark.parametrize(
    ("section", "path", "message"),
    [
        ({"delays": [{"fixed": "5ms", "uniform": ["0ms", "1ms"]}]}, "delays[0]", "exactly one"),
        ({"delays": [{"node": "a"}]}, "delays[0]", "exactly one"),
        ({"delays": [{"uniform": ["2ms", "1ms"]}]}, "delays[0].uniform", "must not exceed"),
        ({"delays": [{"uniform": ["0ms"]}]}, "delays[0].uniform", "[low, high]"),
        ({"delays": [{"fixed": "soon"}]}, "delays[0].fixed", "not a duration"),
        ({"delays": [{"fixed": -1}]}, "delays[0].fixed", "0..3600s"),
        ({"delays": [{"normal": {"mean": "1ms"}}]}, "delays[0].normal.stddev", "required"),
        ({"delays": [{"zone": "", "fixed": 1}]}, "delays[0].zone", "glob"),
        ({"delays": [{"trace": "/nonexistent/trace.txt"}]}, "delays[0].trace", "cannot read"),
        ({"history": 0}, "history", "1..10000"),
        ({"seed": "x"}, "seed", "integer"),
        ({"delay": []}, "delay", "unknown field"),
    ],
)
def test_errors_name_the_field(section: object, path: str, message: str) -> None:
    text = "controlplane:\n  propagation: " + repr(section).replace("'", '"') + "\n"
    with pytest.raises(ConfigError) as info:
        parse_topology_text(text, source="t.yaml")
    assert info.value.path == f"controlplane.propagation.{path}"
    assert message in info.value.message
    assert str(info.value).startswith("t.yaml: controlplane.propagation.")


def test_distribution_means() -> None:
    assert Distribution("uniform", low=0.0, high=0.2).mean == pytest.approx(0.1)
    assert Distribution("trace", samples=(0.1, 0.3)).mean == pytest.approx(0.2)


def test_uniform_model_maximum_matches_theory() -> None:
    # The expected maximum of N uniform(0, 200 ms) draws is 200*N/(N+1) ms; seeded, so deterministic.
    model = DelayModel(parse_propagation({"seed": 11, "delays": [{"uniform": ["0ms", "200ms"]}]}))
    for n in (10, 100):
        maxima = [max(model.delay(f"n{i}") for i in range(n)) for _ in range(2000)]
        assert statistics.fmean(maxima) * 1000 == pytest.approx(200 * n / (n + 1), abs=2.0)


def test_the_server_hook_follows_config_edits() -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from controlplane.snapshots import resources as rs
    from controlplane.xds.delay import ModelledDelay
    from controlplane.xds.stream import StreamState

    stream = StreamState(1)
    request = discovery_pb2.DiscoveryRequest(type_url=rs.CLUSTER, node=base_pb2.Node(id="edge-1", cluster="edge"))
    request.node.locality.zone = "eu-1"
    stream.on_request(request)
    current = [parse_propagation({"delays": [{"zone": "eu-*", "fixed": "40ms"}]})]
    hook = ModelledDelay(lambda: current[0])
    assert hook(stream) == 0.04
    current[0] = parse_propagation({"delays": [{"cluster": "edge", "fixed": "7ms"}]})
    assert hook(stream) == 0.007
    current[0] = parse_propagation(None)
    assert hook(stream) == 0.0
