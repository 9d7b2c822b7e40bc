"""The ``mailgate`` command line (L6): serve, check, policy, and the admin tools.

Exit codes: 0 success (``check`` whatever the verdict), 1 a failed validation or a
runtime error, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from filter import __version__
from filter.policy import PolicyError, default_config_path, load_policy, render_toml


def _config(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_path()


def cmd_serve(args: argparse.Namespace) -> int:
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
    config = _config(args)
    try:
        loaded = load_policy(config)
    except PolicyError as exc:
        for issue in exc.issues:
            print(issue)
        return 1
    if args.policy_command == "check":
        files = ", ".join(str(f) for f in loaded.files)
        print(f"policy OK: {files}")
        return 0
    sys.stdout.write(render_toml(loaded.policy, changed_only=args.changed))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from filter.checks.registry import build_checks
    from filter.dryrun import DryRun, evaluate
    from filter.netaddr import normalize_ip
    from filter.pipeline import Pipeline
    from filter.resolver import Resolver

    if args.replay:
        print("mailgate check --replay: not available in this version yet", file=sys.stderr)
        return 2
    if not args.file or not args.ip:
        print("mailgate check: FILE.eml and --ip are required", file=sys.stderr)
        return 2
    try:
        normalize_ip(args.ip)
    except ValueError:
        print(f"mailgate check: --ip {args.ip!r} is not an IP address", file=sys.stderr)
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
    rcpts = args.rcpt or []

    async def run() -> DryRun:
        resolver = Resolver(policy.dns.nameservers, policy.dns.timeout)
        mail_from = args.mail_from or ""
        return await evaluate(
            policy, pipeline, content, args.ip, args.helo, mail_from, rcpts, resolver
        )

    outcome = asyncio.run(run())
    v = outcome.verdict
    found = {r.check: r.result for r in outcome.results}
    results: dict[str, object] = {k: found.get(k, "none") for k in ("spf", "dkim", "dmarc")}
    results["dnsbl"] = [s.name for r in outcome.results if r.check == "dnsbl" for s in r.symbols]
    results.update({k: val for k, val in found.items() if k not in results})
    symbols = [{"name": s.name, "score": s.score, "detail": s.detail} for s in v.symbols]
    data = {
        "action": v.action.value,
        "score": v.score,
        "smtp_reply": str(outcome.reply),
        "stage": outcome.stage.label,
        "reason": v.reason,
        "would": v.would.value if v.would else None,
        "trusted": outcome.trusted,
        "results": results,
        "symbols": symbols,
        "checks_run": sorted(found),
        "authentication_results": outcome.authentication_results,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"action:  {v.action.value}   score: {v.score:g}   stage: {outcome.stage.label}")
    print(f"reply:   {outcome.reply}")
    if v.reason:
        print(f"reason:  {v.reason}")
    if outcome.trusted:
        print("client is in server.trusted_networks: no checks run")
    print(f"checks:  {', '.join(sorted(found)) or '(none enabled)'}")
    if outcome.authentication_results:
        print(outcome.authentication_results)
    if symbols:
        print(f"{'symbol':32} {'score':>7}  detail")
        for s in v.symbols:
            print(f"{s.name:32} {s.score:7.2f}  {s.detail}")
    return 0


def _crlf(raw: bytes) -> bytes:
    """Files on disk usually have LF line ends; SMTP content has CRLF."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def cmd_pending(args: argparse.Namespace) -> int:
    print(f"mailgate {args.command}: not available in this version yet", file=sys.stderr)
    return 2


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
    c.add_argument("--rcpt", action="append", help="envelope recipient (repeatable)")
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

    for name, text in (
        ("explain", "print a past verdict by session/message id"),
        ("domain", "audit a domain's SPF, DMARC and MX"),
        ("greylist", "inspect and edit greylist state"),
    ):
        x = sub.add_parser(name, help=text)
        x.add_argument("rest", nargs=argparse.REMAINDER)
        x.set_defaults(func=cmd_pending)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
