"""The thread count: chosen from --threads, $OMP_NUM_THREADS or the machine's free cores, never oversubscribing."""

from __future__ import annotations

import pytest

from astra_peft.harness.threads import choose_threads


def test_explicit_request_wins_over_environment_and_load():
    choice = choose_threads(3, environ={"OMP_NUM_THREADS": "1"}, loadavg=9.0, cores=(2, 2))
    assert (choice.threads, choice.reason) == (3, "--threads")


def test_environment_wins_over_load():
    assert choose_threads(None, environ={"OMP_NUM_THREADS": "2"}, loadavg=9.0, cores=(2, 2)).threads == 2


@pytest.mark.parametrize(
    "load, cores, expected",
    [
        (0.0, (2, 2), 2),  # idle: torch's own default, one per physical core
        (0.2, (4, 8), 4),  # hyper-threads are not counted as cores
        (1.0, (2, 2), 1),  # one CPU busy elsewhere: take the other
        (5.0, (2, 2), 1),  # the case: busy machine, one thread, never zero
        (2.6, (4, 4), 1),  # load rounds to 3 busy CPUs
        (1.4, (8, 8), 7),
    ],
)
def test_default_leaves_busy_cores_alone(load, cores, expected):
    choice = choose_threads(None, environ={}, loadavg=load, cores=cores)
    assert choice.threads == expected
    assert f"load {load:.1f}" in choice.describe()


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_requests_are_refused(bad):
    with pytest.raises(ValueError, match="--threads"):
        choose_threads(bad, environ={})


def test_bad_environment_is_named():
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        choose_threads(None, environ={"OMP_NUM_THREADS": "many"})


def test_processes_started_by_a_launcher_share_the_cores():
    # torchrun --nproc_per_node 2 on an idle 4-core machine: 2 threads each, not 4 each.
    choice = choose_threads(None, environ={"LOCAL_WORLD_SIZE": "2"}, loadavg=0.0, cores=(4, 4))
    assert choice.threads == 2 and "shared by 2 processes" in choice.describe()
    assert choose_threads(None, environ={"LOCAL_WORLD_SIZE": "4"}, loadavg=1.0, cores=(2, 2)).threads == 1
