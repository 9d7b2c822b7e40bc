"""Replay's pure parts: envelopes rebuilt from delivered mail, folders, the summary.

Also the pure half of ``filter.verdictlog`` (ids, records built from log fields):
the store half is in tests/integration/test_explain_replay_domain.py.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

from filter import replies, verdictlog
from filter.dryrun import DryRun
from filter.model import Stage
from filter.policy.schema import DEFAULT_POLICY
from filter.replay import (
    Judged,
    Progress,
    ReplayReport,
    collect_files,
    crlf,
    envelope_from,
    format_report,
    prepare,
    stateless,
)
from filter.results import Action, Symbol
from filter.verdict import Verdict

BODY = b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.test>\r\nSubject: hi\r\n\r\nhi\r\n"

DELIVERED = (
    b"Return-Path: <alice@example.org>\r\n"
    b"X-Original-To: bob@example.test\r\n"
    b"Delivered-To: robert@example.test\r\n"
    b"Received: from localhost (localhost [127.0.0.1])\r\n"
    b"\tby mx.example.test (Postfix) with ESMTP id 4AAA\r\n"
    b"\tfor <robert@example.test>; Mon, 1 Jan 2024 00:00:01 +0000\r\n"
    b"Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n"
    b"\tby mx.example.test (Postfix) with ESMTPS id 4BBB\r\n"
    b"\tfor <bob@example.test>; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=example.org\r\n"
    b"X-Spam-Score: 0.5\r\n"
    b"X-Spam-Status: No, score=0.5 required=6 tests=SPF_PASS\r\n"
    b"Received: from [10.0.0.1] (unknown [10.0.0.1]) by mail.example.org; Sun, 31 Dec 2023\r\n"
) + BODY


def loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


# -- envelope ----------------------------------------------------------------------------------
def test_envelope_from_postfix_headers_skips_trusted_hops() -> None:
    env = envelope_from(DELIVERED, None, loopback)
    assert env.ip == "192.0.2.10"
    assert env.helo == "mail.example.org"
    assert env.mail_from == "alice@example.org"
    # X-Original-To is what the client gave mailgate; Delivered-To is after aliases.
    assert env.rcpts == ("bob@example.test",)
    assert env.source == "headers"
    assert env.received_index == 4


def test_without_trust_the_topmost_received_is_the_client() -> None:
    env = envelope_from(DELIVERED)
    assert env.ip == "127.0.0.1"
    assert env.helo == "localhost"


def test_prepare_removes_what_was_added_after_mailgate() -> None:
    env = envelope_from(DELIVERED, None, loopback)
    out = prepare(DELIVERED, env)
    assert out.startswith(b"Received: from [10.0.0.1]")  # the sender's own hop stays
    for gone in (b"Return-Path", b"X-Original-To", b"Delivered-To", b"X-Spam", b"192.0.2.10"):
        assert gone not in out
    assert b"Authentication-Results" not in out
    assert out.endswith(BODY)


@pytest.mark.parametrize(
    ("received", "ip", "helo"),
    [
        (b"from helo.example (unknown [198.51.100.7])", "198.51.100.7", "helo.example"),
        (
            b"from mx6.example.org (mx6.example.org [IPv6:2001:DB8::25])",
            "2001:db8::25",
            "mx6.example.org",
        ),
        (b"from h.example (h.example [192.0.2.1]:40123)\r\n\tby mx", "192.0.2.1", "h.example"),
        (b"FROM [192.0.2.9] ([192.0.2.9])", "192.0.2.9", "[192.0.2.9]"),
    ],
)
def test_received_forms(received: bytes, ip: str, helo: str) -> None:
    env = envelope_from(b"Received: " + received + b"\r\n" + BODY)
    assert (env.ip, env.helo) == (ip, helo)


def test_received_of_other_mtas_are_not_guessed() -> None:
    env = envelope_from(b"Received: by mail.example.org with SMTP id x; date\r\n" + BODY)
    assert env.ip is None and env.received_index is None


def test_recipient_fallbacks_and_null_sender() -> None:
    msg = b"Return-Path: <>\r\nDelivered-To: carol@example.test\r\n" + BODY
    env = envelope_from(msg)
    assert env.mail_from == ""
    assert env.rcpts == ("carol@example.test",)
    env = envelope_from(b"Cc: dave@example.test, Eve <eve@example.test>\r\n" + BODY)
    assert env.rcpts == ("dave@example.test", "eve@example.test", "bob@example.test")  # field order


def test_sidecar_wins_key_by_key() -> None:
    side = {"ip": "2001:db8::0:1", "rcpts": ["<x@example.test>", "y@example.test"]}
    env = envelope_from(DELIVERED, side, loopback)
    assert env.ip == "2001:db8::1"
    assert env.helo == "mail.example.org"  # not in the sidecar: from the headers
    assert env.rcpts == ("x@example.test", "y@example.test")
    assert env.source == "headers+sidecar"
    env = envelope_from(BODY, {"ip": "192.0.2.5", "helo": "h.example", "mail_from": "<>"})
    assert (env.ip, env.helo, env.mail_from, env.source) == (
        "192.0.2.5",
        "h.example",
        "",
        "sidecar",
    )


@pytest.mark.parametrize(
    "side",
    [{"ip": "not-an-ip"}, {"rcpts": "bob@example.test"}, {"mail_from": None}, {"sender": "x"}],
)
def test_bad_sidecars_are_refused(side: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        envelope_from(BODY, side)


def test_prepare_without_client_hop_drops_only_delivery_fields() -> None:
    msg = b"Return-Path: <a@example.org>\r\nDelivered-To: b@example.test\r\n" + BODY
    env = envelope_from(msg)
    assert prepare(msg, env) == BODY


def test_crlf() -> None:
    assert crlf(b"a: b\n\nbody") == b"a: b\r\n\r\nbody\r\n"
    assert crlf(b"a: b\r\n\r\nx\r\n") == b"a: b\r\n\r\nx\r\n"


# -- folders -----------------------------------------------------------------------------------
def test_collect_files_maildir(tmp_path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "1.M1:2,S").write_bytes(BODY)
    (tmp_path / "cur" / "1.M1:2,S.env.json").write_text("{}")
    (tmp_path / "new" / "2.M2").write_bytes(BODY)
    (tmp_path / "tmp" / "3.M3").write_bytes(BODY)  # still being delivered
    (tmp_path / "x.eml").write_bytes(BODY)  # a Maildir's top holds no messages
    names = [p.relative_to(tmp_path).as_posix() for p in collect_files(tmp_path)]
    assert names == ["cur/1.M1:2,S", "new/2.M2"]


def test_collect_files_flat_folder(tmp_path: Path) -> None:
    (tmp_path / "b.eml").write_bytes(BODY)
    (tmp_path / "a.EML").write_bytes(BODY)
    (tmp_path / "a.EML.env.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in collect_files(tmp_path)] == ["a.EML", "b.eml"]
    with pytest.raises(ValueError):
        collect_files(tmp_path / "missing")


def test_stateless_switches_off_greylisting_only() -> None:
    p = stateless(DEFAULT_POLICY)
    assert DEFAULT_POLICY.greylist.enabled and not p.greylist.enabled
    assert p.spf == DEFAULT_POLICY.spf and p.dnsbl == DEFAULT_POLICY.dnsbl
    off = replace(DEFAULT_POLICY, greylist=replace(DEFAULT_POLICY.greylist, enabled=False))
    assert stateless(off) is off


# -- report ------------------------------------------------------------------------------------
def run(action: Action, score: float, *names: str) -> DryRun:
    syms = tuple(Symbol(n, score / max(1, len(names))) for n in names)
    reply = replies.REJECT_SPAM if action is Action.REJECT else replies.OK
    return DryRun(Verdict(action, score, syms, None), reply, Stage.DATA)


def report() -> ReplayReport:
    r = ReplayReport("/mail", "new.toml", "old.toml")
    r.messages = [
        Judged("a", None, run(Action.ACCEPT, 1.0, "X"), run(Action.ACCEPT, 1.0, "X")),
        Judged("b", None, run(Action.ACCEPT, 2.0, "X"), run(Action.REJECT, 20.0, "X", "Y")),
        Judged("c", None, run(Action.ACCEPT, 2.0, "X"), run(Action.ACCEPT, 3.5, "X")),
        Judged("d", skipped="no client IP"),
    ]
    return r


def test_counts_matrix_and_changes() -> None:
    r = report()
    assert r.counts("old")["accept"] == 3 and r.counts("new") == {
        "accept": 2,
        "add_header": 0,
        "greylist": 0,
        "tempfail": 0,
        "reject": 1,
    }
    t = r.transitions()
    assert t["accept"]["accept"] == 2 and t["accept"]["reject"] == 1
    assert sum(sum(row.values()) for row in t.values()) == 3
    assert [j.file for j in r.changed()] == ["b", "c"]  # action changes first
    assert r.changed()[0].delta == 18.0


def test_format_report_is_a_readable_summary() -> None:
    text = format_report(report())
    assert "replayed 3 of 4 messages" in text
    assert "old \\ new" in text
    assert "changed: 1 actions, 1 scores only" in text
    assert "+18.00*" in text
    assert "d: no client IP" in text


def test_progress_prints_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(100, out)
    assert p.enabled and not p.tty
    for _ in range(100):
        p.step()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("replay: 100/100 100%")
    assert 10 <= len(lines) <= 11
    quiet = io.StringIO()
    small = Progress(5, quiet)
    small.step()
    assert not small.enabled and quiet.getvalue() == ""


# -- verdictlog, the pure half -----------------------------------------------------------------
def test_parse_id() -> None:
    assert verdictlog.parse_id("A1B2C3D4E5F6.3") == ("A1B2C3D4E5F6", "A1B2C3D4E5F6.3")
    assert verdictlog.parse_id(" A1B2C3D4E5F6 ") == ("A1B2C3D4E5F6", None)
    for bad in ("", "a*", "x:y", "A.B", "A.1.2", "a" * 65):
        with pytest.raises(ValueError):
            verdictlog.parse_id(bad)


def test_build_record_adds_scores_and_details_to_the_log_fields() -> None:
    fields = {
        "event": "message",
        "id": "S1.1",
        "session": "S1",
        "client": "192.0.2.1",
        "rcpts": ("bob@example.test",),
        "action": "reject",
        "symbols": ["SPF_FAIL"],
        "reply": "550 5.7.1 Message rejected as spam",
    }
    v = Verdict(
        Action.REJECT, 16.0, (Symbol("SPF_FAIL", 16.0, "not permitted"),), replies.REJECT_SPAM, "r"
    )
    rec = verdictlog.build_record(fields, v, now=1000.0)
    assert rec["time"] == 1000.0 and rec["rcpts"] == ["bob@example.test"]
    assert rec["symbols"] == [{"name": "SPF_FAIL", "score": 16.0, "detail": "not permitted"}]
    assert (rec["score"], rec["reason"], rec["client"]) == (16.0, "r", "192.0.2.1")
    refusal = verdictlog.build_record({"event": "rcpt_refused", "rcpt": "x@y.test"}, None, 1.0)
    assert refusal["rcpts"] == ["x@y.test"] and refusal["symbols"] == []


def test_mail_from_and_helo_from_authentication_results_when_delivery_left_none() -> None:
    content = (
        b"Authentication-Results: mx.example.net;\r\n"
        b'\tspf=pass smtp.mailfrom="j.doe"@sender.example;\r\n'
        b"\tdkim=none\r\n"
        b"Authentication-Results: mx.example.net; spf=fail smtp.mailfrom=older@x.example\r\n"
        b"Received: from a.example (a.example [203.0.113.5]) by mx\r\n"
        b"To: bob@example.test\r\nSubject: s\r\n\r\nbody\r\n"
    )
    env = envelope_from(content)
    assert env.mail_from == '"j.doe"@sender.example'  # the topmost (ours), not an older one
    assert env.ip == "203.0.113.5" and env.helo == "a.example"
    with_rp = b"Return-Path: <bounce@list.example>\r\n" + content
    assert envelope_from(with_rp).mail_from == "bounce@list.example"  # Return-Path wins


# -- the sender and recipients mailgate saw, not another hop's ------------------------------------
RECEIVED = (
    b"Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n"
    b"\tby mx.example.test (Postfix) with UTF8SMTPS id 4BBB\r\n"
)


def test_non_ascii_local_part_withheld_by_our_ar_is_not_replayed_as_postmaster() -> None:
    # Our A-R leaves a non-ASCII local part out (authresults.ascii_mailbox): "@domain".
    # It was replayed as MAIL FROM:<@xn--bcher-kva.example>, which SPF reads as
    # postmaster@ (RFC 7208 4.3), and sender lists never matched.
    ar = b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=@xn--bcher-kva.example"
    ar += b"\r\n"
    from_ = "From: =?utf-8?q?J=C3=B6rg?= <jörg@bücher.example>\r\nTo: bob@example.test\r\n"
    msg = b"X-Original-To: bob@example.test\r\n" + RECEIVED + ar + from_.encode() + b"\r\nhi\r\n"
    env = envelope_from(msg)
    assert env.mail_from == "jörg@bücher.example"  # the From mailbox at that domain
    # Without a From address there to take it from, the sender is unknown, not invented.
    other = msg.replace("jörg@bücher.example".encode(), b"info@other.example")
    assert envelope_from(other).mail_from is None
    assert envelope_from(other, {"mail_from": "jörg@bücher.example"}).mail_from == (
        "jörg@bücher.example"
    )


def test_domain_only_smtp_mailfrom_is_no_sender() -> None:
    # RFC 8601 lets smtp.mailfrom be a bare domain (OpenDMARC writes it so): taken as the
    # sender it made SPF "none" (no "@", no domain) for every replayed message.
    ar = b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=example.org\r\n"
    env = envelope_from(RECEIVED + ar + BODY)
    assert env.mail_from == "alice@example.org"  # From: Alice <alice@example.org>
    assert (
        envelope_from(RECEIVED + ar.replace(b"example.org", b"x.example") + BODY).mail_from is None
    )


def test_no_sender_anywhere_is_unknown_not_the_null_sender() -> None:
    env = envelope_from(RECEIVED + BODY)
    assert env.mail_from is None  # was "": a bounce, judged as postmaster@<HELO>


def test_explicit_null_return_path_does_not_fall_back_to_authentication_results() -> None:
    # A filter after mailgate wrote the HELO domain as smtp.mailfrom for this bounce.
    msg = (
        b"Return-Path: <>\r\n"
        b"Authentication-Results: filter.example.test; spf=pass smtp.mailfrom=mail.example.org\r\n"
        + RECEIVED
        + BODY
    )
    assert envelope_from(msg).mail_from == ""


def test_quoted_local_part_with_escaped_quote_in_authentication_results() -> None:
    ar = b'Authentication-Results: mx.example.test; spf=pass smtp.mailfrom="a\\"b"@example.org\r\n'
    assert envelope_from(RECEIVED + ar + BODY).mail_from == '"a\\"b"@example.org'


def test_delivery_fields_of_earlier_hops_are_not_our_envelope() -> None:
    # Forwarded to us from another provider: its Delivered-To, X-Original-To and
    # Return-Path sit below the Received field of our client, in the message it sent.
    msg = (
        b"Return-Path: <srs0=ab=cd=example.net=fwd@relay.example.org>\r\n"
        b"Delivered-To: bob@example.test\r\n" + RECEIVED + b"Return-Path: <alice@example.net>\r\n"
        b"X-Original-To: bob@elsewhere.example\r\n"
        b"Delivered-To: bob@elsewhere.example\r\n"
        b"Received: from x (x [203.0.113.1]) by elsewhere\r\n" + BODY
    )
    env = envelope_from(msg)
    assert env.rcpts == ("bob@example.test",)
    assert env.mail_from == "srs0=ab=cd=example.net=fwd@relay.example.org"


def test_multiple_delivered_to_the_one_nearest_the_client_is_the_rcpt() -> None:
    # A forward inside the site: bob's .forward re-delivered to robert; each delivery
    # added a Delivered-To on top. The client said RCPT TO:<bob@...>.
    msg = (
        b"Delivered-To: robert@example.test\r\n"
        b"Received: by mx.example.test (Postfix, from userid 1001) id 4CCC\r\n"
        b"Delivered-To: bob@example.test\r\n"
        + RECEIVED
        + b"Return-Path: <a@example.org>\r\n"
        + BODY
    )
    assert envelope_from(msg).rcpts == ("bob@example.test",)
