"""One SMTP session's meaning: stages -> checks -> verdict -> relay -> reply (L4).

The front end parses bytes into commands and calls these methods; this module
decides what they mean and what the client hears. It knows nothing about sockets:
the upstream is anything with the ``UpstreamPort`` shape (the relay provides it).

The rules that keep mail safe live here:
- a ``250`` for a message is the upstream's own ``250``, never ours;
- MAIL and RCPT reach the upstream only after mailgate's checks for that stage;
- DATA reaches the upstream only after the verdict; a refused message is never
  completed upstream (RSET, or the connection is dropped);
- any upstream failure becomes ``451 4.3.0`` (``421`` where the session must end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from filter import authresults, dkimkeys, logs, replies, verdictlog
from filter.checks import Context
from filter.checks.arc import ARCSealError, seal_message
from filter.checks.rdns import xclient_name, xclient_reverse_name
from filter.dmarc import author_domain
from filter.headers import render_field
from filter.logs import event
from filter.message import MessageBuffer
from filter.metrics import Metrics
from filter.model import ClientInfo, Envelope, Recipient, Stage, UpstreamError
from filter.netaddr import ip_in, normalize_ip
from filter.pipeline import Pipeline
from filter.policy.schema import Policy
from filter.replies import Reply
from filter.resolver import Resolver
from filter.results import Action, CheckResult
from filter.smtpdata import DataProblems
from filter.smtpsyntax import (
    PathArg,
    SyntaxProblem,
    dsn_problem,
    is_domain_or_literal,
    parse_path,
)
from filter.store import Store
from filter.verdict import Verdict, decide, decide_after_data
from filter.xtext import parse_attributes

log = logging.getLogger("mailgate.session")

#: Commands that move no mail a session may send before each counts as an error
#: (Postfix's smtpd_junk_command_limit default).
JUNK_COMMAND_LIMIT = 100

_QUEUE_ID = re.compile(r"queued as ([A-Za-z0-9]+)")
# Headers mailgate owns on accepted mail; copies arriving from outside are dropped.
OWN_HEADERS = (b"x-spam-flag", b"x-spam-score", b"x-spam-status", b"x-mailgate-id")
# RCPTs past server.max_recipients get 452 (RFC 5321 4.5.3.1.10: the client delivers to
# those accepted, then sends the rest in a new transaction). Like Postfix's
# smtpd_recipient_overshoot_limit, only this many of them go free of the error count.
RECIPIENT_OVERSHOOT = 1000


class UpstreamPort(Protocol):
    """The relay as the session sees it (see ``filter.relay.Upstream``)."""

    in_transaction: bool

    @property
    def is_open(self) -> bool: ...
    async def open(
        self, xclient: Mapping[str, str] | None, xforward: Mapping[str, str] | None
    ) -> None: ...
    async def mail(self, address: str, params: Iterable[str]) -> Reply: ...
    async def rcpt(self, address: str, params: Iterable[str]) -> Reply: ...
    async def noop(self) -> Reply: ...
    async def data(self, chunks: Iterable[bytes]) -> Reply: ...
    async def rset(self) -> None: ...
    async def quit(self) -> None: ...
    def abort(self) -> None: ...


@dataclass
class Transaction:
    envelope: Envelope
    results: list[CheckResult] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    upstream_failed: bool = False
    overshoot: int = 0  # RCPTs answered 452 past server.max_recipients
    # Recipients the upstream accepted and we then refused (greylisting runs after the
    # upstream's RCPT): they must be taken out upstream before the message goes.
    phantoms: list[Recipient] = field(default_factory=list)


def new_session_id() -> str:
    """Short random id carried in logs, in headers and to Postfix."""
    return secrets.token_hex(6).upper()


class Session:
    """The state and rules of one client connection."""

    def __init__(
        self,
        client: ClientInfo,
        policy: Policy,
        pipeline: Pipeline,
        upstream_factory: Callable[[], UpstreamPort],
        metrics: Metrics,
        extensions: Callable[[], Mapping[str, str]],
        resolver: Resolver | None = None,
        store: Store | None = None,
    ) -> None:
        self.resolver = resolver
        self.store = store
        self._background: set[asyncio.Task[None]] = set()
        self.client = client
        self.policy = policy
        self.pipeline = pipeline
        # Checks judged per recipient: their results speak for one recipient only.
        self._per_rcpt = frozenset(c.name for c in pipeline.checks if c.stage is Stage.RCPT)
        # Checks whose refusals each RCPT applied (or not) under its recipient's override.
        self._before_data = frozenset(c.name for c in pipeline.checks if c.stage < Stage.DATA)
        self._new_upstream = upstream_factory
        self.metrics = metrics
        self._upstream_extensions = extensions
        self.upstream: UpstreamPort | None = None
        self._upstream_identity: tuple[object, ...] | None = None
        self.session_results: dict[Stage, list[CheckResult]] = {}
        self.txn: Transaction | None = None
        self.helo_seen = False
        self.esmtp = False
        self.errors = 0
        self.junk = 0  # commands that move no mail (see count_junk)
        self.messages = 0
        self._identity_dirty = True  # connect/helo checks must (re)run for this identity
        self._peer_allowed_xforward = False  # set by allow_xforward() for xforward_hosts
        self._name_for_upstream = "[UNAVAILABLE]"  # XCLIENT NAME: verified name or a [..] word
        # XCLIENT REVERSE_NAME: the PTR name, verified or not; None: not known (XFORWARD)
        self._reverse_name_for_upstream: str | None = "[UNAVAILABLE]"
        self._connect_task: asyncio.Task[None] | None = None
        # Upstream keep-alive while a transaction waits on the client (see _keepalive_due).
        self._keepalive: asyncio.TimerHandle | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._upstream_busy = False
        self._upstream_last = 0.0
        self.client.trusted = ip_in(client.ip, policy.server.trusted_networks)
        self.hostname = policy.server.effective_hostname

    # -- identity and session-level checks -------------------------------------------------
    def allow_xforward(self, peer_ip: str) -> None:
        """Front end: the socket peer is one of ``server.xforward_hosts``."""
        self._peer_allowed_xforward = ip_in(peer_ip, self.policy.server.xforward_hosts)

    def start_connect_checks(self) -> None:
        """Start connect-stage checks (rDNS, DNSBL) alongside the greeting.

        They run while the client reads the banner and says EHLO; the first command
        that needs their results waits for them (``_connect_done``).
        """
        if self.client.trusted or not self.pipeline.has_stage(Stage.CONNECT):
            self.session_results[Stage.CONNECT] = []  # nothing to run: no task to start
            return
        loop = asyncio.get_running_loop()
        self._connect_task = loop.create_task(self._run_identity_stages(through=Stage.CONNECT))

    async def _connect_done(self) -> None:
        task, self._connect_task = self._connect_task, None
        if task is not None:
            await task

    async def _run_identity_stages(self, through: Stage) -> None:
        if self.client.trusted:
            self._identity_dirty = False
            return
        for stage in (Stage.CONNECT, Stage.HELO):
            if stage > through:
                break
            if stage in self.session_results:
                # Done for this identity: a new identity (XFORWARD) clears the results,
                # a new HELO name drops the HELO stage's, so whatever is left is current.
                continue
            if stage is Stage.HELO and not self.client.helo:
                continue
            if not self.pipeline.has_stage(stage):
                self.session_results[stage] = []
                continue
            self.session_results[stage] = await self.pipeline.run(stage, self._context())
            if stage is Stage.CONNECT:
                self._learn_client_name()
        if through >= Stage.HELO:
            self._identity_dirty = False

    def _learn_client_name(self) -> None:
        """Postfix semantics: the client's name is its forward-confirmed reverse name."""
        rdns = next(
            (r for r in self.session_results.get(Stage.CONNECT, []) if r.check == "rdns"), None
        )
        self._name_for_upstream = xclient_name(rdns)
        self._reverse_name_for_upstream = xclient_reverse_name(rdns)
        if rdns is not None and not self._name_for_upstream.startswith("["):
            self.client.hostname = self._name_for_upstream

    def _context(
        self,
        envelope: Envelope | None = None,
        recipient: Recipient | None = None,
        message: MessageBuffer | None = None,
    ) -> Context:
        results = {r.check: r for rs in self.session_results.values() for r in rs}
        if self.txn:
            results.update({r.check: r for r in self.txn.results})
        return Context(
            client=self.client,
            policy=self.policy,
            results=results,
            envelope=envelope,
            recipient=recipient,
            message=message,
            resolver=self.resolver,
            store=self.store,
        )

    # -- commands ------------------------------------------------------------------------------
    def ehlo_extensions(self, tls_available: bool) -> list[str]:
        """What we advertise: only what we handle and the upstream honours."""
        upstream = self._upstream_extensions()
        ext = ["PIPELINING", f"SIZE {self.size_limit(upstream)}"]
        if tls_available and not self.client.tls:
            ext.append("STARTTLS")
        ext += ["ENHANCEDSTATUSCODES", "8BITMIME"]
        if "DSN" in upstream:
            ext.append("DSN")
        if "SMTPUTF8" in upstream:
            ext.append("SMTPUTF8")
        if self._peer_allowed_xforward:
            ext.append("XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
        return ext

    def size_limit(self, upstream: Mapping[str, str]) -> int:
        """The message size we can take: ours, or the upstream's if that is smaller.

        RFC 1870: SIZE advertises what the server will accept. Promising
        ``server.max_message_size`` in front of a Postfix with a smaller
        ``message_size_limit`` makes a client upload a message only to have it refused.
        """
        ours = self.policy.server.max_message_size
        theirs = upstream.get("SIZE", "").strip()
        if theirs.isascii() and theirs.isdigit() and 0 < int(theirs) < ours:
            return int(theirs)  # "SIZE 0" or a bare "SIZE": the upstream names no limit
        return ours

    async def helo(self, verb: str, name: str, tls_available: bool) -> Reply:
        if not name or not name.isprintable() or any(c.isspace() for c in name):
            # One domain or address literal (RFC 5321 4.1.1.1). A tab got 250 here and
            # then 451 at every MAIL: the relay never sends a control character upstream.
            # Nor an ESC, a C1 control or a bidi override: no host name holds one.
            return self._error(replies.syntax(f"{verb} hostname"))
        if len(name) > 255:
            return self._error(replies.syntax(f"{verb} hostname"))
        await self._connect_done()
        await self._end_transaction()
        self.helo_seen = True
        self.esmtp = verb == "EHLO"
        if self.client.source != "xforward" or not self.client.helo:
            self.client.helo = name
            self.client.proto = "ESMTP" if self.esmtp else "SMTP"
            self.session_results.pop(Stage.HELO, None)
        if not is_domain_or_literal(name):
            log.debug("session=%s non-FQDN HELO %r", self.client.session_id, name)
        await self._run_identity_stages(through=Stage.HELO)
        if not self.esmtp:
            return Reply(250, "", self.hostname)
        lines = [self.hostname, *self.ehlo_extensions(tls_available)]
        return Reply(250, "", "\n".join(lines))

    def xforward(self, arg: str) -> Reply:
        """Postfix's before-queue proxy tells us the real client (filter mode)."""
        if not self._peer_allowed_xforward:
            return self._error(Reply(550, "5.7.0", "Error: insufficient authorization"))
        if self.txn is not None:
            return self._error(Reply(503, "5.5.1", "Error: XFORWARD not allowed in a transaction"))
        try:
            attrs = parse_attributes(arg)
        except ValueError as exc:
            return self._error(Reply(501, "5.5.4", f"Bad XFORWARD attribute: {exc}"))
        if not attrs:
            return self._error(replies.syntax("XFORWARD attribute=value..."))
        if any(_CONTROL.search(value) for value in attrs.values()):
            # A decoded value (xtext: "+0D+0A") would otherwise carry a line break
            # into our Authentication-Results field (smtp.helo) and the log.
            return self._error(Reply(501, "5.5.4", "Bad XFORWARD attribute: control character"))
        c = self.client
        for key, value in attrs.items():
            unavailable = value.startswith("[") and value.upper() in (
                "[UNAVAILABLE]",
                "[TEMPUNAVAIL]",
            )
            if key == "ADDR" and not unavailable:
                raw = value[5:] if value.upper().startswith("IPV6:") else value
                try:
                    c.ip = normalize_ip(raw)
                except ValueError:
                    return self._error(Reply(501, "5.5.4", "Bad XFORWARD ADDR syntax"))
            elif key == "NAME":
                c.hostname = None if unavailable else value.lower().rstrip(".")
                # Postfix verified it; pass its word on as is ([TEMPUNAVAIL] included).
                self._name_for_upstream = value if unavailable else c.hostname or value
                self._reverse_name_for_upstream = None  # XFORWARD has no reverse name
            elif key == "HELO":
                c.helo = None if unavailable else value
            elif key == "PROTO" and not unavailable:
                c.proto = value.upper()
            elif key == "PORT" and value.isdigit():
                c.port = int(value)
        if self._connect_task is not None:
            # Checks of the previous identity (Postfix itself) must not land later.
            self._connect_task.cancel()
            self._connect_task = None
        c.source = "xforward"
        c.trusted = ip_in(c.ip, self.policy.server.trusted_networks)
        self._identity_dirty = True
        self.session_results.clear()
        return replies.OK

    async def mail(self, arg: str) -> Reply:
        if not self.helo_seen:
            return self._error(replies.NEED_HELO)
        if self.txn is not None:
            return self._error(replies.NESTED_MAIL)
        try:
            path = parse_path(arg, "FROM")
        except SyntaxProblem as exc:
            return self._error(Reply(501, "5.5.4", f"Syntax: MAIL FROM:<address> ({exc})"))
        problem = self._check_mail_params(path)
        if problem is not None:
            return self._error(problem)
        await self._connect_done()
        if self._identity_dirty:
            await self._run_identity_stages(through=Stage.HELO)
        envelope = Envelope(
            mail_from=path.address,
            mail_params=list(path.raw_params),
            message_id=f"{self.client.session_id}.{self.messages + 1}",
            smtputf8="SMTPUTF8" in path.params,
        )
        txn = Transaction(envelope)
        self.txn = txn
        if not self.client.trusted and self.pipeline.has_stage(Stage.MAIL):
            txn.results += await self.pipeline.run(Stage.MAIL, self._context(envelope=envelope))
        reply = await self._upstream_call("mail", lambda up: self._send_mail(up, path))
        if reply.code != 250:
            self.txn = None
            self._count_upstream_refusal(reply)
        return reply

    async def _send_mail(self, up: UpstreamPort, path: PathArg) -> Reply:
        """MAIL to the upstream, unless its connection, just opened, took away a parameter.

        EHLO was answered from what the upstream offered last time (its connection
        opens only at MAIL); if it stopped offering SMTPUTF8 or DSN meanwhile (a Postfix
        reconfigured), the parameter is refused here as the upstream would refuse it,
        not sent to a server that never offered it. One session late at most.
        """
        problem = self._check_mail_params(path)
        if problem is not None:
            return problem
        return await up.mail(path.address, path.raw_params)

    def _check_mail_params(self, path: PathArg) -> Reply | None:
        upstream = self._upstream_extensions()
        for key, value in path.params.items():
            if key == "SIZE":
                # ASCII digits only (RFC 1870 size-value): str.isdigit() also takes
                # "²", which int() refuses, and Arabic-Indic digits, which it reads.
                if value is None or not (value.isascii() and value.isdigit()):
                    return replies.syntax("SIZE=<number>")
                if int(value) > self.size_limit(upstream):
                    return replies.MESSAGE_TOO_BIG
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    # As Postfix words it: "BODY" alone, not "BODY=None".
                    return replies.bad_parameter("BODY" if value is None else f"BODY={value}")
            elif key == "SMTPUTF8":
                if "SMTPUTF8" not in upstream or value is not None:
                    return replies.bad_parameter("SMTPUTF8")
            elif key in ("RET", "ENVID") and "DSN" in upstream:
                if value is None:
                    return replies.syntax(f"{key}=<value>")
                problem = dsn_problem(key, value)
                if problem is not None:
                    return Reply(501, "5.5.4", f"Error: {problem}")
            else:
                return replies.bad_parameter(key)
        if not path.address.isascii() and "SMTPUTF8" not in path.params:
            return Reply(553, "5.6.7", "Error: SMTPUTF8 is required for this address")
        return None

    async def rcpt(self, arg: str) -> Reply:
        txn = self.txn
        if txn is None:
            return self._error(replies.NEED_MAIL)
        if txn.upstream_failed:
            return self._error(replies.UPSTREAM_UNAVAILABLE)
        if len(txn.envelope.recipients) >= self.policy.server.max_recipients:
            txn.overshoot += 1
            if txn.overshoot > RECIPIENT_OVERSHOOT:
                return self._error(replies.TOO_MANY_RECIPIENTS)
            return replies.TOO_MANY_RECIPIENTS  # not the client's error (RFC 5321 4.5.3.1.10)
        try:
            path = parse_path(arg, "TO")
        except SyntaxProblem as exc:
            return self._error(Reply(501, "5.5.4", f"Syntax: RCPT TO:<address> ({exc})"))
        if not path.address:
            return self._error(Reply(501, "5.1.3", "Error: null recipient"))
        upstream = self._upstream_extensions()
        for key, value in path.params.items():
            if key not in ("NOTIFY", "ORCPT") or "DSN" not in upstream or value is None:
                return self._error(replies.bad_parameter(key))
            problem = dsn_problem(key, value, txn.envelope.smtputf8)
            if problem is not None:
                return self._error(Reply(501, "5.5.4", f"Error: {problem}"))
        if not path.address.isascii() and not txn.envelope.smtputf8:
            return self._error(Reply(553, "5.6.7", "Error: SMTPUTF8 is required for this address"))
        recipient = Recipient(path.address, list(path.raw_params))
        judged = not self.client.trusted
        early: list[CheckResult] = []
        late_checks = False
        ctx = self._context(envelope=txn.envelope, recipient=recipient)
        if judged:
            if self.pipeline.has_stage(Stage.RCPT, late=False):
                early = await self.pipeline.run(Stage.RCPT, ctx, late=False)
            late_checks = self.pipeline.has_stage(Stage.RCPT, late=True)
            refusal = self._judge_rcpt(early, recipient, final=not late_checks)
            if refusal is not None:
                return refusal
        reply = await self._upstream_call("rcpt", lambda up: up.rcpt(path.address, path.raw_params))
        if reply.code != 250 and reply.code != 251:
            self._count_upstream_refusal(reply)
            if judged and late_checks:
                self._count_would(self._rcpt_verdict(early, recipient))
            return reply
        if judged and late_checks:
            late = await self.pipeline.run(Stage.RCPT, ctx, late=True)
            refusal = self._judge_rcpt(early + late, recipient, final=True)
            if refusal is not None:
                # The upstream holds this recipient now; the message must not reach
                # it: the final dot replays the transaction without it.
                txn.phantoms.append(recipient)
                return refusal
            early += late
        if judged:
            seen = {x.check for x in txn.results}
            txn.results += [r for r in early if r.check not in seen]
        txn.envelope.recipients.append(recipient)
        return reply

    def _rcpt_verdict(self, results: list[CheckResult], recipient: Recipient) -> Verdict:
        domain = _domain(recipient.address)
        # Judged by its own RCPT-stage results only: txn.results also holds those of the
        # first accepted recipient (kept for the verdict after DATA). Since greylisting
        # runs after the upstream's RCPT, a recipient judged before its own greylisting
        # (the early verdict, or the one for a recipient the upstream refused) otherwise
        # inherited that recipient's greylist result: an unknown user heard 451, not the
        # upstream's 550, when the earlier recipient's domain had greylisting off or in
        # monitor mode, and a would-greylist was counted for it.
        others = [r for r in self._all_results([]) if r.check not in self._per_rcpt]
        return decide(others + results, self.policy, Stage.RCPT, domain)

    def _judge_rcpt(
        self, results: list[CheckResult], recipient: Recipient, final: bool
    ) -> Reply | None:
        """The refusal for this recipient so far, or None; a would-action is counted
        once per recipient, on its last verdict (``final``) or on a refusal."""
        verdict = self._rcpt_verdict(results, recipient)
        if verdict.refuses and verdict.reply is not None:
            self._count_would(verdict)
            self._log_refusal(verdict, recipient)
            self.metrics.count_message(verdict.action.value)
            self.metrics.count_refusal("rcpt", verdict.decided_by, verdict.action.value)
            return self._error(verdict.reply)
        if final:
            self._count_would(verdict)
        return None

    def prefetch(self, message: MessageBuffer) -> None:
        """The header block is in: start DKIM key and DMARC lookups before the final dot.

        Fire and forget: the answers land in the resolver's cache, where the checks find
        them; any failure is met again (and reported) by the checks themselves.
        """
        if self.resolver is None or self.client.trusted:
            return
        p = self.policy
        if not (p.dkim.enabled or p.arc.enabled or p.dmarc.enabled):
            return  # nothing would use the answers
        resolver = self.resolver
        fields = message.headers()
        names: list[str] = []
        if p.dkim.enabled or p.arc.enabled:
            keys = dkimkeys.key_names(message.header_block, p.dkim.max_signatures, fields)
            for key in keys:
                with contextlib.suppress(UnicodeDecodeError):  # the check reports it
                    names.append(key.decode("utf-8"))
        if p.dmarc.enabled:
            author = author_domain(fields)
            if author.domain:
                names.append(f"_dmarc.{author.domain}")
        missing = [n for n in names if resolver.peek(n, "TXT") is None]
        if not missing:
            return  # all cached (the usual case): no task, no loop round trip
        task = asyncio.get_running_loop().create_task(self._prefetch(missing))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prefetch(self, names: list[str]) -> None:
        resolver = self.resolver
        assert resolver is not None
        with contextlib.suppress(Exception):
            await resolver.resolve_many([(n, "TXT") for n in names])

    def data_start(self) -> Reply:
        txn = self.txn
        if txn is None:
            return self._error(replies.NEED_MAIL)
        if txn.upstream_failed:
            return self._error(replies.UPSTREAM_UNAVAILABLE)
        if not txn.envelope.recipients:
            return self._error(replies.NEED_RCPT)
        return replies.START_DATA

    async def data_end(self, message: MessageBuffer, problems: DataProblems) -> Reply:
        """The whole message is in: judge it, then relay it or refuse it."""
        txn = self.txn
        assert txn is not None
        self.messages += 1
        t_checks = time.monotonic()
        verdict: Verdict | None = None
        try:
            self.metrics.message_size.observe(message.size)
            refusal = content_refusal(problems)
            if refusal is None and message.header_overflow:
                refusal = replies.HEADER_TOO_BIG  # fields past the limit would go unseen
            if refusal is None and message.starts_folded:
                refusal = replies.FOLDED_FIRST_LINE
            if refusal is None and txn.upstream_failed:
                # The connection carrying MAIL and RCPT went while the body came in
                # (counted where it failed): nothing to judge, nowhere to relay.
                self.errors += 1
                reply = replies.UPSTREAM_UNAVAILABLE
                self._log_message(txn, message, None, reply, "upstream_refused", t_checks)
                return reply
            if refusal is not None:
                await self._abort_upstream_txn()
                self._log_message(txn, message, None, refusal, "refused", t_checks)
                self.metrics.count_message(Action.REJECT.value)
                self.metrics.count_refusal("data", "message", Action.REJECT.value)
                return refusal
            arc_result: str | None = None  # the ARC check's word, which may be temperror
            if self.client.trusted:
                verdict = Verdict(Action.ACCEPT, 0.0, (), None, "trusted client")
                headers = b""  # trusted clients are not judged; nothing of ours is added
            else:
                if self.pipeline.has_stage(Stage.DATA):
                    ctx = self._context(envelope=txn.envelope, message=message)
                    txn.results += await self.pipeline.run(Stage.DATA, ctx)
                domain = common_override_domain(self.policy, txn.envelope.recipients)
                verdict = self._data_verdict(domain)
                self._count_would(verdict)
                final = {r.check: r for r in self._all_results([])}
                if "arc" in final:
                    arc_result = final["arc"].result
                headers = authresults.build(final, self.policy.authserv_id)
                headers += self._spam_headers(verdict, domain)
                # The id of our log line and of `mailgate explain`, for following one
                # message from mailgate's log into Postfix's queue and the mailbox.
                headers += render_field("X-Mailgate-ID", txn.envelope.message_id)
            t_checks = time.monotonic() - t_checks
            if verdict.refuses and verdict.reply is not None:
                await self._abort_upstream_txn()
                self.metrics.count_message(verdict.action.value)
                self.metrics.count_refusal("data", verdict.decided_by, verdict.action.value)
                self._log_message(txn, message, verdict, verdict.reply, "refused", t_checks)
                return verdict.reply
            authserv_id = self.policy.authserv_id

            def drop(name: bytes, raw: bytes) -> bool:
                # Forged A-R claiming our authserv-id go always (RFC 8601 section 5);
                # our X-Spam-* fields only where we add our own.
                if authresults.is_forged(name, raw, authserv_id):
                    return True
                return not self.client.trusted and name in OWN_HEADERS

            if not self.client.trusted and self.policy.arc.enabled and self.policy.arc.seal:
                headers = await self._arc_seal(message, drop, headers, arc_result) + headers
            if txn.phantoms:
                replayed = await self._replay_without_phantoms(txn)
                if replayed is not None:
                    self._log_message(txn, message, verdict, replayed, "upstream_refused", t_checks)
                    return replayed
            chunks = message.iter_chunks(prepend=headers, drop=drop)
            t_up = time.monotonic()
            reply = await self._upstream_call("data", lambda up: up.data(chunks))
            self.metrics.observe_upstream("data", time.monotonic() - t_up)
            outcome = "relayed" if reply.code == 250 else "upstream_refused"
            if reply.code == 250:
                self.metrics.count_message(verdict.action.value)
                # As Postfix's smtpd_hard_error_limit: errors count "without delivering
                # mail", so a client that delivers starts afresh (a list message with
                # stale addresses must not end the session for the next one).
                self.errors = 0
                self.junk = 0
            self._log_message(txn, message, verdict, reply, outcome, t_checks)
            return reply
        finally:
            # The transaction ends here whatever happened; until now checks and the
            # verdict needed its results (SPF at MAIL, per-recipient ones).
            self.txn = None
            self._stop_keepalive()
            message.close()

    async def _replay_without_phantoms(self, txn: Transaction) -> Reply | None:
        """Start the upstream transaction again with only the accepted recipients.

        The upstream accepted recipients that were then greylisted (``phantoms``); DATA
        now would deliver to them too, and the client, told 451, would send the message
        again. RSET, MAIL and the accepted RCPTs again (only mixed transactions pay
        this). If the upstream now answers anything else, the message is not relayed
        and the client hears ``451 4.3.0``: nothing is lost, it sends again later.
        """
        env = txn.envelope
        event(
            log,
            "upstream_replay",
            id=env.message_id,
            dropped=len(txn.phantoms),
            kept=len(env.recipients),
            session=self.client.session_id,
        )
        await self._abort_upstream_txn()
        reply = await self._upstream_call(
            "data", lambda up: up.mail(env.mail_from, env.mail_params)
        )
        for r in env.recipients:
            if reply.code != 250 and reply.code != 251:
                break
            reply = await self._upstream_call("data", _rcpt_call(r))
        if reply.code == 250 or reply.code == 251:
            txn.phantoms.clear()
            return None
        event(
            log,
            "replay_refused",
            logging.WARNING,
            message="upstream refused the replayed transaction",
            id=env.message_id,
            reply=str(reply),
            session=self.client.session_id,
        )
        await self._abort_upstream_txn()
        if not txn.upstream_failed:  # a lost connection was counted where it failed
            self.errors += 1
        return replies.UPSTREAM_UNAVAILABLE

    async def _arc_seal(
        self,
        message: MessageBuffer,
        drop: Callable[[bytes, bytes], bool],
        headers: bytes,
        arc_result: str | None,
    ) -> bytes:
        """Our ARC set (RFC 8617) over the message as it will be relayed; b"" if none.

        ``headers`` starts with our Authentication-Results field, which the seal records
        verbatim as ARC-Authentication-Results. A sealing problem never blocks
        delivery. No set where RFC 8617 says to add none (the ARC check's
        ``arc_result`` is temperror, a chain whose newest seal says cv=fail, a full
        chain): that is logged at info, as an expected outcome; a real sealing error
        (key, syntax) at warning. The temperror is decided here, not from the header:
        Authentication-Results writes it ``arc=fail`` (the contract's word), and a
        cv=fail set would end a chain that may still validate for every later hop.
        """
        if arc_result == "temperror":
            log.info(
                "session=%s ARC set not added: the chain could not be validated now "
                "(arc temperror); a cv=fail seal would end it",
                self.client.session_id,
            )
            return b""
        ar_end = headers.find(b"\r\n", headers.find(b"Authentication-Results:"))
        while ar_end >= 0 and headers[ar_end + 2 : ar_end + 3] in (b" ", b"\t"):
            ar_end = headers.find(b"\r\n", ar_end + 2)  # folded continuation lines
        ar_header = headers[: ar_end + 2]
        content = b"".join(message.iter_chunks(prepend=b"", drop=drop))
        try:
            return b"".join(await seal_message(content, ar_header, self.policy.arc))
        except (ARCSealError, ValueError) as exc:
            if isinstance(exc, ARCSealError) and exc.declined:  # ARCSealDeclined
                log.info("session=%s ARC set not added: %s", self.client.session_id, exc)
            else:
                log.warning("session=%s ARC sealing skipped: %s", self.client.session_id, exc)
            return b""

    async def rset(self) -> Reply:
        await self._end_transaction()
        return replies.RESET_OK

    async def close(self) -> None:
        """End of session: nothing unfinished may complete upstream."""
        await self._upstream_quiet()
        if self.upstream is not None:
            if self.upstream.in_transaction:
                self.upstream.abort()
            else:
                await self.upstream.quit()
            self.upstream = None

    def abort(self) -> None:
        """Client gone or timed out: drop the upstream connection without a word."""
        self._stop_keepalive()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()  # the connection is dropped below anyway
            self._keepalive_task = None
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self.txn = None

    # -- helpers -----------------------------------------------------------------------------
    def _error(self, reply: Reply) -> Reply:
        self.errors += 1
        return reply

    def count_junk(self) -> None:
        """One command that moves no mail (EHLO/HELO, RSET, NOOP, HELP, VRFY, ETRN).

        As Postfix's ``smtpd_junk_command_limit`` (100): past the limit each one counts
        as an error, so a client looping on them meets ``server.max_errors`` and its
        ``421`` instead of holding a session slot until ``session_timeout``; a loop of
        EHLOs would also re-run the HELO checks, DNS lookups included, every time.
        The count starts afresh after a delivered message, as the error count does.
        """
        self.junk += 1
        if self.junk > JUNK_COMMAND_LIMIT:
            self.errors += 1

    def _count_upstream_refusal(self, reply: Reply) -> None:
        """Count the upstream's 4xx/5xx to MAIL or RCPT as the client's error, once.

        ``UPSTREAM_UNAVAILABLE`` is mailgate's own reply to a failed conversation,
        already counted where it failed (``_upstream_exchange``); counting it again made
        a client retrying through an upstream outage hit ``server.max_errors`` at half
        the configured number of replies.
        """
        if reply.code >= 400 and reply is not replies.UPSTREAM_UNAVAILABLE:
            self.errors += 1

    async def _end_transaction(self) -> None:
        self._stop_keepalive()
        if self.txn is not None:
            self.txn = None
            await self._abort_upstream_txn()

    async def _abort_upstream_txn(self) -> None:
        await self._upstream_quiet()
        up = self.upstream
        if up is not None and up.is_open and up.in_transaction:
            # Busy while the RSET is on the wire, as in _upstream_call: the keep-alive
            # timer is still armed at the dot, and falling due now it would put a NOOP
            # beside the RSET (the replay's first command). The NOOP then read the
            # RSET's reply, the RSET's read was left waiting forever and the session hung.
            self._upstream_busy = True
            try:
                await up.rset()
            finally:
                self._upstream_busy = False
                self._upstream_last = time.monotonic()

    def _data_verdict(self, domain: str | None) -> Verdict:
        """The verdict after DATA, without enforcing again what each RCPT judged.

        Every recipient was judged at its RCPT under its own domain's override; the
        refusals known by then must not judge the whole message again (under the
        global policy when the overrides differ): see ``verdict.decide_after_data``.
        """
        return decide_after_data(self._all_results([]), self.policy, domain, self._before_data)

    def _all_results(self, extra: list[CheckResult]) -> list[CheckResult]:
        out = [r for rs in self.session_results.values() for r in rs]
        if self.txn:
            out += self.txn.results
        return out + extra

    def _identity(self) -> tuple[object, ...]:
        c = self.client
        return (c.ip, c.port, c.hostname, c.helo, c.proto)

    async def _ensure_upstream(self, stage: str) -> UpstreamPort:
        identity = self._identity()
        up = self.upstream
        if stage in ("rcpt", "data") and (
            up is None or not up.is_open or identity != self._upstream_identity
        ):
            # The MAIL (and RCPTs) this command belongs to went over a connection that
            # is gone. A new one would hold no transaction: its "503 need MAIL" would
            # reach the client as a permanent failure for mail that was never refused.
            raise UpstreamError(stage, "connection lost in the middle of the transaction")
        if up is not None and (not up.is_open or identity != self._upstream_identity):
            await up.quit()
            up = None
        if up is None:
            up = self._new_upstream()
            self.upstream = up
            xclient, xforward = self._introductions()
            t0 = time.monotonic()
            await up.open(xclient, xforward)
            self.metrics.observe_upstream("connect", time.monotonic() - t0)
            self._upstream_identity = identity
        return up

    def _introductions(self) -> tuple[dict[str, str] | None, dict[str, str] | None]:
        c = self.client
        addr = f"IPV6:{c.ip}" if ":" in c.ip else c.ip
        name = self._name_for_upstream
        helo = c.helo or "[UNAVAILABLE]"
        common = {"ADDR": addr, "NAME": name, "HELO": helo, "PROTO": c.proto}
        xclient: dict[str, str] | None = None
        if self.policy.upstream.xclient:
            xclient = {**common, "PORT": str(c.port)}
            if self._reverse_name_for_upstream is not None:
                # After NAME, which Postfix also copies into the reverse name when it is
                # a name; sent only where the upstream lists it (Postfix 2.9 and later).
                xclient["REVERSE_NAME"] = self._reverse_name_for_upstream
        xforward = {**common, "PORT": str(c.port), "IDENT": c.session_id, "SOURCE": "REMOTE"}
        if name == "[TEMPUNAVAIL]":
            # XCLIENT knows "the lookup failed, try later"; XFORWARD knows only
            # [UNAVAILABLE], and Postfix answers anything else "501 Bad NAME syntax":
            # every MAIL of a client with a broken reverse zone got 451.
            xforward["NAME"] = "[UNAVAILABLE]"
        return xclient, xforward

    async def _upstream_call(self, stage: str, call: Callable[[UpstreamPort], object]) -> Reply:
        if self._keepalive_task is not None:  # rare: a NOOP is on the wire
            await self._upstream_quiet()
        self._upstream_busy = True
        try:
            reply = await self._upstream_exchange(stage, call)
        finally:
            self._upstream_busy = False
            self._upstream_last = time.monotonic()
        up = self.upstream
        if self._keepalive is None and up is not None and up.in_transaction:
            self._arm_keepalive(self.policy.upstream.keepalive)
        return reply

    async def _upstream_exchange(self, stage: str, call: Callable[[UpstreamPort], object]) -> Reply:
        try:
            up = await self._ensure_upstream(stage)
            reply = await call(up)  # type: ignore[misc]
        except UpstreamError as exc:
            self.metrics.count_upstream_error(exc.stage)
            log.warning(
                "session=%s upstream failure stage=%s detail=%s",
                self.client.session_id,
                exc.stage,
                logs.kv(exc.detail),
            )
            if self.upstream is not None:
                self.upstream.abort()
                self.upstream = None
            if self.txn is not None:
                self.txn.upstream_failed = True
            self.errors += 1
            return replies.UPSTREAM_UNAVAILABLE
        assert isinstance(reply, Reply)
        if reply.code == 421 and self.upstream is not None:
            # filter.relay raises on 421 (counted above, at its exact stage); this is
            # for a port that returns it instead.
            self.metrics.count_upstream_error(stage)
            self.upstream.abort()
            self.upstream = None
            if self.txn is not None:
                self.txn.upstream_failed = True
            # The upstream is going away; the client keeps its session and retries later.
            # Its text stays in our log, not in the reply to a stranger.
            log.warning("session=%s upstream closing: %s", self.client.session_id, reply)
            self.errors += 1  # one error, as for a failure raised above
            return replies.UPSTREAM_UNAVAILABLE
        return reply

    # -- upstream keep-alive -----------------------------------------------------------------
    # A transaction's upstream connection is idle while the client sends the body and
    # the checks run; Postfix drops a client silent for smtpd_timeout (300 s, 10 s under
    # stress), and the RCPTs it accepted would be lost (``upstream.keepalive``).
    # One timer per transaction, armed after the MAIL the upstream accepted; when it
    # fires it looks at how long the connection has been idle and either sends a NOOP
    # or sleeps for the rest. Commands never wait on the timer, only on a NOOP already
    # in flight (_upstream_quiet), so the lockstep order on the wire is kept.
    def _arm_keepalive(self, delay: float) -> None:
        if self.policy.upstream.keepalive > 0:
            loop = asyncio.get_running_loop()
            self._keepalive = loop.call_later(max(delay, 0.05), self._keepalive_due)

    def _keepalive_due(self) -> None:
        self._keepalive = None
        up = self.upstream
        if up is None or not up.is_open or not up.in_transaction:
            return  # the transaction ended or the connection went; nothing to keep
        every = self.policy.upstream.keepalive
        idle = time.monotonic() - self._upstream_last
        if self._upstream_busy or idle < every:
            self._arm_keepalive(every if self._upstream_busy else every - idle)
            return
        self._keepalive_task = asyncio.get_running_loop().create_task(self._send_keepalive(up))

    async def _send_keepalive(self, up: UpstreamPort) -> None:
        """NOOP; a failure drops the connection, and the transaction's next command
        answers the client 451 (``_ensure_upstream``) instead of losing its place."""
        self._upstream_busy = True
        try:
            reply = await up.noop()
            problem = None if reply.code == 250 else f"NOOP answered {reply}"
        except UpstreamError as exc:
            problem = exc.detail
        finally:
            self._upstream_busy = False
            self._upstream_last = time.monotonic()
            self._keepalive_task = None
        if problem is not None:
            log.warning(
                "session=%s upstream failure stage=keepalive detail=%s",
                self.client.session_id,
                logs.kv(problem),
            )
            self.metrics.count_upstream_error("keepalive")
            up.abort()
            if self.txn is not None:
                self.txn.upstream_failed = True  # RCPT, DATA and the dot answer 451
            return
        if self._keepalive is None:
            self._arm_keepalive(self.policy.upstream.keepalive)

    async def _upstream_quiet(self) -> None:
        """Let a keep-alive NOOP in flight finish before the next command is written."""
        task = self._keepalive_task
        if task is not None:
            await asyncio.shield(task)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _count_would(self, verdict: Verdict) -> None:
        if verdict.would is not None:
            self.metrics.count_would_action(verdict.would.value)

    def _spam_headers(self, verdict: Verdict, domain: str | None = None) -> bytes:
        override = self.policy.override_for(domain)
        a = self.policy.actions
        required = a.add_header
        if override is not None and override.add_header is not None:
            required = override.add_header
        tests = ",".join(s.name for s in verdict.symbols) or "none"
        flag = "Yes" if verdict.action is Action.ADD_HEADER else "No"
        out = b""
        if verdict.action is Action.ADD_HEADER:
            out += render_field("X-Spam-Flag", "YES")
        out += render_field("X-Spam-Score", f"{verdict.score:g}")
        out += render_field(
            "X-Spam-Status",
            f"{flag}, score={verdict.score:g} required={required:g} tests={tests}",
        )
        return out

    def _log_refusal(self, verdict: Verdict, recipient: Recipient) -> None:
        txn = self.txn
        msg_id = txn.envelope.message_id if txn else f"{self.client.session_id}.0"
        fields: dict[str, object] = {
            "event": "rcpt_refused",
            "id": msg_id,
            "session": self.client.session_id,
            "client": self.client.ip,
            "helo": self.client.helo,
            "from": txn.envelope.mail_from if txn else "",
            "rcpt": recipient.address,
            "action": verdict.action.value,
            "score": verdict.score,
            "symbols": [s.name for s in verdict.symbols],
            "reason": verdict.reason,
            "reply": str(verdict.reply),
        }
        log.info("", extra={"mailgate_fields": fields})
        self._keep_for_explain(msg_id, fields, verdict)

    def _log_message(
        self,
        txn: Transaction,
        message: MessageBuffer,
        verdict: Verdict | None,
        reply: Reply,
        outcome: str,
        t_checks: float,
    ) -> None:
        m = _QUEUE_ID.search(reply.text) if reply.code == 250 else None
        env = txn.envelope
        fields: dict[str, object] = {
            "event": "message",
            "id": env.message_id,
            "session": self.client.session_id,
            "client": self.client.ip,
            "client_name": self.client.hostname,
            "helo": self.client.helo,
            "from": env.mail_from,
            "rcpts": [r.address for r in env.recipients],
            "size": message.size,
            "action": verdict.action.value if verdict else "reject",
            "score": verdict.score if verdict else None,
            "symbols": [s.name for s in verdict.symbols] if verdict else [],
            "outcome": outcome,
            "reply": str(reply),
            "queue_id": m.group(1) if m else None,
            "t_checks_ms": round(t_checks * 1000, 2),
            "t_total_ms": round((time.monotonic() - txn.started) * 1000, 2),
        }
        if verdict is not None and verdict.would is not None:
            fields["would"] = verdict.would.value
        log.info("", extra={"mailgate_fields": fields})
        self._keep_for_explain(env.message_id, fields, verdict)

    def _keep_for_explain(
        self, msg_id: str, fields: dict[str, object], verdict: Verdict | None
    ) -> None:
        """Keep the verdict in the store for `mailgate explain ID` (in the background)."""
        if self.store is None or self.policy.explain.keep <= 0:
            return
        record = verdictlog.build_record(fields, verdict)
        verdictlog.record_soon(
            self.store, msg_id, record, self.policy.explain.keep, self._background
        )


def _rcpt_call(recipient: Recipient) -> Callable[[UpstreamPort], object]:
    return lambda up: up.rcpt(recipient.address, recipient.params)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def common_override_domain(policy: Policy, recipients: Iterable[Recipient]) -> str | None:
    """The recipient domain whose [domains] override judges the message after DATA.

    One DATA serves every recipient, so an override applies only when all recipients
    fall under the same settings; otherwise the global policy judges (documented).
    Equal tables count as the same: two domains both in monitor mode are judged in
    monitor mode, not by the global policy.
    """
    domains = [_domain(r.address) for r in recipients]
    if not domains:
        return None
    first = policy.override_for(domains[0])
    if all(policy.override_for(d) == first for d in domains[1:]):
        return domains[0]
    return None


# C0, DEL, C1 and the Unicode line separators: what relay.py never sends upstream.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def content_refusal(problems: DataProblems) -> Reply | None:
    """The reply to a message whose bytes break a limit or the line rules, if any."""
    if problems.bare_newline:
        return replies.BARE_NEWLINE
    if problems.oversized:
        return replies.MESSAGE_TOO_BIG
    if problems.long_line:
        return replies.DATA_LINE_TOO_LONG
    return None
