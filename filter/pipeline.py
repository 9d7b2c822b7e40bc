"""Runs a stage's checks: concurrently, each with a timeout, failures isolated (L4).

A check that raises or overruns becomes ``temperror`` with a ``<NAME>_TEMPERROR``
symbol, a log line and a metric; it never crashes the session and never passes
silently. Checks of one stage that need each other run in dependency waves.

A check may declare ``after_upstream = True``: at its stage the session runs it only
once the upstream accepted the command (greylisting runs after Postfix accepted the
RCPT, as postgrey is placed after ``reject_unlisted_recipient``). The other checks of
the stage run before the command goes upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Coroutine, Generator, Sequence
from typing import Any, TypeVar

from filter.checks import Check, Context
from filter.metrics import Metrics
from filter.model import Stage
from filter.results import CheckResult, Symbol

log = logging.getLogger("mailgate.pipeline")
T = TypeVar("T")


class Pipeline:
    """The enabled checks, grouped by stage in dependency order."""

    def __init__(
        self, checks: Sequence[Check], timeout: float, metrics: Metrics | None = None
    ) -> None:
        self.checks = list(checks)
        self.timeout = timeout
        self.metrics = metrics
        names = {c.name for c in self.checks}
        if len(names) != len(self.checks):
            raise ValueError("two checks share a name")
        self._early = {stage: self._plan(stage, late=False) for stage in Stage}
        self._late = {stage: self._plan(stage, late=True) for stage in Stage}

    def _plan(self, stage: Stage, late: bool) -> list[list[Check]]:
        pending = [c for c in self.checks if c.stage is stage and after_upstream(c) is late]
        done: set[str] = {c.name for c in self.checks if c.stage < stage}
        if late:
            done.update(c.name for c in self.checks if c.stage is stage and not after_upstream(c))
        else:
            waiting = {c.name for c in self.checks if c.stage is stage and after_upstream(c)}
            for c in pending:
                if waiting & set(c.needs):
                    wanted = ", ".join(sorted(waiting & set(c.needs)))
                    raise ValueError(f"check {c.name} needs {wanted}, which runs after upstream")
        waves: list[list[Check]] = []
        while pending:
            ready = [
                c for c in pending if all(n in done or n not in self._names() for n in c.needs)
            ]
            if not ready:
                cycle = ", ".join(c.name for c in pending)
                raise ValueError(f"checks with circular needs at {stage.label}: {cycle}")
            waves.append(ready)
            done.update(c.name for c in ready)
            pending = [c for c in pending if c not in ready]
        return waves

    def _names(self) -> set[str]:
        return {c.name for c in self.checks}

    def has_stage(self, stage: Stage, late: bool | None = None) -> bool:
        """Whether ``stage`` has checks: all of them, or only the early or late part."""
        if late is None:
            return bool(self._early[stage] or self._late[stage])
        return bool((self._late if late else self._early)[stage])

    async def run(self, stage: Stage, ctx: Context, late: bool | None = None) -> list[CheckResult]:
        """Run ``stage``'s checks; their results are also added to ``ctx.results``.

        ``late=None`` runs all of them (the dry run, which has no upstream);
        ``False`` those that run before the command goes upstream, ``True`` the rest.
        """
        if late is None:
            waves = self._early[stage] + self._late[stage]
        else:
            waves = (self._late if late else self._early)[stage]
        out: list[CheckResult] = []
        for wave in waves:
            results = await self._run_wave(wave, ctx)
            for r in results:
                ctx.results[r.check] = r  # type: ignore[index]
            out.extend(results)
        return out

    async def _run_wave(self, wave: list[Check], ctx: Context) -> list[CheckResult]:
        """The checks of one wave concurrently, results in the wave's order.

        Checks that settle without waiting (``Check.settled``) are answered first; of
        the rest, the first runs in this task and the others in tasks. Why not
        ``asyncio.gather``: it makes a Task of every check and a future to join them;
        with warm caches most checks never wait, and that machinery cost more than a
        small check itself. The tasks start as soon as the first check waits (or
        ends); if this task is cancelled, so are they.
        """
        settled = {c.name: r for c in wave if (r := self._settled(c, ctx)) is not None}
        pending = [c for c in wave if c.name not in settled]
        if not pending:
            return [settled[c.name] for c in wave]
        if len(pending) == 1 and not settled:
            return [await self._run_one(pending[0], ctx)]
        loop = asyncio.get_running_loop()
        others = [loop.create_task(self._run_one(c, ctx)) for c in pending[1:]]
        try:
            settled[pending[0].name] = await self._run_one(pending[0], ctx)
            for check, task in zip(pending[1:], others, strict=True):
                settled[check.name] = await task
        except BaseException:
            for task in others:
                task.cancel()
            raise
        return [settled[c.name] for c in wave]

    def _settled(self, check: Check, ctx: Context) -> CheckResult | None:
        """The check's result if it can give it without waiting (``Check.settled``)."""
        quick = getattr(check, "settled", None)
        if quick is None:
            return None
        t0 = time.monotonic()
        try:
            result: CheckResult | None = quick(ctx)
        except Exception as exc:  # same isolation as run(): a bug becomes temperror
            result = _crashed(check, ctx, exc)
        if result is None:
            return None
        return self._finish(check, result, time.monotonic() - t0)

    async def _run_one(self, check: Check, ctx: Context) -> CheckResult:
        """One check under the timeout, armed only once the check has to wait.

        The check's first step runs at once, by hand: with warm caches most checks
        finish in it, and a timeout (a timer handle, scheduled and cancelled) cost
        more than the rest of the pipeline's work for them. A synchronous step cannot
        be interrupted by ``asyncio.timeout`` anyway; the timer starts at the first
        wait, and the rest of the check runs under it in this same task.
        """
        t0 = time.monotonic()
        try:
            coro = check.run(ctx)
            try:
                step = coro.send(None)
            except StopIteration as done:
                result = done.value
            else:
                async with asyncio.timeout(self.timeout):
                    result = await _resume(coro, step)
        except TimeoutError:
            result = _failed(check, ctx, f"timed out after {self.timeout:g}s")
            log.warning("check=%s session=%s outcome=timeout", check.name, ctx.client.session_id)
        except Exception as exc:  # isolation is the point: any bug becomes temperror
            result = _crashed(check, ctx, exc)
        return self._finish(check, result, time.monotonic() - t0)

    def _finish(self, check: Check, result: CheckResult, elapsed: float) -> CheckResult:
        if self.metrics is not None:
            self.metrics.count_check(check.name, result.result, elapsed)
        return result.with_elapsed(elapsed)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], step: Any) -> Generator[Any, Any, T]:
    """Go on with a coroutine already stepped once by hand, as ``await`` would.

    ``step`` is what its first step yielded (the future it waits for); what the task
    sends or throws in (the future's outcome, a cancellation) goes on to the coroutine.
    """
    try:
        while True:
            try:
                value = yield step
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                step = coro.throw(exc)
            else:
                step = coro.send(value)
    except StopIteration as done:
        result: T = done.value
        return result


def after_upstream(check: Check) -> bool:
    """True for a check that runs only once the upstream accepted its stage's command."""
    return bool(getattr(check, "after_upstream", False))


def _crashed(check: Check, ctx: Context, exc: Exception) -> CheckResult:
    """A check that raised: logged with its traceback (called in its except block)."""
    log.exception("check=%s session=%s outcome=exception", check.name, ctx.client.session_id)
    return _failed(check, ctx, f"internal error: {type(exc).__name__}")


def _failed(check: Check, ctx: Context, detail: str) -> CheckResult:
    """temperror for a check that timed out or raised; the check may say more.

    A check with a ``failure_result(ctx, detail)`` method words its own failure (DMARC
    applies ``on_temperror``); otherwise a ``<NAME>_TEMPERROR`` symbol scored by policy.
    """
    custom = getattr(check, "failure_result", None)
    if custom is not None:
        try:
            result: CheckResult = custom(ctx, detail)
            return result
        except Exception:
            log.exception("check=%s failure_result failed", check.name)
    name = f"{check.name.upper()}_TEMPERROR"
    symbol = Symbol(name, ctx.policy.score(name), detail)
    return CheckResult(check.name, "temperror", (symbol,), None, {"error": detail})
