"""Prober membership keys in etcd (pure): decoding `{prefix}/probers/{prober}/{replica}`, the
members they make, and the writes that keep one replica's registrations in step with its links."""

from __future__ import annotations

import json

from controlplane.store.probers import ProberRegistry, encode_registration
from controlplane.store.sync import Keys

KEYS = Keys("/hp")


def test_keys_decode_to_prober_and_replica_and_others_are_ignored() -> None:
    key = KEYS.prober("p/1", "host:18000")
    assert key == "/hp/probers/p%2F1/host:18000"
    assert KEYS.parse(key) == ("probers", "p/1", "host:18000")
    registry = ProberRegistry(KEYS)
    assert registry.event(key, True)
    assert registry.members() == {"p/1": ("host:18000",)}
    for junk in ("/hp/probers/p1", "/hp/probers/p1/a/b", "/hp/probers//a", "/other/probers/p1/a"):
        assert not registry.event(junk, True), junk
    assert registry.members() == {"p/1": ("host:18000",)}


def test_a_prober_is_a_member_while_any_replica_holds_its_link() -> None:
    registry = ProberRegistry(KEYS)
    assert registry.event(KEYS.prober("p1", "a"), True)
    assert registry.event(KEYS.prober("p1", "b"), True)  # another holder (shown in GET /probers)
    assert not registry.event(KEYS.prober("p1", "b"), True)  # the same again: nothing changed
    assert registry.event(KEYS.prober("p2", "b"), True)
    assert registry.members() == {"p1": ("a", "b"), "p2": ("b",)}
    assert registry.event(KEYS.prober("p1", "a"), False)
    assert registry.members() == {"p1": ("b",), "p2": ("b",)}  # b still holds p1: a member
    assert registry.event(KEYS.prober("p1", "b"), False)
    assert registry.members() == {"p2": ("b",)}
    assert not registry.event(KEYS.prober("p9", "a"), False)  # a delete of what was never seen
    registry.clear()
    assert registry.members() == {}


def test_writes_register_the_linked_probers_and_unregister_the_rest() -> None:
    registry = ProberRegistry(KEYS)
    ops = registry.writes("a", ["p2", "p1"], now=5.0)
    assert [k for k, _ in ops] == [KEYS.prober("p1", "a"), KEYS.prober("p2", "a")]
    assert json.loads(ops[0][1] or b"") == {"prober": "p1", "replica": "a", "since": 5.0}
    registry.published = {"p1", "p2"}
    assert registry.writes("a", ["p1", "p2"]) == []  # nothing changed: nothing written
    assert registry.writes("a", ["p1"]) == [(KEYS.prober("p2", "a"), None)]
    # A key of this replica's id left by an earlier session (its lease not run out) goes too;
    # another replica's keys are never touched.
    registry.published = {"p1"}
    registry.event(KEYS.prober("p3", "a"), True)
    registry.event(KEYS.prober("p4", "b"), True)
    assert registry.writes("a", ["p1"]) == [(KEYS.prober("p3", "a"), None)]


def test_registration_value() -> None:
    assert json.loads(encode_registration("p1", "a", now=1.5)) == {"prober": "p1", "replica": "a", "since": 1.5}
