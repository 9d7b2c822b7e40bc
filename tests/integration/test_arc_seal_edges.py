"""ARC sealing through the proxy at its edges (RFC 8617 / RFC 8601).

A real mailgate with ``[arc] seal`` on, the loopback DNS server for the incoming
chain's keys (and for its failures), a scripted upstream that records what it was
handed, and dkimpy's ``arc_verify`` as the independent judge of the result. Incoming
chains are made with dkimpy's ``arc_sign``, as an intermediary would make them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import authres
import dkim
import pytest

from tests.integration.conftest import StartMailgate
from tests.rig.client import smtp_client
from tests.rig.dkimkeys import rsa_dkim_key
from tests.rig.dnsserver import Mode, ZoneDNSServer
from tests.rig.mailgate import MailgateProcess
from tests.rig.upstream import ScriptedUpstream

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: meeting notes\r\n"
    b"Message-ID: <edges.1@example.org>\r\n"
    b"\r\n"
    b"Notes attached.\r\n"
)
LIST_AR = b"Authentication-Results: lists.example.org; dkim=pass header.d=example.org\r\n"
LIST_KEY = "arc._domainkey.lists.example.org"
FWD_KEY = "fwd._domainkey.example.org"
SEAL_KEY = "seal._domainkey.mailgate.test"

Keys = dict[str, tuple[bytes, str]]


@pytest.fixture(scope="module")
def keys() -> Keys:
    """(PEM, key record) by key name: the list's, a forwarder's and mailgate's own."""
    return {name: rsa_dkim_key() for name in (LIST_KEY, FWD_KEY, SEAL_KEY)}


def hop(msg: bytes, ar: bytes, key_name: str, keys: Keys) -> bytes:
    """What an intermediary relays: its ARC set (dkimpy) + its A-R + the message."""
    selector, _, domain = key_name.partition("._domainkey.")
    srv_id = ar.split(b":", 1)[1].split(b";", 1)[0].strip()
    arc_set = dkim.arc_sign(ar + msg, selector.encode(), domain.encode(), keys[key_name][0], srv_id)
    assert arc_set, "dkimpy declined to seal"
    return b"".join(arc_set) + ar + msg


def dnsfunc(keys: Keys) -> Callable[..., bytes | None]:
    """dkimpy's key lookup, answered from ``keys`` (the test's own verification)."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        found = keys.get(name.decode().rstrip("."))
        return found[1].encode() if found else None

    return lookup


def start(mailgate: StartMailgate, tmp_path: Path, keys: Keys, **checks: Any) -> MailgateProcess:
    """mailgate sealing as mailgate.test; DKIM and DMARC off unless ``checks`` say."""
    key_file = tmp_path / "seal.pem"
    key_file.write_bytes(keys[SEAL_KEY][0])
    policy: dict[str, Any] = {
        "spf": {"enabled": False},
        "dkim": {"enabled": False},
        "dmarc": {"enabled": False},
        "arc": {
            "seal": True,
            "seal_domain": "mailgate.test",
            "seal_selector": "seal",
            "seal_key_file": str(key_file),
        },
    }
    policy.update(checks)
    return mailgate(policy)


def send(mg: MailgateProcess, content: bytes, sender: str = "alice@example.org") -> None:
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail(sender)
        c.rcpt("bob@example.test")
        assert c.data(content)[0] == 250


def relayed(upstream: ScriptedUpstream) -> tuple[bytes, bytes, bytes]:
    """(whole message, header block, our Authentication-Results field unfolded)."""
    [txn] = upstream.wait_for_transactions(1)
    msg = txn.message
    head = msg.split(b"\r\n\r\n", 1)[0]
    m = re.search(
        rb"^Authentication-Results: mx\.mailgate\.test;.*?\r\n(?![ \t])", head, re.M | re.S
    )
    assert m, head
    return msg, head, m.group(0).replace(b"\r\n\t", b" ").replace(b"\r\n", b"")


def log_line(mg: MailgateProcess, needle: str) -> str:
    lines = [line for line in mg.logs().splitlines() if needle in line]
    assert lines, mg.logs()
    return lines[0]


# -- bug: a DNS temperror was sealed cv=fail, ending the chain ----------------------------------
@pytest.mark.parametrize("mode", ["servfail", "timeout"])
def test_a_key_lookup_temperror_is_reported_and_not_sealed(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    dns_zone: ZoneDNSServer,
    tmp_path: Path,
    keys: Keys,
    mode: Mode,
) -> None:
    """The list's key does not answer: the chain state is unknown. Our A-R says
    arc=fail (the contract's words are pass|fail|none; RFC 8617 registers no more),
    but no set is added: a cv=fail seal would have ended a chain that may be valid
    for every later hop."""
    dns_zone.add(LIST_KEY, "TXT", keys[LIST_KEY][1])
    dns_zone.set_name_mode(LIST_KEY, mode)
    mg = start(mailgate, tmp_path, keys)
    send(mg, hop(MESSAGE, LIST_AR, LIST_KEY, keys))
    msg, head, ours = relayed(upstream)
    assert head.count(b"ARC-Seal:") == 1 and b"ARC-Seal: i=2" not in head  # the list's only
    assert b"cv=fail" not in head
    assert ours.endswith(b"arc=fail smtp.remote-ip=127.0.0.1"), ours
    line = log_line(mg, "ARC set not added")
    assert "level=info" in line and "temperror" in line
    assert dkim.arc_verify(msg, dnsfunc=dnsfunc(keys))[0] == b"pass"  # the chain lives on


# -- bug: sealed on top of a chain whose newest seal said cv=fail --------------------------------
def test_a_chain_whose_newest_seal_says_fail_gets_no_further_set(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    dns_zone: ZoneDNSServer,
    tmp_path: Path,
    keys: Keys,
) -> None:
    """RFC 8617 5.1: after a cv=fail seal the chain has ended; we report arc=fail and
    add nothing (the reason is logged at info)."""
    for name in (LIST_KEY, FWD_KEY):
        dns_zone.add(name, "TXT", keys[name][1])
    chain = hop(MESSAGE, LIST_AR, LIST_KEY, keys)
    dead = hop(chain, b"Authentication-Results: fwd.example.org; arc=fail\r\n", FWD_KEY, keys)
    assert b"ARC-Seal: i=2; cv=fail;" in dead
    mg = start(mailgate, tmp_path, keys)
    send(mg, dead)
    _, head, ours = relayed(upstream)
    assert head.count(b"ARC-Seal:") == 2 and b"i=3" not in head
    assert ours.endswith(b"arc=fail smtp.remote-ip=127.0.0.1"), ours
    line = log_line(mg, "ARC set not added")
    assert "level=info" in line and "cv=fail" in line


# -- bug: the signed AAR was authres's re-rendering, not our field ------------------------------
def test_a_hostile_helo_stays_one_quoted_value_in_the_sealed_aar(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path, keys: Keys
) -> None:
    """Null sender, HELO ``x;dmarc=pass@evil.example``: our A-R quotes it as
    smtp.helo; the AAR we sign carries that payload byte for byte (dkimpy wrote it
    bare, adding a signed dmarc=pass clause), and the set verifies."""
    helo = "x;dmarc=pass@evil.example"
    mg = start(mailgate, tmp_path, keys, spf={"enabled": True})
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        assert c.ehlo(helo)[0] == 250
        c.mail("")
        c.rcpt("bob@example.test")
        assert c.data(MESSAGE)[0] == 250
    msg, head, _ = relayed(upstream)
    assert f'smtp.helo="{helo}"'.encode() in head
    ar = re.search(
        rb"^Authentication-Results: (mx\.mailgate\.test;.*?\r\n)(?![ \t])",
        head + b"\r\n",
        re.M | re.S,
    )
    assert ar
    assert b"ARC-Authentication-Results: i=1; " + ar.group(1) in head + b"\r\n"
    cv, sets, why = dkim.arc_verify(msg, dnsfunc=dnsfunc(keys))
    assert (cv, why, len(sets)) == (b"pass", "success", 1)
    aar = sets[0]["aar-value"].decode().split(";", 1)[1]
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results:" + aar)
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "none"), ("arc", "none")]
    assert parsed.results[0].properties[0].value == helo


# -- bug: U-labels in our A-R broke its parsing, so sealing was skipped --------------------------
@pytest.mark.parametrize(
    ("sender", "written"),
    [
        ("alice@b\u00fccher.test", b"smtp.mailfrom=alice@xn--bcher-kva.test"),
        ("\u0438\u0432\u0430\u043d@b\u00fccher.test", b"smtp.mailfrom=@xn--bcher-kva.test"),
    ],
)
def test_an_smtputf8_sender_is_written_in_a_labels_and_sealed(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    tmp_path: Path,
    keys: Keys,
    sender: str,
    written: bytes,
) -> None:
    """SPF reports the SMTPUTF8 MAIL FROM with its domain as an A-label (a non-ASCII
    local part, which has no ASCII form, is left out); the field parses and the
    message is sealed."""
    mg = start(mailgate, tmp_path, keys, spf={"enabled": True})
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        assert c.mail(sender, ["SMTPUTF8"])[0] == 250
        c.rcpt("bob@example.test")
        assert c.data(MESSAGE)[0] == 250
    msg, head, ours = relayed(upstream)
    assert written in ours and ours.isascii(), ours
    assert head.startswith(b"ARC-Seal: i=1; cv=none;"), head
    logs = mg.logs()
    assert "ARC sealing skipped" not in logs and "ARC set not added" not in logs
    cv, _, why = dkim.arc_verify(msg, dnsfunc=dnsfunc(keys))
    assert cv == b"pass", why


# -- smtp.remote-ip and header.oldest-pass, and a three-set chain that verifies ------------------
def test_arc_result_names_the_client_and_the_oldest_passing_signature(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    dns_zone: ZoneDNSServer,
    tmp_path: Path,
    keys: Keys,
) -> None:
    """A list tagged the Subject after hop 1 signed it, a forwarder sealed that: the
    chain passes, AMS 1 no longer validates. We write header.oldest-pass=2 and the
    client's address, and extend the chain with a third set that dkimpy validates."""
    for name in (LIST_KEY, FWD_KEY):
        dns_zone.add(name, "TXT", keys[name][1])
    chain = hop(MESSAGE, LIST_AR, LIST_KEY, keys)
    edited = chain.replace(b"Subject: meeting notes", b"Subject: [list] meeting notes")
    forwarded = hop(edited, b"Authentication-Results: fwd.example.org; arc=pass\r\n", FWD_KEY, keys)
    mg = start(mailgate, tmp_path, keys)
    send(mg, forwarded)
    msg, head, ours = relayed(upstream)
    assert ours.endswith(b"arc=pass header.oldest-pass=2 smtp.remote-ip=127.0.0.1"), ours
    assert head.startswith(b"ARC-Seal: i=3; cv=pass;"), head
    cv, sets, why = dkim.arc_verify(msg, dnsfunc=dnsfunc(keys))
    assert (cv, why) == (b"pass", "success")
    assert [(s["instance"], s["ams-valid"]) for s in sets] == [(3, True), (2, True), (1, False)]
