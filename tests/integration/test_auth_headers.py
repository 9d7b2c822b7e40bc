"""Headers on the way out: our Authentication-Results in, forged ones out, others kept."""

from __future__ import annotations

from pathlib import Path

import authres
import dkim

from filter.headers import MAX_HEADER_BLOCK
from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate
from tests.rig.client import smtp_client
from tests.rig.dkimkeys import rsa_dkim_key
from tests.rig.upstream import ScriptedUpstream

FORGED = (
    b"Authentication-Results: MX.MAILGATE.TEST; spf=pass smtp.mailfrom=ceo@example.org;\r\n"
    b"\tdkim=pass header.d=example.org; dmarc=pass header.from=example.org\r\n"
)
FOREIGN = b"Authentication-Results: mx.upstream-isp.example; spf=fail smtp.mailfrom=x@y\r\n"


def _send(mg_port: int, headers: bytes) -> None:
    with smtp_client("127.0.0.1", mg_port) as c:
        c.ehlo("client.example.org")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        code, _ = c.data(headers + b"From: <alice@example.org>\r\nSubject: ar\r\n\r\nbody\r\n")
        assert code == 250


def test_forged_authentication_results_are_replaced_by_ours(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    # No DNS in this test: the authentication checks are off, so ours says "none".
    mg = mailgate(AUTH_CHECKS_OFF)
    _send(mg.smtp_port, FORGED + FOREIGN + b"X-Spam-Flag: NO\r\n")
    [txn] = upstream.wait_for_transactions(1)
    msg = txn.message
    head = msg.split(b"\r\n\r\n", 1)[0]
    assert b"MX.MAILGATE.TEST" not in head  # the forgery is gone
    assert FOREIGN in head  # another service's result is kept
    assert head.startswith(b"Authentication-Results: mx.mailgate.test;\r\n\tnone\r\n")
    assert head.count(b"Authentication-Results:") == 2
    assert b"X-Spam-Flag: NO" not in head  # our own X-Spam fields cannot be pre-set


def test_authserv_id_from_policy(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate(
        {
            "auth": {"authserv_id": "filter.example.net"},
            **AUTH_CHECKS_OFF,
        }
    )
    forged = b"Authentication-Results: filter.EXAMPLE.net; dkim=pass\r\n"
    _send(mg.smtp_port, forged)
    [txn] = upstream.wait_for_transactions(1)
    head = txn.message.split(b"\r\n\r\n", 1)[0]
    assert b"filter.EXAMPLE.net" not in head
    assert b"Authentication-Results: filter.example.net;" in head


def test_arc_seal_added_and_verifiable(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """[arc] seal = true: the upstream gets our ARC set, and it verifies (RFC 8617)."""
    pem, text = rsa_dkim_key()
    key_file = tmp_path / "seal.pem"
    key_file.write_bytes(pem)
    record = text.encode()
    mg = mailgate(
        {
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
    )
    _send(mg.smtp_port, b"")
    [txn] = upstream.wait_for_transactions(1)
    msg = txn.message
    head = msg.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"ARC-Seal: i=1;")
    assert b"ARC-Message-Signature: i=1;" in head and b"ARC-Authentication-Results: i=1;" in head

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name.rstrip(b".") == b"seal._domainkey.mailgate.test" else None

    cv, _, why = dkim.arc_verify(msg, dnsfunc=dnsfunc)
    assert cv == b"pass", why


def test_quoted_and_dotted_forgeries_of_our_id_are_removed(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 8601's authserv-id is a value: "mx.mailgate.test" (quoted) and a trailing
    dot claim our id as much as the bare name does."""
    mg = mailgate(AUTH_CHECKS_OFF)
    forged = (
        b'Authentication-Results: "mx.mailgate.test"; spf=pass smtp.mailfrom=forged-1\r\n'
        b"Authentication-Results: mx.mailgate.test.; dkim=pass header.d=forged-2\r\n"
        b"Authentication-Results: (a (b) c) MX.mailgate.test; dmarc=pass header.from=forged-3\r\n"
    )
    _send(mg.smtp_port, forged)
    [txn] = upstream.wait_for_transactions(1)
    head = txn.message.split(b"\r\n\r\n", 1)[0]
    assert b"forged-1" not in head and b"forged-2" not in head and b"forged-3" not in head
    assert head.count(b"Authentication-Results:") == 1


def test_a_hostile_mail_from_cannot_inject_a_result_into_our_header(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A MAIL FROM local part with RFC 8601 specials: unquoted it is refused at MAIL
    (not atext); quoted it is one value in smtp.mailfrom: the header still parses to
    one spf result, and no dmarc=pass appears in it."""
    mg = mailgate({name: {"enabled": False} for name in ("dkim", "dmarc", "arc")})
    sender = '"x;dmarc=pass"@evil.example'
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        assert c.docmd("MAIL FROM:<x;dmarc=pass@evil.example>")[0] == 501
        assert c.docmd(f"MAIL FROM:<{sender}>")[0] == 250  # smtplib's mail() would parse it
        c.rcpt("bob@example.test")
        code, _ = c.data(b"From: <alice@example.org>\r\nSubject: ar\r\n\r\nbody\r\n")
        assert code == 250
    [txn] = upstream.wait_for_transactions(1)
    head = txn.message.split(b"\r\n\r\n", 1)[0]
    ours = head.split(b"\r\nX-", 1)[0].decode().replace("\r\n", "")
    assert ours.startswith("Authentication-Results: mx.mailgate.test;"), head
    parsed = authres.AuthenticationResultsHeader.parse(ours)
    assert [r.method for r in parsed.results] == ["spf"]
    assert parsed.results[0].properties[0].value == sender
    assert f"smtp.mailfrom={sender}" in ours  # a quoted local part is a valid pvalue


def test_a_header_block_past_the_limit_is_refused_not_passed_unseen(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """Checks and the removal of forged fields read the first MAX_HEADER_BLOCK bytes
    of the header; fields after that (here a forged A-R and a second From) would reach
    the upstream unseen, so such a message is refused with 552 5.3.4."""
    mg = mailgate({**AUTH_CHECKS_OFF, "server": {"max_message_size": "4MiB"}})
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 60) for i in range(16000))
    assert len(filler) > MAX_HEADER_BLOCK
    forged = b"Authentication-Results: mx.mailgate.test; dmarc=pass header.from=bank.test\r\n"
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        code, text = c.data(filler + forged + b"From: <ceo@bank.test>\r\n\r\nbody\r\n")
        assert (code, text[:5]) == (552, b"5.3.4")
        # a big body under a normal header still goes through
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        big_body = b"From: <alice@example.org>\r\n\r\n" + (b"y" * 76 + b"\r\n") * 20000
        assert c.data(big_body)[0] == 250
    [txn] = upstream.wait_for_transactions(1)
    assert b"bank.test" not in txn.message
