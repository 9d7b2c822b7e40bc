"""The admin's allow and block list files (``[lists]``), at MAIL and per RCPT (L3).

Two checks share the parsed files:

- ``lists`` at MAIL: the client (address, then verified reverse name) against
  ``allow_clients``/``block_clients``, the envelope sender against
  ``allow_senders``/``block_senders``. One run with everything known at MAIL is
  cheaper and simpler than a client half at connect: a pre-DATA refusal is
  answered at RCPT anyway, so that the envelope is logged.
- ``lists_rcpt`` at RCPT: each recipient against ``block_recipients``; a blocked
  recipient is refused alone, the others of the transaction go on.

Outcomes:

- Blocked: result ``fail``, symbol ``LIST_BLOCK_CLIENT``/``LIST_BLOCK_SENDER``/
  ``LIST_BLOCK_RECIPIENT`` and a hard reject (``550 5.7.1 Access denied``). The
  reply never names the list; the reason (file, line, entry) goes to the log.
- Allowed: result ``pass``, symbol ``LIST_ALLOW_CLIENT``/``LIST_ALLOW_SENDER`` (a
  large negative score by default) and ``data["allowlisted"] = True``, which the
  greylist check reads like a DNSWL listing.
- Neither: ``none``, no symbols.

Precedence: an allow entry is an exception to a block entry *of the same pair*
(``block 192.0.2.0/24`` with ``allow 192.0.2.10``), because that is the only way
to carve a hole in a wide block. Across pairs a block wins: a backup MX on the
client allow list still must not bring a blocked sender in, and a blocked client
does not get in by claiming an allowed sender. When anything blocks, no allow
symbol is reported, so that monitor mode does not net the scores to zero.

Senders are forgeable, so an ``allow_senders`` entry counts only when SPF passed
for the MAIL FROM domain (``allow_senders_require_spf``, on by default), and only
for a spelling of the sender in that very domain (an unwrapped SRS address names
another domain, one SPF did not vouch for). Block entries need no proof: a forger
claiming a blocked sender only hurts itself.

The lists are parsed once per policy load (the loader validates them, which fills
the cache in :mod:`filter.lists`); :func:`list_checks` hands the parsed lists to
the check instances, so a session keeps the lists of the policy it started with
and a message never touches the disk.

Result ``data``: ``allowlisted`` (bool), ``outcome`` ("blocked", "allowed",
"none"), ``reason``, ``matched`` (``path:line (entry)`` per list that matched).
"""

from __future__ import annotations

from dataclasses import dataclass

from filter import replies
from filter.checks import Check, Context
from filter.domains import to_a_label
from filter.lists import (
    AddressList,
    ClientList,
    Entry,
    load_addresses,
    load_clients,
    recipient_forms,
    sender_forms,
)
from filter.model import Stage
from filter.policy.schema import Policy
from filter.results import Action, CheckResult, Decision, Symbol

__all__ = ["ListSet", "ListsCheck", "RecipientListsCheck", "list_checks", "load_list_set"]


@dataclass(frozen=True)
class ListSet:
    """The parsed files of one policy; None for a list that is not configured."""

    allow_clients: ClientList | None = None
    block_clients: ClientList | None = None
    allow_senders: AddressList | None = None
    block_senders: AddressList | None = None
    block_recipients: AddressList | None = None
    allow_senders_require_spf: bool = True


def load_list_set(policy: Policy) -> ListSet:
    """The policy's list files, parsed (from the cache when unchanged).

    OSError or ``filter.lists.ListFileError`` when a file went missing or bad since
    the loader checked it; a reload that meets this is refused like a policy error.
    """
    cfg = policy.lists

    def clients(path: str, allow: bool) -> ClientList | None:
        return load_clients(path, allow=allow) if path else None

    def addresses(path: str, allow: bool) -> AddressList | None:
        return load_addresses(path, allow=allow) if path else None

    return ListSet(
        allow_clients=clients(cfg.allow_clients, True),
        block_clients=clients(cfg.block_clients, False),
        allow_senders=addresses(cfg.allow_senders, True),
        block_senders=addresses(cfg.block_senders, False),
        block_recipients=addresses(cfg.block_recipients, False),
        allow_senders_require_spf=cfg.allow_senders_require_spf,
    )


def list_checks(policy: Policy) -> list[Check]:
    """The list checks this policy needs (none when ``[lists]`` is off or names no file)."""
    if not policy.lists.enabled:
        return []
    lists = load_list_set(policy)
    checks: list[Check] = []
    # An empty list (the shipped examples are all comments) matches nothing: no check.
    if lists.allow_clients or lists.block_clients or lists.allow_senders or lists.block_senders:
        checks.append(ListsCheck(lists))
    if lists.block_recipients:
        checks.append(RecipientListsCheck(lists.block_recipients))
    return checks


def _spf_domain(ctx: Context) -> str | None:
    """The A-label MAIL FROM domain SPF passed for, or None.

    A HELO pass names the host, not the sender's organisation, so it does not count.
    """
    spf = ctx.results.get("spf")
    if spf is None or spf.result != "pass" or spf.data.get("identity") != "mailfrom":
        return None
    return to_a_label(str(spf.data.get("domain") or ""))


def _symbol(ctx: Context, name: str, detail: str) -> Symbol:
    return Symbol(name, ctx.policy.score(name), detail)


def _reject(check: str, symbol: Symbol, matched: dict[str, str]) -> CheckResult:
    decision = Decision(Action.REJECT, replies.ACCESS_DENIED, symbol.detail)
    data = {"allowlisted": False, "outcome": "blocked", "reason": symbol.detail}
    return CheckResult(check, "fail", (symbol,), decision, {**data, "matched": matched})


class ListsCheck:
    """Client and sender allow/block lists, once per transaction at MAIL."""

    name = "lists"
    stage = Stage.MAIL

    def __init__(self, lists: ListSet) -> None:
        self.lists = lists
        # Only an SPF-gated sender allow list has to wait for SPF's answer.
        needs_spf = bool(lists.allow_senders) and lists.allow_senders_require_spf
        self.needs: tuple[str, ...] = ("spf",) if needs_spf else ()

    async def run(self, ctx: Context) -> CheckResult:
        lists = self.lists
        client = ctx.client
        mail_from = ctx.envelope.mail_from if ctx.envelope is not None else ""
        forms = sender_forms(mail_from)
        matched: dict[str, str] = {}

        def find(key: str, entry: Entry | None) -> Entry | None:
            if entry is not None:
                matched[key] = str(entry)
            return entry

        def client_in(lst: ClientList | None, key: str) -> Entry | None:
            return find(key, lst.match(client.ip, client.hostname)) if lst else None

        allow_client = client_in(lists.allow_clients, "allow_clients")
        block_client = client_in(lists.block_clients, "block_clients")
        block_sender = (
            find("block_senders", lists.block_senders.match(forms)) if lists.block_senders else None
        )
        allow_sender, unverified = self._allowed_sender(ctx, forms)
        find("allow_senders", allow_sender)

        who = f"client {client.ip}" + (f" ({client.hostname})" if client.hostname else "")
        sender = f"sender <{mail_from}>"
        if block_client is not None and allow_client is None:
            sym = _symbol(ctx, "LIST_BLOCK_CLIENT", f"{who} is block-listed at {block_client}")
            return _reject(self.name, sym, matched)
        if block_sender is not None and allow_sender is None:
            sym = _symbol(ctx, "LIST_BLOCK_SENDER", f"{sender} is block-listed at {block_sender}")
            return _reject(self.name, sym, matched)
        symbols = []
        if allow_client is not None:
            symbols.append(
                _symbol(ctx, "LIST_ALLOW_CLIENT", f"{who} is allow-listed at {allow_client}")
            )
        if allow_sender is not None:
            symbols.append(
                _symbol(ctx, "LIST_ALLOW_SENDER", f"{sender} is allow-listed at {allow_sender}")
            )
        reasons = [s.detail for s in symbols]
        if unverified:
            reasons.append(unverified)
        data: dict[str, object] = {
            "allowlisted": bool(symbols),
            "outcome": "allowed" if symbols else "none",
            "reason": "; ".join(reasons) or "on no list",
            "matched": matched,
        }
        return CheckResult(self.name, "pass" if symbols else "none", tuple(symbols), None, data)

    def _allowed_sender(self, ctx: Context, forms: list[str]) -> tuple[Entry | None, str]:
        """(the allow entry that counts, or None; why a match did not count, or "")."""
        lst = self.lists.allow_senders
        if not lst or not forms:
            return None, ""
        entry = lst.match(forms)
        if entry is None or not self.lists.allow_senders_require_spf:
            return entry, ""
        domain = _spf_domain(ctx)
        vouched = [f for f in forms if domain and f.rpartition("@")[2] == domain]
        proven = lst.match(vouched)
        if proven is None:
            return None, f"sender matches {entry} but SPF did not pass for its domain"
        return proven, ""


class RecipientListsCheck:
    """``block_recipients``: each RCPT on its own; a listed one is refused alone."""

    name = "lists_rcpt"
    stage = Stage.RCPT
    needs: tuple[str, ...] = ()

    def __init__(self, recipients: AddressList) -> None:
        self.recipients = recipients

    async def run(self, ctx: Context) -> CheckResult:
        if ctx.recipient is None:
            raise RuntimeError("lists_rcpt runs at RCPT and needs the recipient")
        address = ctx.recipient.address
        entry = self.recipients.match(recipient_forms(address))
        if entry is None:
            data = {"allowlisted": False, "outcome": "none", "reason": "on no list"}
            return CheckResult(self.name, "none", (), None, data)
        detail = f"recipient <{address}> is block-listed at {entry}"
        sym = _symbol(ctx, "LIST_BLOCK_RECIPIENT", detail)
        return _reject(self.name, sym, {"block_recipients": str(entry)})
