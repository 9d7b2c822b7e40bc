"""Run the whole check pipeline on one stored message without delivering it (L4).

``mailgate check`` and (later) policy replay use this: the same checks, the same
verdict and the same reply a live session would produce, with ``dry_run`` set so no
check changes stored state (greylist triplets, rate counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from filter import authresults, replies
from filter.checks import Context
from filter.message import MessageBuffer
from filter.model import ClientInfo, Envelope, Recipient, Stage
from filter.netaddr import ip_in, normalize_ip
from filter.pipeline import Pipeline
from filter.policy.schema import Policy
from filter.replies import Reply
from filter.resolver import Resolver
from filter.results import CheckResult
from filter.session import common_override_domain
from filter.store import Store
from filter.verdict import Verdict, decide


@dataclass
class DryRun:
    """What a message would get: verdict, the reply, at which stage, and every result."""

    verdict: Verdict
    reply: Reply
    stage: Stage
    results: list[CheckResult] = field(default_factory=list)
    trusted: bool = False
    authentication_results: str = ""


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
    client = ClientInfo(ip=normalize_ip(ip), port=0, session_id="CHECK", helo=helo, proto="ESMTP")
    client.trusted = ip_in(client.ip, policy.server.trusted_networks)
    envelope = Envelope(mail_from=mail_from, message_id="CHECK.1")
    envelope.recipients = [Recipient(r) for r in rcpts]
    message = MessageBuffer()
    message.write(content)
    results: dict[str, CheckResult] = {}
    collected: list[CheckResult] = []
    try:
        if client.trusted:
            v = Verdict(decide([], policy, Stage.DATA).action, 0.0, (), None, "trusted client")
            return DryRun(v, _accepted(), Stage.DATA, [], True)
        for stage in Stage:
            if stage is Stage.HELO and not helo:
                continue
            targets: list[Recipient | None] = (
                list(envelope.recipients) if stage is Stage.RCPT else [None]
            )
            for rcpt in targets:
                ctx = Context(
                    client=client,
                    policy=policy,
                    results=results,
                    envelope=envelope if stage >= Stage.MAIL else None,
                    recipient=rcpt,
                    message=message if stage is Stage.DATA else None,
                    dry_run=True,
                    resolver=resolver,
                    store=store,
                )
                got = await pipeline.run(stage, ctx)
                collected.extend(got)
                rcpt_domain = rcpt.address.rpartition("@")[2] if rcpt is not None else None
                verdict = decide(collected, policy, stage, rcpt_domain)
                if verdict.refuses and verdict.reply is not None:
                    return DryRun(verdict, verdict.reply, stage, collected)
        verdict = decide(
            collected, policy, Stage.DATA, common_override_domain(policy, envelope.recipients)
        )
        header = authresults.build({r.check: r for r in collected}, policy.authserv_id)
        ar = header.decode().replace("\r\n\t", " ").strip()
        return DryRun(verdict, _accepted(), Stage.DATA, collected, False, ar)
    finally:
        message.close()


def _accepted() -> Reply:
    return replies.OK.with_text("Ok: would be relayed to the upstream")
