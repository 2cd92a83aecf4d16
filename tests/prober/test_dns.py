"""A --controlplane name: one link per address it resolves to (prober/dns/), the diff with its
grace period (pure), and the links over real gRPC to real control planes on 127.0.0.x."""

from __future__ import annotations

import pytest

from prober.dns import AddressChange, ResolvedAddresses, link_target


def test_new_addresses_link_at_once_and_a_missing_one_only_after_the_grace_period() -> None:
    addresses = ResolvedAddresses(grace=10)
    assert addresses.update(["10.0.0.2", "10.0.0.1"], now=0) == AddressChange(added=("10.0.0.1", "10.0.0.2"))
    assert addresses.update(["10.0.0.1", "10.0.0.2"], now=5) == AddressChange()
    # 10.0.0.2 missing: kept at the first missing answer, and until it has been missing for 10 s.
    assert addresses.update(["10.0.0.1", "10.0.0.3"], now=10) == AddressChange(added=("10.0.0.3",))
    assert addresses.current == ("10.0.0.1", "10.0.0.2", "10.0.0.3")
    assert addresses.missing() == {"10.0.0.2": 10}
    assert addresses.update(["10.0.0.1", "10.0.0.3"], now=19.9) == AddressChange()
    assert addresses.update(["10.0.0.1", "10.0.0.3"], now=20) == AddressChange(removed=("10.0.0.2",))
    assert addresses.current == ("10.0.0.1", "10.0.0.3")
    assert addresses.missing() == {}


def test_an_address_that_comes_back_within_the_grace_period_is_kept_and_its_clock_restarts() -> None:
    addresses = ResolvedAddresses(grace=10)
    addresses.update(["10.0.0.1", "10.0.0.2"], now=0)
    addresses.update(["10.0.0.1"], now=1)  # a flap
    assert addresses.update(["10.0.0.1", "10.0.0.2"], now=9) == AddressChange()
    assert addresses.missing() == {}
    addresses.update(["10.0.0.1"], now=12)  # missing again: 10 s from now, not from 1
    assert addresses.update(["10.0.0.1"], now=21) == AddressChange()
    assert addresses.update(["10.0.0.1"], now=22) == AddressChange(removed=("10.0.0.2",))


def test_a_grace_of_zero_still_waits_for_a_second_missing_answer() -> None:
    addresses = ResolvedAddresses(grace=0)
    addresses.update(["10.0.0.1", "10.0.0.2"], now=0)
    assert addresses.update(["10.0.0.1"], now=1) == AddressChange()
    assert addresses.update(["10.0.0.1"], now=1) == AddressChange(removed=("10.0.0.2",))


def test_every_address_replaced_at_once_links_the_new_ones_before_the_old_ones_go() -> None:
    addresses = ResolvedAddresses(grace=5)
    addresses.update(["10.0.0.1"], now=0)
    assert addresses.update(["10.0.0.9"], now=1) == AddressChange(added=("10.0.0.9",))
    assert addresses.current == ("10.0.0.1", "10.0.0.9")
    assert addresses.update(["10.0.0.9"], now=6) == AddressChange(removed=("10.0.0.1",))


def test_an_empty_answer_is_refused_and_a_negative_grace_too() -> None:
    addresses = ResolvedAddresses(grace=5)
    addresses.update(["10.0.0.1"], now=0)
    with pytest.raises(ValueError, match="empty answer"):
        addresses.update([], now=100)
    assert addresses.current == ("10.0.0.1",)
    with pytest.raises(ValueError, match="grace"):
        ResolvedAddresses(grace=-1)


def test_link_targets_bracket_ipv6() -> None:
    assert link_target("10.0.0.5", 18000) == "10.0.0.5:18000"
    assert link_target("fd00::5", 18000) == "[fd00::5]:18000"
    assert link_target("fe80::1%eth0", 1) == "[fe80::1%eth0]:1"
    with pytest.raises(ValueError):
        link_target("not-an-address", 1)
