"""What checks report and what the verdict decides, as plain values. Pure (L1).

Checks speak RFC 8601 result words and symbols; they never pick SMTP codes
themselves except through a ``Decision`` that names a reply from ``replies``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from filter.replies import Reply

RESULT_WORDS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy")


class Action(enum.StrEnum):
    """The outcome of a message, from mildest to hardest."""

    ACCEPT = "accept"
    ADD_HEADER = "add_header"
    GREYLIST = "greylist"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {
    Action.ACCEPT: 0,
    Action.ADD_HEADER: 1,
    Action.GREYLIST: 2,
    Action.TEMPFAIL: 3,
    Action.REJECT: 4,
}


@dataclass(frozen=True)
class Symbol:
    """A named finding with its policy score and a human reason."""

    name: str
    score: float
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    """A hard outcome a check demands regardless of the score (e.g. a DNSBL reject).

    ``sum_of`` and ``threshold`` mark a decision that rests on scores: it holds only
    while those symbols' scores add up to ``threshold`` or more (DNSBL's combined
    threshold). The verdict re-judges it with a recipient domain's ``scores``, which
    the check, running before the recipient is known, could not see.
    """

    action: Action
    reply: Reply | None  # None for actions that are not refusals (add_header)
    reason: str
    sum_of: tuple[str, ...] = ()
    threshold: float = 0.0


@dataclass(frozen=True)
class CheckResult:
    """One check's report for one stage (and one recipient at RCPT)."""

    check: str
    result: str
    symbols: tuple[Symbol, ...] = ()
    decision: Decision | None = None
    data: Mapping[str, object] = field(default_factory=dict)
    elapsed: float = 0.0

    def with_elapsed(self, elapsed: float) -> CheckResult:
        """A copy with ``elapsed`` set (the pipeline times every check).

        Copies the fields directly: the frozen dataclass constructor and its
        validation ran once already, for this result, and the pipeline does this
        for every check of every message.
        """
        copy = object.__new__(CheckResult)
        copy.__dict__.update(self.__dict__)
        copy.__dict__["elapsed"] = elapsed
        return copy

    def __post_init__(self) -> None:
        if self.result not in RESULT_WORDS:
            raise ValueError(f"check {self.check}: {self.result!r} is not an RFC 8601 result")
