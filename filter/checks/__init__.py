"""The check protocol (L3 base): what every check module implements and reads.

A check declares the earliest stage whose inputs it needs, the checks whose results
it reads (``needs``), and returns a ``CheckResult``. Checks never import each other,
the session, the front end or the relay: everything they may use is in ``Context``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from filter.message import MessageBuffer
from filter.model import ClientInfo, Envelope, Recipient, Stage
from filter.policy.schema import Policy
from filter.resolver import Resolver
from filter.results import CheckResult
from filter.store import Store


@dataclass
class Context:
    """Everything a check may read, for one stage of one session."""

    client: ClientInfo
    policy: Policy
    results: Mapping[str, CheckResult] = field(default_factory=dict)
    envelope: Envelope | None = None
    recipient: Recipient | None = None
    message: MessageBuffer | None = None
    clock: Callable[[], float] = time.time
    dry_run: bool = False  # `mailgate check`: change no stored state
    resolver: Resolver | None = None  # the shared cached DNS layer
    store: Store | None = None  # the shared Redis store (greylisting)


class Check(Protocol):
    """A check may also have ``settled(ctx) -> CheckResult | None``: its result when it
    can tell without waiting (nothing to check), else None. The pipeline asks it first
    and then spares it a Task and a timer; ``run`` must give the same answer.
    ``after_upstream = True`` makes the session run it only after the upstream accepted
    the stage's command (see ``filter.pipeline``)."""

    name: str
    stage: Stage
    needs: tuple[str, ...]

    async def run(self, ctx: Context) -> CheckResult: ...
