"""Capacity-aware admission's arithmetic and its policy table (pure: no engine).

How a host with no room behaves for real is in tests/test_serve.py."""

from __future__ import annotations

import pytest

from prefect_managed.capacity import Capacity, Need, fits
from prefect_managed.exceptions import PolicyError
from prefect_managed.policy import Host, load_policy

GIB = 1024**3


def test_a_host_takes_only_the_runs_whose_memory_fits_beside_what_is_held():
    capacity = Capacity(memory=7 * GIB, cpus=100)

    assert fits(capacity, Need(0, 0), Need(2 * GIB, 1), wanted=5) == 3
    assert fits(capacity, Need(6 * GIB, 0), Need(2 * GIB, 1), wanted=5) == 0
    assert fits(capacity, Need(5 * GIB, 0), Need(2 * GIB, 1), wanted=5) == 1


def test_cpu_caps_count_too_with_their_overcommit():
    info = {"MemTotal": 64 * GIB, "NCPU": 2}
    strict = Capacity.of_engine(info, Host(reserve_memory=0, cpu_overcommit=1))
    loose = Capacity.of_engine(info, Host(reserve_memory=0, reserve_cpus=0.5, cpu_overcommit=4))

    assert (strict.memory, strict.cpus) == (64 * GIB, 2.0)
    assert loose.cpus == 6.0
    assert fits(strict, Need(0, 1.5), Need(GIB, 0.5), wanted=3) == 1
    assert fits(loose, Need(0, 0), Need(GIB, 1.0), wanted=10) == 6
    # Sums of float caps: 0.1 ten times fits 1.0.
    assert fits(Capacity(GIB, 1.0), Need(0, 0), Need(0, 0.1), wanted=12) == 10


def test_the_reserve_comes_off_what_the_engine_reports_and_never_below_zero():
    host = Host(reserve_memory="1g", reserve_cpus=4)

    capacity = Capacity.of_engine({"MemTotal": 3 * GIB, "NCPU": 2}, host)
    nothing = Capacity.of_engine({"MemTotal": GIB // 2}, host)

    assert capacity.memory == 2 * GIB and capacity.cpus == 0.0
    assert (nothing.memory, nothing.cpus) == (0, 0.0)
    assert fits(capacity, Need(0, 0), Need(GIB, 0.0), wanted=3) == 2
    assert fits(nothing, Need(0, 0), Need(GIB, 0.0), wanted=3) == 0


def test_the_host_table_defaults_and_refusals(tmp_path):
    default = Host()
    path = tmp_path / "policy.toml"

    assert (default.reserve_memory_bytes, default.reserve_cpus, default.cpu_overcommit) == (
        512 * 1024**2,
        0.0,
        4.0,
    )
    assert Host(reserve_memory=0).reserve_memory_bytes == 0
    for text, said in (
        ("[host]\nreserve_memory = '-1g'\n", "'host.reserve_memory'"),
        ("[host]\nreserve_cpus = -1\n", "'host.reserve_cpus' = -1"),
        ("[host]\ncpu_overcommit = true\n", "'host.cpu_overcommit': true is not a number"),
        ("[host]\ncpu_overcommit = 0\n", "greater than or equal to 0.1"),
        ("[host]\nreserve = '1g'\n", "'host.reserve'"),
    ):
        path.write_text(text)
        with pytest.raises(PolicyError) as raised:
            load_policy(path)
        assert said in str(raised.value), (text, str(raised.value))
