"""The supervisor's restart delays for a worker that keeps dying young (pure logic)."""

from __future__ import annotations

from filter.app import RestartBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_that_lived_restarts_at_once_and_one_dying_young_waits_longer_each_time() -> None:
    clock = Clock()
    backoff = RestartBackoff(clock)
    backoff.started(0)
    clock.now += 3600
    assert backoff.delay(0) == 0  # an hour of service: a crash, not a crash loop
    delays = []
    for _ in range(9):
        backoff.started(0)
        clock.now += 0.5
        delays.append(backoff.delay(0))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.started(0)
    clock.now += RestartBackoff.FAST
    assert backoff.delay(0) == 0  # it ran long enough: the count starts over
    backoff.started(0)
    clock.now += 1
    assert backoff.delay(0) == 1


def test_workers_are_throttled_each_on_its_own() -> None:
    clock = Clock()
    backoff = RestartBackoff(clock)
    for index in (0, 1):
        backoff.started(index)
    clock.now += 1
    assert backoff.delay(0) == 1
    backoff.started(0)
    clock.now += 1
    assert backoff.delay(0) == 2
    assert backoff.delay(1) == 1
