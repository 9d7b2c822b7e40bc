"""Run the whole check pipeline on one stored message without delivering it (L4).

``mailgate check`` and policy replay use this: the same checks, the same verdict and
the same reply a live session would produce, with ``dry_run`` set so no check changes
stored state (greylist triplets, rate counters).

What "the same" means, stage by stage, mirrors :class:`filter.session.Session`: the
CONNECT, HELO and MAIL checks run without a verdict; the session judges first at each
RCPT (so a refusal decided earlier, e.g. a DNSBL listing, is answered at RCPT and the
envelope gets logged), then after DATA. Unlike a live session, the dry run does not
stop at the first refusal: every stage's checks still run, so ``mailgate check`` can
explain all of them, while the verdict, reply and stage stay those of that refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from filter import authresults, replies
from filter.checks import Context
from filter.checks.rdns import xclient_name
from filter.message import MessageBuffer
from filter.model import ClientInfo, Envelope, Recipient, Stage
from filter.netaddr import ip_in, normalize_ip
from filter.pipeline import Pipeline
from filter.policy.schema import Policy
from filter.replies import Reply
from filter.resolver import Resolver
from filter.results import Action, CheckResult
from filter.session import common_override_domain, content_refusal
from filter.smtpdata import CRLF, DataReader, stuff
from filter.store import Store
from filter.verdict import Verdict, decide, decide_after_data


@dataclass
class DryRun:
    """What a message would get: verdict, the reply, at which stage, and every result.

    ``verdict``, ``reply`` and ``stage`` are the live session's (its first refusal, or
    the verdict after DATA). ``results`` holds every check of every stage, also those
    a refusal made moot; ``complete`` is the after-DATA verdict over all of them (every
    symbol, as if nothing had refused). ``authentication_results`` is the header field
    the session adds to the message, unfolded (for a trusted client, the one its
    checks would make: the session runs none and adds none).
    ``enabled`` names the checks the policy runs (a disabled check is not among them).
    """

    verdict: Verdict
    reply: Reply
    stage: Stage
    results: list[CheckResult] = field(default_factory=list)
    trusted: bool = False
    authentication_results: str = ""
    complete: Verdict | None = None
    enabled: tuple[str, ...] = ()


async def evaluate(
    policy: Policy,
    pipeline: Pipeline,
    content: bytes,
    ip: str,
    helo: str | None,
    mail_from: str,
    rcpts: list[str],
    resolver: Resolver | None = None,
    store: Store | None = None,
) -> DryRun:
    """Judge ``content`` as a session with this client and envelope would."""
    client = ClientInfo(ip=normalize_ip(ip), port=0, session_id="CHECK", helo=helo, proto="ESMTP")
    client.trusted = ip_in(client.ip, policy.server.trusted_networks)
    envelope = Envelope(mail_from=mail_from, message_id="CHECK.1")
    enabled = tuple(c.name for c in pipeline.checks)
    walk = _Walk(policy, pipeline, client, envelope, resolver, store)
    message = MessageBuffer()
    try:
        message.write(content)
        await walk.identity()
        await walk.recipients([Recipient(r) for r in rcpts])
        await walk.data(message)
    finally:
        message.close()
    found = walk.outcome(enabled)
    return _trusted(found) if client.trusted else found


class _Walk:
    """One dry-run transaction: the results a live session would hold, and all of them.

    ``kept`` follows the session's own bookkeeping (a refused recipient's results are
    dropped, a recipient check counts once per transaction), because the verdicts
    are computed from it; ``everything`` is what the explanation shows.
    """

    def __init__(
        self,
        policy: Policy,
        pipeline: Pipeline,
        client: ClientInfo,
        envelope: Envelope,
        resolver: Resolver | None,
        store: Store | None,
    ) -> None:
        self.policy = policy
        self.pipeline = pipeline
        self.client = client
        self.envelope = envelope
        self.resolver = resolver
        self.store = store
        self.kept: list[CheckResult] = []
        self.everything: list[CheckResult] = []
        self.all_rcpts: list[Recipient] = []
        self.refusal: tuple[Verdict, Stage] | None = None
        self.final: Verdict | None = None
        self.per_rcpt = frozenset(c.name for c in pipeline.checks if c.stage is Stage.RCPT)
        self.before_data = frozenset(c.name for c in pipeline.checks if c.stage < Stage.DATA)

    async def run(
        self, stage: Stage, rcpt: Recipient | None = None, message: MessageBuffer | None = None
    ) -> list[CheckResult]:
        """One stage's checks, seeing the results the session would hand them."""
        ctx = Context(
            client=self.client,
            policy=self.policy,
            results={r.check: r for r in self.kept},
            envelope=self.envelope if stage >= Stage.MAIL else None,
            recipient=rcpt,
            message=message,
            dry_run=True,
            resolver=self.resolver,
            store=self.store,
        )
        got = await self.pipeline.run(stage, ctx)
        self.everything.extend(got)
        return got

    async def identity(self) -> None:
        """CONNECT, HELO (when a name is known) and MAIL: checks only, no verdict yet."""
        for stage in (Stage.CONNECT, Stage.HELO, Stage.MAIL):
            if stage is Stage.HELO and not self.client.helo:
                continue
            self.kept.extend(await self.run(stage))
            if stage is Stage.CONNECT:
                self._learn_client_name()

    def _learn_client_name(self) -> None:
        """The rdns check's verified name becomes the client's, as in a session: the
        HELO and list checks match names against it (rDNS suffixes of ``[lists]``)."""
        rdns = next((r for r in self.kept if r.check == "rdns"), None)
        name = xclient_name(rdns)
        if rdns is not None and not name.startswith("["):
            self.client.hostname = name

    async def recipients(self, rcpts: list[Recipient]) -> None:
        """Each RCPT judged as the session judges it; earlier refusals are applied here.

        Without recipients the RCPT verdict is still taken once (no recipient checks,
        no domain override), so a refusal decided before RCPT is reported where a
        live session would give it.
        """
        self.all_rcpts = rcpts
        targets: list[Recipient | None] = list(rcpts) or [None]
        limit = self.policy.server.max_recipients
        for rcpt in targets:
            if rcpt is not None and len(self.envelope.recipients) >= limit:
                # answered before any check, as the session does; the others go on
                too_many = f"more than server.max_recipients ({limit}) recipients"
                self._refuse(
                    Verdict(Action.TEMPFAIL, 0.0, (), replies.TOO_MANY_RECIPIENTS, too_many),
                    Stage.RCPT,
                )
                continue
            got = await self.run(Stage.RCPT, rcpt) if rcpt is not None else []
            domain = rcpt.address.rpartition("@")[2].lower() if rcpt is not None else None
            # Judged by its own RCPT results, as the session judges: the kept ones of an
            # earlier recipient (its list entry, its greylisting) speak for that one only.
            others = [r for r in self.kept if r.check not in self.per_rcpt]
            verdict = decide([*others, *got], self.policy, Stage.RCPT, domain)
            if verdict.refuses and verdict.reply is not None:
                self._refuse(verdict, Stage.RCPT)
                continue
            seen = {r.check for r in self.kept}
            self.kept.extend(r for r in got if r.check not in seen)
            if rcpt is not None:
                self.envelope.recipients.append(rcpt)

    async def data(self, message: MessageBuffer) -> None:
        """The DATA checks, and the session's verdict after DATA (if nothing refused).

        A message the session refuses for its bytes (over ``max_message_size``, a line
        over 998 octets, a header block over its limit, a folded first line) gets that
        refusal, before the verdict; its checks still run, for the explanation.
        """
        content_refused = self._content_refusal(message)
        if content_refused is not None:
            self._refuse(
                Verdict(Action.REJECT, 0.0, (), content_refused, content_refused.text), Stage.DATA
            )
        accepted = self.envelope.recipients
        self.envelope.recipients = list(self.all_rcpts)  # what the checks see: all of them
        self.kept.extend(await self.run(Stage.DATA, message=message))
        domain = common_override_domain(self.policy, accepted)
        self.final = decide_after_data(self.kept, self.policy, domain, self.before_data)
        if self.final.refuses and self.final.reply is not None:
            self._refuse(self.final, Stage.DATA)

    def _content_refusal(self, message: MessageBuffer) -> Reply | None:
        """What the session's DATA reader and message buffer would refuse the content for."""
        reader = DataReader(self.policy.server.max_message_size)
        content = message.content()
        if content and not content.endswith(CRLF):
            content += CRLF
        reader.feed(stuff(content) + b".\r\n")
        refusal = content_refusal(reader.problems)
        if refusal is None and message.header_overflow:
            refusal = replies.HEADER_TOO_BIG
        if refusal is None and message.starts_folded:
            refusal = replies.FOLDED_FIRST_LINE
        return refusal

    def _refuse(self, verdict: Verdict, stage: Stage) -> None:
        """Remember the first refusal: the one the client would hear."""
        if self.refusal is None:
            self.refusal = (verdict, stage)

    def outcome(self, enabled: tuple[str, ...]) -> DryRun:
        """The live verdict and reply, with every result and the header we would add."""
        assert self.final is not None, "data() runs before outcome()"
        domain = common_override_domain(self.policy, self.all_rcpts)
        complete = decide(self.everything, self.policy, Stage.DATA, domain)
        header = authresults.build({r.check: r for r in self.everything}, self.policy.authserv_id)
        ar = header.decode().replace("\r\n\t", " ").strip()
        if self.refusal is not None:
            verdict, stage = self.refusal
            reply = verdict.reply if verdict.reply is not None else _accepted()
        else:
            verdict, stage, reply = self.final, Stage.DATA, _accepted()
        return DryRun(verdict, reply, stage, self.everything, False, ar, complete, enabled)


def _trusted(found: DryRun) -> DryRun:
    """A trusted client: a live session runs no check, adds no header and accepts.

    The checks still ran here, for the admin's information: their results, symbols and
    the header they would make are shown (``trusted`` says none of it applies), while
    the verdict and the reply are the live session's.
    """
    v = Verdict(Action.ACCEPT, 0.0, (), None, "trusted client")
    return replace(found, verdict=v, reply=_accepted(), stage=Stage.DATA, trusted=True)


def _accepted() -> Reply:
    return replies.OK.with_text("Ok: would be relayed to the upstream")
