"""The ``mailgate`` command line (L6): serve, check, policy, and the admin tools.

Exit codes: 0 success (``check`` whatever the verdict), 1 a failed validation or a
runtime error, 2 bad usage or input, 141 (128 + SIGPIPE) stdout's reader went away.
Errors go to stderr; stdout carries only the command's output (``policy check``'s
output is the errors).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from filter import __version__

# Each command imports what it uses when it runs (the policy, asyncio, json, the store):
# `--help` and usage errors import next to nothing, and short-lived commands (the test
# suite runs hundreds) do not pay for what they never touch.
if TYPE_CHECKING:  # the store pulls in redis: imported only by the commands that use it
    from filter.dryrun import DryRun
    from filter.results import CheckResult
    from filter.store import GreylistStats, Store


def _config(args: argparse.Namespace) -> Path:
    from filter.policy import default_config_path

    return Path(args.config) if args.config else default_config_path()


def cmd_serve(args: argparse.Namespace) -> int:
    import tempfile

    from filter.policy import PolicyError, load_policy

    config = _config(args)
    try:
        loaded = load_policy(config)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if loaded.policy.server.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Must be set before prometheus_client is first imported (by filter.app).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mailgate-metrics-")
    from filter.app import serve

    return serve(loaded, config)


def cmd_policy(args: argparse.Namespace) -> int:
    from filter.policy import PolicyError, load_policy, render_toml

    config = _config(args)
    try:
        loaded = load_policy(config)
    except PolicyError as exc:
        # `policy check` exists to print them; anywhere else stdout is the command's
        # output (`policy show > file`), so errors go to stderr.
        out = sys.stdout if args.policy_command == "check" else sys.stderr
        for issue in exc.issues:
            print(issue, file=out)
        return 1
    if args.policy_command == "check":
        files = ", ".join(str(f) for f in loaded.files)
        print(f"policy OK: {files}")
        return 0
    sys.stdout.write(render_toml(loaded.policy, changed_only=args.changed))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``mailgate check FILE.eml --ip IP …``: one message through the whole pipeline.

    Exit 0 whatever the verdict, 2 bad input (missing FILE or --ip, an address the
    live session would refuse as a command argument, an unreadable file, a bad policy).
    """
    import asyncio
    import json

    from filter.checks.registry import build_checks
    from filter.dryrun import evaluate
    from filter.netaddr import normalize_ip
    from filter.pipeline import Pipeline
    from filter.policy import PolicyError, load_policy
    from filter.resolver import Resolver
    from filter.store import Store

    if args.replay:
        return cmd_replay(args)
    _reclaim_file(args)
    if not args.file or not args.ip:
        print("mailgate check: FILE.eml and --ip are required", file=sys.stderr)
        return 2
    try:
        # The address a live session would see and log: " 192.0.2.1" or
        # "::ffff:192.0.2.1" is 192.0.2.1 in the envelope shown too.
        ip = normalize_ip(args.ip)
    except ValueError:
        print(f"mailgate check: --ip {args.ip!r} is not an IP address", file=sys.stderr)
        return 2
    try:
        mail_from = _smtp_path("--mail-from", args.mail_from or "", "FROM")
        rcpts = [_smtp_path("--rcpt", r, "TO") for r in args.rcpt or []]
    except ValueError as exc:
        print(f"mailgate check: {exc}", file=sys.stderr)
        return 2
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"mailgate check: {exc}", file=sys.stderr)
        return 2
    content = _crlf(raw)
    try:
        policy = load_policy(_config(args)).policy
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    pipeline = Pipeline(build_checks(policy), policy.server.check_timeout)

    async def run() -> DryRun:
        resolver = Resolver(policy.dns.nameservers, policy.dns.timeout)
        store = Store.from_policy(policy.redis)  # read-only here: checks see dry_run
        try:
            return await evaluate(
                policy, pipeline, content, ip, args.helo, mail_from, rcpts, resolver, store
            )
        finally:
            await store.aclose()

    outcome = asyncio.run(run())
    envelope = {"ip": ip, "helo": args.helo, "mail_from": mail_from, "rcpts": rcpts}
    if args.json:
        print(json.dumps(_check_json(outcome, envelope), indent=2))
    else:
        _print_check(outcome, envelope)
    return 0


def _reclaim_file(args: argparse.Namespace) -> None:
    """``check --rcpt a@x b@y FILE.eml``: ``--rcpt`` takes several values, so argparse
    hands a FILE written after them to ``--rcpt``; an existing file there is the FILE."""
    if args.file is None and args.rcpt and Path(args.rcpt[-1]).is_file():
        args.file = args.rcpt.pop()


def _smtp_path(option: str, value: str, keyword: str) -> str:
    """An envelope address parsed as the live session parses MAIL FROM/RCPT TO.

    ``check`` judges what a real client could send, so it refuses what the session
    would answer with a 501; <brackets> are optional. ValueError names the option.
    """
    from filter.smtpsyntax import SyntaxProblem, parse_path

    inner = value[1:-1] if value.startswith("<") and value.endswith(">") else value
    try:
        address = parse_path(f"{keyword}:<{inner}>", keyword).address
    except SyntaxProblem as exc:
        raise ValueError(f"{option} {value!r}: {exc}") from exc
    if keyword == "TO" and not address:
        raise ValueError(f"{option} {value!r}: a recipient cannot be the null address")
    return address


_AUTH_CHECKS = ("spf", "dkim", "dmarc")
_DNSBL_CHECKS = ("dnsbl", "dnsbl_domain")


def _check_results(outcome: DryRun) -> dict[str, object]:
    """Each check's RFC 8601 word; spf, dkim, dmarc and dnsbl always present.

    A disabled check reports "none", the word it gives when run disabled (so a
    trusted client, whose checks run here for information, gets words as well).
    """
    words = _result_words(outcome.results)
    results: dict[str, object] = {k: words.get(k, "none") for k in _AUTH_CHECKS}
    if any(r.check in _DNSBL_CHECKS for r in outcome.results):
        listed = [s.name for r in outcome.results if r.check in _DNSBL_CHECKS for s in r.symbols]
        results["dnsbl"] = list(dict.fromkeys(listed))
    else:
        results["dnsbl"] = []
    results.update({k: w for k, w in words.items() if k not in results})
    return results


def _result_words(results: list[CheckResult]) -> dict[str, str]:
    """One word per check; of a recipient check's several, the one that decided."""
    words: dict[str, str] = {}
    decided: set[str] = set()
    for r in results:
        if r.check not in words or (r.decision is not None and r.check not in decided):
            words[r.check] = r.result
        if r.decision is not None:
            decided.add(r.check)
    return words


def _check_json(outcome: DryRun, envelope: dict[str, object]) -> dict[str, object]:
    """``check --json``: the live verdict, and every check's results and symbols."""
    v = outcome.verdict
    complete = outcome.complete or v
    return {
        "envelope": envelope,
        "action": v.action.value,
        "score": v.score,
        "smtp_reply": str(outcome.reply),
        "stage": outcome.stage.label,
        "reason": v.reason,
        "would": v.would.value if v.would else None,
        "trusted": outcome.trusted,
        "results": _check_results(outcome),
        "symbols": [
            {"name": s.name, "score": s.score, "detail": s.detail} for s in complete.symbols
        ],
        "score_after_data": complete.score,
        "checks_run": sorted({r.check for r in outcome.results}),
        "authentication_results": outcome.authentication_results,
    }


def _print_check(outcome: DryRun, envelope: dict[str, object]) -> None:
    """``check`` without --json: the same facts for a person."""
    v = outcome.verdict
    complete = outcome.complete or v
    rcpts = envelope["rcpts"]
    targets = ", ".join(f"<{r}>" for r in rcpts) if isinstance(rcpts, list) else ""
    print(f"envelope: {envelope['ip']} <{envelope['mail_from']}> -> {targets or '-'}")
    print(f"action:  {v.action.value}   score: {v.score:g}   stage: {outcome.stage.label}")
    print(f"reply:   {outcome.reply}")
    if v.reason:
        print(f"reason:  {v.reason}")
    if outcome.trusted:
        print(
            "client is in server.trusted_networks: a live session runs no checks and adds"
            " no header; shown below is what the checks say"
        )
    ran = sorted({r.check for r in outcome.results})
    print(f"checks:  {', '.join(ran) or '(none run)'}")
    words = []
    for name, word in _check_results(outcome).items():
        if isinstance(word, list):
            word = ",".join(word) or "-"
        words.append(f"{name}={word}")
    print(f"results: {' '.join(words)}")
    if outcome.authentication_results:
        print(outcome.authentication_results)
    if complete.symbols:
        if v.refuses:
            print(
                f"every check's symbols; had nothing refused, score after DATA: {complete.score:g}"
            )
        print(f"{'symbol':32} {'score':>7}  detail")
        for s in complete.symbols:
            print(f"{s.name:32} {s.score:7.2f}  {s.detail}")


def _crlf(raw: bytes) -> bytes:
    """Files on disk usually have LF line ends; SMTP content has CRLF."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def cmd_greylist(args: argparse.Namespace) -> int:
    """``mailgate greylist stats|show|allow|forget`` against the live store.

    Exit 0 done, 1 the store failed (message on stderr), 2 bad input or policy.
    """
    import asyncio

    from filter.greylist import parse_allow_target, parse_forget_target
    from filter.policy import PolicyError, load_policy
    from filter.store import StoreError, open_store
    from filter.units import format_duration, parse_duration

    name = f"mailgate greylist {args.greylist_command}"
    try:
        policy = load_policy(_config(args)).policy
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        if args.greylist_command == "allow":
            target = parse_allow_target(args.target)
            ttl = parse_duration(args.ttl)
            if ttl <= 0:
                raise ValueError("--ttl must be positive")
        elif args.greylist_command == "forget":
            target = parse_forget_target(args.target)
        elif args.greylist_command == "show" and args.limit < 1:
            raise ValueError("--limit must be at least 1")
    except ValueError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with open_store(policy.redis) as store:
            command = args.greylist_command
            if command == "stats":
                _print_greylist_stats(await store.stats(policy.greylist.awl_count))
            elif command == "show":
                await _print_greylist_show(store, args.limit)
            elif command == "allow":
                until = await store.allow(target, ttl)
                print(f"allowed {target.value} for {format_duration(ttl)} (until {_when(until)})")
            else:
                r = await store.forget(target)
                print(
                    f"forgot {target.value}: {r.triplets} triplets, {r.awl} auto-allowlist "
                    f"entries, {r.allow} allow entries"
                )
                for wider in r.wider_allow:
                    print(
                        f"still allowed by the wider entry {wider} (kept: it covers other"
                        f" hosts too; `greylist forget {wider}` removes it)"
                    )

    try:
        asyncio.run(run())
    except StoreError as exc:
        print(f"{name}: store error: {exc}", file=sys.stderr)
        return 1
    return 0


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def _age(seconds: float) -> str:
    """Rough human age for a table column: 42s, 7m, 5h, 12d."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _print_greylist_stats(st: GreylistStats) -> None:
    print(f"triplets:            {st.triplets} ({st.waiting} waiting, {st.passed} passed)")
    print(f"auto-allowlist:      {st.awl_networks} networks ({st.awl_active} allowlisted)")
    print(f"allow entries:       {st.allow_networks} networks, {st.allow_domains} domains")


async def _print_greylist_show(store: Store, limit: int) -> None:
    now = time.time()
    entries = sorted(await store.triplets(limit), key=lambda e: e.first, reverse=True)
    print(f"{'state':8} {'age':>5} {'seen':>4} {'expires':>7}  triplet")
    for e in entries:
        state = "passed" if e.passed else "waiting"
        expires = _age(e.ttl) if e.ttl >= 0 else "-"
        sender = e.sender or ""
        print(
            f"{state:8} {_age(now - e.first):>5} {e.seen:>4} {expires:>7}  "
            f"{e.origin} <{sender}> -> <{e.recipient}>"
        )
    if not entries:
        print("(no triplets)")
    awl = await store.awl_entries(limit)
    if awl:
        print()
        print(f"{'passes':>6} {'expires':>7}  auto-allowlist network")
        for a in sorted(awl, key=lambda a: -a.count):
            expires = _age(a.ttl) if a.ttl >= 0 else "-"
            print(f"{a.count:>6} {expires:>7}  {a.network}")
    allow = await store.allow_entries(now)
    if allow:
        print()
        print("allow entries (until):")
        for entry in allow[:limit]:
            print(f"  {entry.field:40} {_when(entry.expires)}")


def cmd_replay(args: argparse.Namespace) -> int:
    """``mailgate check --replay DIR --policy NEW [--policy OLD] [--json]``.

    OLD defaults to the running configuration (``--config``), the usual question
    being "what would this change do to the mail we get?". Exit 0 done, 2 bad input.
    """
    import asyncio
    import json

    from filter.policy import PolicyError, load_policy
    from filter.replay import (
        Progress,
        ReplayReport,
        collect_files,
        format_report,
        replay,
    )
    from filter.resolver import Resolver

    name = "mailgate check --replay"
    given = args.policy or []
    if not 1 <= len(given) <= 2 or args.file:
        print(f"{name}: needs DIR, --policy NEW and at most one --policy OLD", file=sys.stderr)
        return 2
    paths = [Path(given[0]), Path(given[1]) if len(given) == 2 else _config(args)]
    try:
        new, old = (load_policy(p).policy for p in paths)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    folder = Path(args.replay)
    try:
        files = collect_files(folder)
    except (OSError, ValueError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    report = ReplayReport(str(folder), str(paths[0]), str(paths[1]))
    progress = Progress(len(files))

    async def run() -> None:
        resolver = Resolver(new.dns.nameservers, new.dns.timeout)
        report.messages = await replay(files, new, old, resolver, folder, progress)

    started = time.monotonic()
    asyncio.run(run())
    report.seconds = time.monotonic() - started
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(format_report(report))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``mailgate explain ID``: a kept verdict, by message id or session id.

    Exit 0 found, 1 not found or the store failed, 2 bad input or policy.
    """
    import asyncio
    import json

    from filter import verdictlog
    from filter.policy import PolicyError, load_policy
    from filter.store import StoreError, open_store
    from filter.units import format_duration

    try:
        verdictlog.parse_id(args.id)
    except ValueError as exc:
        print(f"mailgate explain: {exc}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(_config(args)).policy
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    async def run() -> dict[str, object] | None:
        async with open_store(policy.redis) as store:
            return await verdictlog.fetch(store, args.id)

    try:
        found = asyncio.run(run())
    except StoreError as exc:
        print(f"mailgate explain: store error: {exc}", file=sys.stderr)
        return 1
    if found is None:
        keep = policy.explain.keep
        why = (
            f"verdicts are kept for {format_duration(keep)} (explain.keep)"
            if keep > 0
            else "explain.keep = 0: verdicts are not kept"
        )
        print(f"mailgate explain: no verdict kept for {args.id} ({why})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    records = found.get("records")
    for i, rec in enumerate(records if isinstance(records, list) else []):
        if i:
            print()
        _print_verdict(rec)
    return 0


def _print_verdict(rec: dict[str, object]) -> None:
    """One kept record as text; every value escaped where it is not printable.

    Why: HELO, addresses, replies and symbol details came from a client or its DNS;
    raw, a terminal escape would act on the admin's terminal, a U+2028 fake a line,
    and a lone surrogate (bytes a client sent) crash the print.
    """
    from filter.logs import printable

    def text(key: str) -> str:
        value = rec.get(key)
        return "" if value is None else printable(str(value))

    event = "refused at RCPT" if rec.get("event") == "rcpt_refused" else text("outcome")
    when = rec.get("time")
    stamp = _when(float(when)) if isinstance(when, int | float) else "?"
    print(f"message {text('id')}  {stamp}  {event}".rstrip())
    name = f" ({text('client_name')})" if rec.get("client_name") else ""
    print(f"client:   {text('client')}{name}   helo: {text('helo') or '-'}")
    rcpts = rec.get("rcpts")
    targets = ", ".join(f"<{printable(str(r))}>" for r in rcpts) if isinstance(rcpts, list) else ""
    print(f"envelope: <{text('from')}> -> {targets or '-'}")
    score = rec.get("score")
    shown = f"{score:g}" if isinstance(score, int | float) else "-"
    would = f"   (monitor mode: would {text('would')})" if rec.get("would") else ""
    print(f"action:   {text('action')}   score: {shown}{would}")
    if rec.get("reason"):
        print(f"reason:   {text('reason')}")
    print(f"reply:    {text('reply')}")
    if rec.get("queue_id"):
        print(f"queue id: {text('queue_id')}")
    symbols = rec.get("symbols")
    if isinstance(symbols, list) and symbols:
        print(f"{'symbol':32} {'score':>7}  detail")
        for s in symbols:
            if isinstance(s, dict):
                value = s.get("score")
                num = f"{value:7.2f}" if isinstance(value, int | float) else f"{'-':>7}"
                name, detail = printable(str(s.get("name", ""))), s.get("detail") or ""
                print(f"{name:32} {num}  {printable(str(detail))}")


def cmd_domain(args: argparse.Namespace) -> int:
    """``mailgate domain DOMAIN``: SPF, DMARC and MX with their problems and advice.

    Exit 0 no errors found (warnings allowed), 1 errors found, 2 bad input or policy.
    """
    import json

    from filter.domaincheck import audit
    from filter.policy import PolicyError, load_policy

    try:
        policy = load_policy(_config(args)).policy
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        report = audit(args.domain, policy.dns.nameservers, policy.dns.timeout)
    except ValueError as exc:
        print(f"mailgate domain: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_domain(report)
    return 1 if report["errors"] else 0


_SPF_ALL = {"pass": "+all", "fail": "-all", "softfail": "~all", "neutral": "?all"}


def _print_domain(report: dict[str, object]) -> None:
    def table(key: str) -> dict[str, object]:
        value = report.get(key)
        return value if isinstance(value, dict) else {}

    servers = report.get("nameservers")
    via = ", ".join(str(s) for s in servers) if isinstance(servers, list) and servers else ""
    print(f"domain {report['domain']}" + (f"  (DNS through {via})" if via else ""))
    spf = table("spf")
    print(f"SPF     {spf.get('record') or '(none)'}")
    if spf.get("record"):
        print(
            f"        {spf.get('dns_lookups')} of 10 DNS lookups, "
            f"{spf.get('void_dns_lookups')} void, ends in {_SPF_ALL.get(str(spf.get('all')), '-')}"
        )
    dmarc = table("dmarc")
    where = f"   (at _dmarc.{dmarc.get('location')})" if dmarc.get("inherited") else ""
    print(f"DMARC   {dmarc.get('record') or '(none)'}{where}")
    tags = dmarc.get("tags")
    if isinstance(tags, dict) and tags:
        print("        " + " ".join(f"{k}={v}" for k, v in tags.items() if k != "rua"))
        print(f"        rua={tags.get('rua') or '-'}")
    mx = table("mx")
    hosts = mx.get("hosts")
    if isinstance(hosts, list) and hosts:
        for i, h in enumerate(hosts):
            label = "MX" if i == 0 else ""
            addrs = ", ".join(h.get("addresses") or []) or "(no address)"
            print(f"{label:7} {h.get('preference')} {h.get('hostname')}  {addrs}")
    else:
        print("MX      (null MX: no mail accepted)" if mx.get("null_mx") else "MX      (none)")
    problems = report.get("problems")
    print()
    if not isinstance(problems, list) or not problems:
        print("no problems found")
        return
    print("problems:")
    for p in problems:
        print(f"  {p['severity']:8} {p['area']:6} {p['problem']}")
        print(f"  {'':8} {'':6} advice: {p['advice']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailgate", description="Inline SMTP filter for Postfix")
    p.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def config_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            help="main policy file (default: $MAILGATE_CONFIG, then policies/mailgate.toml)",
        )

    s = sub.add_parser("serve", help="run the proxy and the metrics/health listener")
    config_opt(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="run the pipeline on one message and explain the verdict")
    c.add_argument("file", nargs="?", help="message file (.eml)")
    c.add_argument("--ip", help="client IP address to assume")
    c.add_argument("--helo", help="HELO/EHLO name to assume")
    c.add_argument("--mail-from", help="envelope sender (default: null sender)")
    c.add_argument(
        "--rcpt",
        action="extend",
        nargs="+",
        metavar="ADDR",
        help="envelope recipients (several after one --rcpt, or --rcpt repeated)",
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--replay", help="Maildir or folder of .eml files to replay")
    c.add_argument("--policy", action="append", help="policy file for --replay (NEW, then OLD)")
    config_opt(c)
    c.set_defaults(func=cmd_check)

    pol = sub.add_parser("policy", help="validate or show the merged policy")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate; print each error as file: key: message")
    config_opt(pc)
    ps = psub.add_parser("show", help="print the effective merged policy as TOML")
    ps.add_argument(
        "--changed", action="store_true", help="only keys that differ from the defaults"
    )
    config_opt(ps)
    pol.set_defaults(func=cmd_policy)

    g = sub.add_parser("greylist", help="inspect and edit greylist state in the store")
    gsub = g.add_subparsers(dest="greylist_command", required=True)
    gs = gsub.add_parser("stats", help="count triplets, auto-allowlisted and allowed entries")
    config_opt(gs)
    gw = gsub.add_parser("show", help="list triplets with age and state, and allow entries")
    gw.add_argument("--limit", type=int, default=50, help="at most N of each (default 50)")
    config_opt(gw)
    ga = gsub.add_parser("allow", help="never greylist a client network or SPF-passing domain")
    ga.add_argument("target", metavar="IP|CIDR|DOMAIN")
    ga.add_argument("--ttl", default="365d", help="how long the entry lasts (default 365d)")
    config_opt(ga)
    gf = gsub.add_parser(
        "forget", help="delete the triplets, AWL and allow entries of a network (or a domain)"
    )
    gf.add_argument("target", metavar="IP|CIDR")
    config_opt(gf)
    g.set_defaults(func=cmd_greylist)

    e = sub.add_parser("explain", help="print a past verdict by session/message id")
    e.add_argument("id", metavar="ID", help="message id <session>.<n>, or a session id")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    config_opt(e)
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser(
        "domain", help="audit a domain's SPF, DMARC and MX (exit 1 when errors are found)"
    )
    d.add_argument("domain", metavar="DOMAIN")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    config_opt(d)
    d.set_defaults(func=cmd_domain)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a reader that went away (``| head``) ends it quietly."""
    try:
        try:
            args = build_parser().parse_args(argv)
            code = int(args.func(args))
        finally:
            sys.stdout.flush()  # here, not at exit: also after --help, --version
    except BrokenPipeError:
        return _stdout_closed()
    return code


def _stdout_closed() -> int:
    """What Unix tools do when the pipe closes: stop, no traceback, 128 + SIGPIPE.

    stdout is pointed at /dev/null first, so the interpreter's final flush of what
    is still buffered has nowhere to fail.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
