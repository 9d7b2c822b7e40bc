"""Pipeline: concurrency within a stage, needs ordering, failure isolation, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from filter.checks import Check, Context
from filter.metrics import Metrics
from filter.model import ClientInfo, Stage
from filter.pipeline import Pipeline
from filter.policy.schema import DEFAULT_POLICY
from filter.results import CheckResult, Symbol


class FakeCheck:
    """A check defined here: sleeps, then reports (or raises)."""

    def __init__(
        self,
        name: str,
        stage: Stage = Stage.CONNECT,
        needs: tuple[str, ...] = (),
        delay: float = 0.0,
        result: str = "pass",
        error: Exception | None = None,
        log: list[str] | None = None,
        inspect: Callable[[Context], None] | None = None,
    ) -> None:
        self.name = name
        self.stage = stage
        self.needs = needs
        self.delay = delay
        self.result = result
        self.error = error
        self.log = log if log is not None else []
        self.inspect = inspect

    async def run(self, ctx: Context) -> CheckResult:
        self.log.append(f"start {self.name}")
        if self.inspect is not None:
            self.inspect(ctx)
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        self.log.append(f"end {self.name}")
        symbol = Symbol(f"{self.name.upper()}_{self.result.upper()}", 1.0, "fake")
        return CheckResult(self.name, self.result, (symbol,), data={"who": self.name})


def context() -> Context:
    return Context(client=ClientInfo("192.0.2.1", 40000, "sess1"), policy=DEFAULT_POLICY)


def test_fake_check_implements_the_protocol() -> None:
    check: Check = FakeCheck("spf")  # type-checks against the Protocol
    assert check.name == "spf"


async def test_checks_of_a_stage_run_concurrently() -> None:
    pipeline = Pipeline([FakeCheck("spf", delay=0.2), FakeCheck("dkim", delay=0.2)], timeout=5)
    ctx = context()
    t0 = time.monotonic()
    results = await pipeline.run(Stage.CONNECT, ctx)
    assert time.monotonic() - t0 < 0.35
    assert sorted(r.check for r in results) == ["dkim", "spf"]
    assert all(r.result == "pass" for r in results)
    assert all(r.elapsed >= 0.19 for r in results)
    assert set(ctx.results) == {"spf", "dkim"}


async def test_only_the_requested_stage_runs() -> None:
    log: list[str] = []
    pipeline = Pipeline(
        [FakeCheck("dnsbl", Stage.CONNECT, log=log), FakeCheck("spf", Stage.MAIL, log=log)],
        timeout=5,
    )
    assert pipeline.has_stage(Stage.CONNECT) and pipeline.has_stage(Stage.MAIL)
    assert not pipeline.has_stage(Stage.DATA)
    assert await pipeline.run(Stage.DATA, context()) == []
    results = await pipeline.run(Stage.MAIL, context())
    assert [r.check for r in results] == ["spf"]
    assert log == ["start spf", "end spf"]


async def test_needs_run_after_and_see_the_result() -> None:
    log: list[str] = []
    seen: dict[str, str] = {}

    def look(ctx: Context) -> None:
        seen.update({name: r.result for name, r in ctx.results.items()})

    checks = [
        # Listed first, but it needs the other two.
        FakeCheck("dmarc", Stage.DATA, needs=("spf", "dkim"), log=log, inspect=look),
        FakeCheck("spf", Stage.DATA, delay=0.1, result="fail", log=log),
        FakeCheck("dkim", Stage.DATA, delay=0.05, result="none", log=log),
    ]
    results = await Pipeline(checks, timeout=5).run(Stage.DATA, context())
    assert log.index("start dmarc") > log.index("end spf")
    assert log.index("start dmarc") > log.index("end dkim")
    assert seen == {"spf": "fail", "dkim": "none"}
    assert [r.check for r in results][-1] == "dmarc"


async def test_needs_on_an_earlier_stage_or_a_disabled_check_do_not_block() -> None:
    log: list[str] = []
    checks = [
        FakeCheck("spf", Stage.MAIL, log=log),
        FakeCheck("dmarc", Stage.DATA, needs=("spf", "dkim"), log=log),  # dkim: not enabled
        FakeCheck("arc", Stage.DATA, delay=0.05, log=log),
    ]
    results = await Pipeline(checks, timeout=5).run(Stage.DATA, context())
    assert sorted(r.check for r in results) == ["arc", "dmarc"]
    assert log.index("start dmarc") < log.index("end arc")  # same wave


async def test_chain_of_needs() -> None:
    log: list[str] = []
    checks = [
        FakeCheck("c", needs=("b",), log=log),
        FakeCheck("b", needs=("a",), log=log),
        FakeCheck("a", log=log),
    ]
    await Pipeline(checks, timeout=5).run(Stage.CONNECT, context())
    assert log == ["start a", "end a", "start b", "end b", "start c", "end c"]


async def test_a_raising_check_becomes_temperror(caplog: pytest.LogCaptureFixture) -> None:
    checks = [
        FakeCheck("spf", delay=0.05),
        FakeCheck("dkim", error=RuntimeError("boom")),
        FakeCheck("arc", error=KeyError("x"), delay=0.01),
    ]
    ctx = context()
    with caplog.at_level("WARNING", logger="mailgate.pipeline"):
        results = await Pipeline(checks, timeout=5).run(Stage.CONNECT, ctx)
    by_name = {r.check: r for r in results}
    assert set(by_name) == {"spf", "dkim", "arc"}
    assert by_name["spf"].result == "pass"
    for name in ("dkim", "arc"):
        r = by_name[name]
        assert r.result == "temperror"
        assert [s.name for s in r.symbols] == [f"{name.upper()}_TEMPERROR"]
        assert r.decision is None
        assert ctx.results[name] is r
    assert "RuntimeError" in by_name["dkim"].symbols[0].detail
    assert any("check=dkim" in rec.getMessage() for rec in caplog.records)


async def test_a_slow_check_times_out_into_temperror() -> None:
    checks = [FakeCheck("dnsbl", delay=10.0), FakeCheck("spf", delay=0.01)]
    t0 = time.monotonic()
    results = await Pipeline(checks, timeout=0.2).run(Stage.CONNECT, context())
    assert time.monotonic() - t0 < 1.0
    by_name = {r.check: r for r in results}
    assert by_name["spf"].result == "pass"
    assert by_name["dnsbl"].result == "temperror"
    assert by_name["dnsbl"].symbols[0].name == "DNSBL_TEMPERROR"
    assert "timed out" in by_name["dnsbl"].symbols[0].detail
    assert by_name["dnsbl"].elapsed == pytest.approx(0.2, abs=0.15)


async def test_a_slow_check_in_either_place_of_its_wave_times_out() -> None:
    """The first check of a wave runs in the caller's task, the others in tasks."""
    for order in (["slow", "fast"], ["fast", "slow"]):
        delays = {"slow": 10.0, "fast": 0.01}
        checks = [FakeCheck(n, delay=delays[n]) for n in order]
        t0 = time.monotonic()
        results = {
            r.check: r for r in await Pipeline(checks, timeout=0.2).run(Stage.CONNECT, context())
        }
        assert time.monotonic() - t0 < 1.0
        assert (results["slow"].result, results["fast"].result) == ("temperror", "pass")


async def test_cancelling_a_stage_cancels_every_check_of_its_wave() -> None:
    """A client that goes away mid-stage leaves no check running behind it."""
    log: list[str] = []
    checks = [FakeCheck(n, delay=5.0, log=log) for n in ("one", "two", "three")]
    task = asyncio.get_running_loop().create_task(
        Pipeline(checks, timeout=10).run(Stage.CONNECT, context())
    )
    await asyncio.sleep(0.05)
    assert log == ["start one", "start two", "start three"]  # all three were running
    before = set(asyncio.all_tasks())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    leftover = [t for t in before if not t.done() and t is not asyncio.current_task()]
    assert leftover == []
    assert not any(line.startswith("end") for line in log)


async def test_a_failed_need_still_lets_the_dependent_run() -> None:
    seen: dict[str, str] = {}
    checks = [
        FakeCheck("spf", error=OSError("dns")),
        FakeCheck(
            "dmarc",
            needs=("spf",),
            inspect=lambda ctx: seen.update(spf=ctx.results["spf"].result),
        ),
    ]
    results = await Pipeline(checks, timeout=5).run(Stage.CONNECT, context())
    assert seen == {"spf": "temperror"}
    assert [r.result for r in results] == ["temperror", "pass"]


class SettlingCheck(FakeCheck):
    """A FakeCheck with the optional ``settled`` fast path."""

    def __init__(self, name: str, answer: str | None, boom: bool = False, **kw: object) -> None:
        super().__init__(name, **kw)  # type: ignore[arg-type]
        self.answer = answer
        self.boom = boom

    def settled(self, ctx: Context) -> CheckResult | None:
        self.log.append(f"settled {self.name}")
        if self.boom:
            raise RuntimeError("bug in settled")
        if self.answer is None:
            return None
        return CheckResult(self.name, self.answer, (), data={"who": "settled"})


async def test_a_settled_check_is_not_run_and_keeps_its_place() -> None:
    log: list[str] = []
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    checks = [
        FakeCheck("dkim", delay=0.05, log=log),
        SettlingCheck("arc", "none", log=log),
        SettlingCheck("spf", None, log=log),  # cannot tell without waiting: runs
    ]
    ctx = context()
    results = await Pipeline(checks, timeout=5, metrics=metrics).run(Stage.CONNECT, ctx)
    assert [r.check for r in results] == ["dkim", "arc", "spf"]  # the wave's order
    assert [r.result for r in results] == ["pass", "none", "pass"]
    assert results[1].data == {"who": "settled"} and ctx.results["arc"] is results[1]
    assert "start arc" not in log and "start spf" in log and "start dkim" in log
    value = registry.get_sample_value(
        "mailgate_check_results_total", {"check": "arc", "result": "none"}
    )
    assert value == 1.0  # counted like any other result


async def test_a_settled_path_that_raises_becomes_temperror() -> None:
    results = await Pipeline([SettlingCheck("arc", "none", boom=True)], timeout=5).run(
        Stage.CONNECT, context()
    )
    assert [(r.check, r.result) for r in results] == [("arc", "temperror")]
    assert "RuntimeError" in results[0].symbols[0].detail


class ImmediateCheck:
    """A check that never waits: its result is ready at its first step."""

    name = "spf"
    stage = Stage.CONNECT
    needs: tuple[str, ...] = ()

    async def run(self, ctx: Context) -> CheckResult:
        return CheckResult("spf", "pass", (Symbol("SPF_PASS", -1.0, "cached"),))


class AwaitingCheck:
    """A check that waits several times: for a value, then for a failure it handles."""

    name = "dkim"
    stage = Stage.CONNECT
    needs: tuple[str, ...] = ()

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.value: asyncio.Future[str] = loop.create_future()
        self.failure: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.01, self.value.set_result, "key")
        loop.call_later(0.02, self.failure.set_exception, LookupError("no key"))

    async def run(self, ctx: Context) -> CheckResult:
        got = await self.value
        await asyncio.sleep(0)  # a bare yield on the way
        try:
            await self.failure
        except LookupError as e:
            return CheckResult("dkim", "temperror", (), data={"got": got, "error": str(e)})
        return CheckResult("dkim", "pass", ())


async def test_the_timeout_is_armed_only_for_a_check_that_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A check that finishes at its first step costs no timer; one that waits gets
    the values and the failures it waits for, through the timeout, in order."""
    armed: list[float | None] = []
    real_timeout = asyncio.timeout

    def counting_timeout(delay: float | None) -> asyncio.Timeout:
        armed.append(delay)
        return real_timeout(delay)

    monkeypatch.setattr(asyncio, "timeout", counting_timeout)
    [quick] = await Pipeline([ImmediateCheck()], timeout=3).run(Stage.CONNECT, context())
    assert (quick.result, armed) == ("pass", [])
    [waited] = await Pipeline([AwaitingCheck()], timeout=3).run(Stage.CONNECT, context())
    assert waited.result == "temperror"
    assert waited.data == {"got": "key", "error": "no key"}
    assert armed == [3]


async def test_a_check_slow_before_its_first_wait_still_times_out_after_it() -> None:
    """The first step runs before the timer; a hang after it is still bounded."""

    class SlowStart(FakeCheck):
        async def run(self, ctx: Context) -> CheckResult:
            time.sleep(0.05)  # noqa: ASYNC251  # synchronous work, as a CPU-bound check does
            return await super().run(ctx)

    t0 = time.monotonic()
    [r] = await Pipeline([SlowStart("rdns", delay=10.0)], timeout=0.2).run(Stage.CONNECT, context())
    assert r.result == "temperror" and "timed out" in r.symbols[0].detail
    assert time.monotonic() - t0 < 1.0


async def test_elapsed_is_set_on_a_copy() -> None:
    """The pipeline times every check without touching the check's own result."""
    original = CheckResult("spf", "pass", (Symbol("SPF_PASS", -1.0, "x"),), data={"a": 1})
    copy = original.with_elapsed(0.25)
    assert copy.elapsed == 0.25 and original.elapsed == 0.0
    assert (copy.check, copy.result, copy.symbols, copy.data) == (
        original.check,
        original.result,
        original.symbols,
        original.data,
    )
    with pytest.raises(AttributeError):
        copy.result = "fail"  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize(
    "checks",
    [
        [FakeCheck("a", needs=("b",)), FakeCheck("b", needs=("a",))],
        [FakeCheck("a", needs=("a",))],
        [FakeCheck("a", needs=("c",)), FakeCheck("b", needs=("a",)), FakeCheck("c", needs=("b",))],
        [
            FakeCheck("x"),
            FakeCheck("a", Stage.RCPT, needs=("b",)),
            FakeCheck("b", Stage.RCPT, needs=("a",)),
        ],
    ],
)
def test_circular_needs_raise_at_construction(checks: list[FakeCheck]) -> None:
    with pytest.raises(ValueError, match="circular"):
        Pipeline(checks, timeout=1)


def test_duplicate_names_raise() -> None:
    with pytest.raises(ValueError, match="name"):
        Pipeline([FakeCheck("spf"), FakeCheck("spf", Stage.MAIL)], timeout=1)


async def test_metrics_are_counted() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    checks = [
        FakeCheck("spf", result="fail"),
        FakeCheck("dkim", error=RuntimeError("boom")),
        FakeCheck("dnsbl", delay=5.0),
        FakeCheck("homegrown"),  # not a known check name: counted as "other"
    ]
    pipeline = Pipeline(checks, timeout=0.1, metrics=metrics)
    await pipeline.run(Stage.CONNECT, context())
    await pipeline.run(Stage.CONNECT, context())

    def count(check: str, result: str) -> float | None:
        labels = {"check": check, "result": result}
        return registry.get_sample_value("mailgate_check_results_total", labels)

    assert count("spf", "fail") == 2
    assert count("dkim", "temperror") == 2
    assert count("dnsbl", "temperror") == 2
    assert count("other", "pass") == 2
    assert count("spf", "pass") in (None, 0.0)
    for name in ("spf", "dkim", "dnsbl", "other"):
        n = registry.get_sample_value("mailgate_check_duration_seconds_count", {"check": name})
        assert n == 2, name
    total = registry.get_sample_value("mailgate_check_duration_seconds_sum", {"check": "dnsbl"})
    assert total is not None and total >= 0.2


class _SlowWithOwnFailure:
    """A check that overruns, and says what its failure means."""

    name = "dmarc"
    stage = Stage.DATA
    needs: tuple[str, ...] = ()

    async def run(self, ctx: Context) -> CheckResult:
        await asyncio.sleep(5)
        raise AssertionError("unreachable")

    def failure_result(self, ctx: Context, detail: str) -> CheckResult:
        return CheckResult("dmarc", "temperror", (Symbol("OWN_FAILURE", 1.5, detail),))


class _Raises:
    name = "helo"
    stage = Stage.HELO
    needs: tuple[str, ...] = ()

    async def run(self, ctx: Context) -> CheckResult:
        raise RuntimeError("bug")


async def test_a_check_words_its_own_failure() -> None:
    pipe = Pipeline([_SlowWithOwnFailure()], timeout=0.05)
    ctx = Context(client=ClientInfo("192.0.2.1", 1, "S"), policy=DEFAULT_POLICY)
    [result] = await pipe.run(Stage.DATA, ctx)
    assert result.result == "temperror" and result.symbols[0].name == "OWN_FAILURE"
    assert "timed out" in result.symbols[0].detail


async def test_generic_temperror_is_scored_by_policy() -> None:
    import dataclasses
    from types import MappingProxyType

    policy = dataclasses.replace(
        DEFAULT_POLICY, scores=MappingProxyType({**DEFAULT_POLICY.scores, "HELO_TEMPERROR": 0.7})
    )
    ctx = Context(client=ClientInfo("192.0.2.1", 1, "S"), policy=policy)
    [result] = await Pipeline([_Raises()], timeout=1).run(Stage.HELO, ctx)
    assert (result.result, result.symbols[0].name, result.symbols[0].score) == (
        "temperror",
        "HELO_TEMPERROR",
        0.7,
    )


async def test_dmarc_timeout_follows_on_temperror() -> None:
    import dataclasses

    from filter.checks.dmarc import DMARCCheck
    from filter.results import Action

    ctx = Context(client=ClientInfo("192.0.2.1", 1, "S"), policy=DEFAULT_POLICY)
    result = DMARCCheck().failure_result(ctx, "timed out after 20s")
    assert result.result == "temperror"
    assert result.decision is not None and result.decision.action is Action.TEMPFAIL
    accept = dataclasses.replace(
        DEFAULT_POLICY, dmarc=dataclasses.replace(DEFAULT_POLICY.dmarc, on_temperror="accept")
    )
    ctx2 = Context(client=ClientInfo("192.0.2.1", 1, "S"), policy=accept)
    assert DMARCCheck().failure_result(ctx2, "timed out").decision is None


class LateCheck(FakeCheck):
    """A check that runs only after the upstream accepted its stage's command."""

    after_upstream = True


async def test_after_upstream_checks_run_apart_and_see_the_early_results() -> None:
    log: list[str] = []
    seen: list[set[str]] = []
    late = LateCheck(
        "greylist", Stage.RCPT, needs=("lists_rcpt",), log=log,
        inspect=lambda ctx: seen.append(set(ctx.results)),
    )  # fmt: skip
    early = FakeCheck("lists_rcpt", Stage.RCPT, log=log)
    pipeline = Pipeline([late, early, FakeCheck("ratelimit", Stage.RCPT, log=log)], timeout=5)
    assert pipeline.has_stage(Stage.RCPT, late=False) and pipeline.has_stage(Stage.RCPT, late=True)
    assert not pipeline.has_stage(Stage.MAIL) and not pipeline.has_stage(Stage.MAIL, late=True)
    ctx = context()
    first = await pipeline.run(Stage.RCPT, ctx, late=False)
    assert sorted(r.check for r in first) == ["lists_rcpt", "ratelimit"]
    assert "start greylist" not in log
    second = await pipeline.run(Stage.RCPT, ctx, late=True)
    assert [r.check for r in second] == ["greylist"]
    assert seen == [{"lists_rcpt", "ratelimit"}]
    # Without an upstream (the dry run) one call runs both parts, early first.
    log.clear()
    everything = await pipeline.run(Stage.RCPT, context())
    assert [r.check for r in everything][-1] == "greylist" and len(everything) == 3


def test_an_early_check_cannot_need_a_late_one() -> None:
    checks = [LateCheck("greylist", Stage.RCPT), FakeCheck("ratelimit", Stage.RCPT, ("greylist",))]
    with pytest.raises(ValueError, match="ratelimit needs greylist, which runs after upstream"):
        Pipeline(checks, timeout=5)


def test_the_shipped_greylist_check_runs_after_upstream() -> None:
    from filter.checks.greylist import GreylistCheck
    from filter.pipeline import after_upstream

    assert after_upstream(GreylistCheck())
