"""Rendezvous ownership of endpoints among several probers (pure)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from controlplane.probers.ownership import Members, Ownership, choose_members, endpoint_key, owners
from controlplane.topology.model import Cluster, Endpoint, Topology

KEYS = [endpoint_key("web", f"10.0.{i // 250}.{i % 250}:8080") for i in range(3000)]
MEMBERS = ["p1", "p2", "p3", "p4"]
# Known answers: a change of hash would move every endpoint of a running fleet at an upgrade,
# and replicas of two versions would disagree on the owners.
PINNED = ["p2", "p2", "p2", "p1", "p2", "p2", "p3", "p2", "p1", "p2"]


def test_known_answers_and_the_same_owners_in_another_process() -> None:
    keys = [f"web/127.0.0.1:{p}" for p in range(8000, 8010)]
    assert [owners(k, ["p1", "p2", "p3"], 1)[0] for k in keys] == PINNED
    # Python's hash() is salted per process; the owners must not be.
    code = (
        "from controlplane.probers.ownership import owners, endpoint_key\n"
        f"print([owners(k, {MEMBERS!r}, 2) for k in {KEYS[:200]!r}])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str([owners(k, MEMBERS, 2) for k in KEYS[:200]])


def test_the_member_order_does_not_matter() -> None:
    assert [owners(k, MEMBERS, 2) for k in KEYS[:300]] == [owners(k, MEMBERS[::-1], 2) for k in KEYS[:300]]


def test_shares_are_balanced() -> None:
    counts = Counter(owners(k, MEMBERS, 1)[0] for k in KEYS)
    assert set(counts) == set(MEMBERS)
    assert all(600 <= c <= 900 for c in counts.values()), counts


def test_a_member_leaving_moves_only_its_share() -> None:
    before = {k: owners(k, MEMBERS, 1)[0] for k in KEYS}
    after = {k: owners(k, ["p1", "p2", "p4"], 1)[0] for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(before[k] == "p3" for k in moved)
    assert len(moved) == sum(1 for k in KEYS if before[k] == "p3")


def test_a_member_leaving_keeps_the_other_owner_with_two_replicas() -> None:
    for k in KEYS[:500]:
        two = owners(k, MEMBERS, 2)
        left = owners(k, ["p1", "p2", "p4"], 2)
        if "p3" not in two:
            assert left == two
        else:
            kept = next(m for m in two if m != "p3")
            assert kept in left and len(left) == 2


def test_a_member_joining_takes_about_one_nth() -> None:
    before = {k: owners(k, MEMBERS, 1)[0] for k in KEYS}
    after = {k: owners(k, [*MEMBERS, "p5"], 1)[0] for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "p5" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # about 1/5


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 6])
def test_owners_are_distinct_and_at_most_the_members(replicas: int) -> None:
    for k in KEYS[:300]:
        found = owners(k, MEMBERS, replicas)
        assert len(found) == len(set(found)) == min(replicas, len(MEMBERS))
        assert found[:1] == owners(k, MEMBERS, 1)  # R owners: the top R, the first the same as R=1


def test_replicas_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        owners("web/10.0.0.1:80", MEMBERS, 0)
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        Ownership.of(MEMBERS, 0)


def test_ownership_of_a_topology_covers_every_endpoint_r_times() -> None:
    endpoints = tuple(Endpoint(f"10.1.0.{i}", 80) for i in range(1, 101))
    topology = Topology(clusters=(Cluster("web", endpoints), Cluster("api", endpoints[:10])))
    ownership = Ownership.of(["b", "a", "c", "a"], 2)
    assert ownership.members == ("a", "b", "c")
    shares = {m: ownership.share(m, topology) for m in ownership.members}
    counts = Counter(key for share in shares.values() for key in share)
    assert set(counts.values()) == {2} and len(counts) == 110
    assert ownership.counts(topology) == {m: len(s) for m, s in shares.items()}
    # The same address in two clusters is two endpoints, hashed apart.
    assert any(ownership.owners("web", e.key) != ownership.owners("api", e.key) for e in endpoints[:10])
    assert Ownership.of([], 1).owners("web", "10.1.0.1:80") == ()


def test_members_without_a_store_are_this_replicas_links() -> None:
    chosen = choose_members(["p2", "p1", "p2"], store=False, registered=None)
    assert chosen == Members(("p1", "p2"), "local") and chosen.reason == ""
    # A registry handed in without a store is not looked at.
    assert choose_members(["p1"], store=False, registered={"p9": ("a",)}).ids == ("p1",)


def test_members_with_a_store_are_the_probers_registered_in_etcd() -> None:
    registered = {"p2": ("b",), "p1": ("b", "a"), "p3": ()}
    chosen = choose_members(["p1"], store=True, registered=registered, replica="a")
    assert chosen.ids == ("p1", "p2") and chosen.source == "etcd" and chosen.reason == ""
    assert dict(chosen.holders) == {"p1": ("a", "b"), "p2": ("b",)}  # a prober nobody holds is no member
    # The same registrations give the same members whatever this replica's links are.
    assert choose_members([], store=True, registered={"p2": ("b",), "p1": ("a",)}, replica="c").ids == chosen.ids
    # A prober linked here counts before its registration comes back through the watch.
    early = choose_members(["p4"], store=True, registered={"p1": ("b",)}, replica="a")
    assert early.ids == ("p1", "p4") and dict(early.holders) == {"p1": ("b",), "p4": ("a",)}


def test_members_while_etcd_is_unavailable_are_the_links_with_the_reason() -> None:
    chosen = choose_members(["p1"], store=True, registered=None, down="UNAVAILABLE: connection refused")
    assert chosen.ids == ("p1",) and chosen.source == "local"
    assert (
        chosen.reason
        == "etcd unavailable (UNAVAILABLE: connection refused): members from this replica's own prober links"
    )
    assert choose_members([], store=True, registered=None).reason.startswith("etcd unavailable:")
