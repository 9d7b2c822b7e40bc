"""Policy replay: run stored mail through two policies and report what would change (L4).

Why: a policy change (a threshold, a symbol score, a new DNSBL zone) is easiest to
judge on the mail a site really gets. ``mailgate check --replay DIR --policy NEW
[--policy OLD]`` takes a Maildir (``cur/`` and ``new/``) or a folder of ``.eml``
files, rebuilds each message's SMTP envelope, and runs :func:`filter.dryrun.evaluate`
with each policy.

The envelope is rebuilt from what delivery left in the message, or from a sidecar
``<file>.env.json`` (``{"ip", "helo", "mail_from", "rcpts"}``) whose keys win:

* MAIL FROM: ``Return-Path`` (written at final delivery from the envelope sender;
  ``<>`` is the null sender), else the ``smtp.mailfrom`` of the topmost
  Authentication-Results (ours records it). When that one has no local part (ours
  leaves a non-ASCII one out), the From address at its domain supplies it; with
  none, the sender is unknown and the message is skipped, never judged as ``<>``
  or ``postmaster@``;
* RCPT: ``X-Original-To`` (the address as the client gave it, before aliases — what
  mailgate saw), else ``Delivered-To``, else the ``To``/``Cc`` addresses. Of several,
  the one nearest the client's Received (a forward inside the site adds more above);
  delivery fields below it came with the message from an earlier site and are not
  this envelope;
* client IP and HELO: the topmost ``Received`` field in Postfix's form
  ``from HELO (NAME [IP])`` whose IP is not in ``server.trusted_networks`` — hops
  inside the site (content filters, LMTP on loopback) are trusted, so the first
  untrusted one is the client mailgate judged.

The message is replayed as mailgate received it: the fields added after it (local
delivery's Return-Path/Delivered-To/X-Original-To, the Received fields down to the
client's, and mailgate's own Authentication-Results/X-Spam-*) are removed first, so
our old verdict does not leak into the new one.

What is not replayed: greylisting and rate limits are switched off in both
policies. They decide by stored state (has this triplet retried? how many messages
this hour?), not by the message; stored mail has passed them already, and replaying
them would only say "new triplet" for everything. Replay therefore needs no store and
changes none. Both policies share one resolver (the NEW policy's ``[dns]``), so both
see the same DNS answers: DNS has moved on since the mail arrived (DKIM keys rotate,
listings expire), but it moved on for both sides alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any, TextIO

from filter.checks.registry import build_checks
from filter.domains import to_a_label
from filter.dryrun import DryRun, evaluate
from filter.headers import field_value, header_end, split_fields
from filter.netaddr import ip_in, normalize_ip
from filter.pipeline import Pipeline
from filter.policy.schema import Policy
from filter.resolver import Resolver
from filter.results import Action

__all__ = [
    "ACTIONS",
    "Envelope",
    "Judged",
    "Progress",
    "ReplayReport",
    "collect_files",
    "crlf",
    "envelope_from",
    "format_report",
    "load",
    "prepare",
    "replay",
    "sidecar_path",
    "stateless",
]

ACTIONS = tuple(a.value for a in Action)
PROGRESS_MIN_FILES = 50
CONCURRENCY = 8  # messages judged at once: DNS-bound, and kind to the resolvers

# Postfix's Received: "from HELO (NAME [IP])" or "(NAME [IPv6:addr]:port)"; NAME may be
# "unknown". Other MTAs' forms are not guessed at: a sidecar file covers them.
_RECEIVED = re.compile(
    r"^from\s+(?P<helo>\S+)\s+\((?:(?P<name>[^\s\[\]()]+)\s+)?\[(?:IPv6:)?(?P<ip>[0-9A-Fa-f:.]+)\]",
    re.IGNORECASE,
)
_DELIVERY_FIELDS = {b"return-path", b"delivered-to", b"x-original-to"}
_OUR_FIELDS = {b"authentication-results", b"x-spam-flag", b"x-spam-score", b"x-spam-status"}


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope a stored message arrived with, as far as it can be rebuilt."""

    ip: str | None
    helo: str | None
    mail_from: str | None  # None: no field tells the sender ("" is the null sender)
    rcpts: tuple[str, ...]
    source: str  # "headers" | "sidecar" | "headers+sidecar"
    received_index: int | None = None  # header field index of the client's Received


def crlf(raw: bytes) -> bytes:
    """Files on disk usually have LF line ends; SMTP content has CRLF."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".env.json")


def load(path: Path) -> tuple[bytes, dict[str, Any] | None]:
    """A message file (CRLF line ends) and its sidecar's data, if it has one."""
    content = crlf(path.read_bytes())
    side = sidecar_path(path)
    if not side.is_file():
        return content, None
    data = json.loads(side.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{side.name} must hold a JSON object")
    return content, data


def _fields(content: bytes) -> list[tuple[bytes, bytes]]:
    end = header_end(content)
    block = content[:end] if end is not None else content
    return list(split_fields(block))


def _addresses(values: Iterable[str]) -> list[str]:
    return [addr for _, addr in getaddresses(list(values)) if "@" in addr]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def envelope_from(
    content: bytes,
    sidecar: dict[str, Any] | None = None,
    trusted: Callable[[str], bool] = lambda ip: False,
) -> Envelope:
    """Rebuild the envelope of ``content`` (CRLF) from its headers and ``sidecar``.

    ``trusted(ip)`` says which Received hops are inside the site and skipped. Raises
    ValueError when the sidecar is malformed. ``mail_from`` is None when no field
    tells the sender (see :func:`_sender`).
    """
    fields = _fields(content)
    ip, helo, index = _client_hop(fields, trusted)
    after = _added_after_mailgate(fields, index)
    first: dict[bytes, str] = {}
    for name, raw in after:
        if name and name not in first:
            first[name] = field_value(raw)
    rcpts: list[str] = []
    for name in (b"x-original-to", b"delivered-to"):
        # The field nearest the client's hop: a forward inside the site re-delivers
        # and adds another above it, but the client gave the first one's address.
        found = [raw for n, raw in after if n == name]
        rcpts = _addresses([field_value(found[-1])]) if found else []
        if rcpts:
            break
    if not rcpts:
        rcpts = _addresses(field_value(raw) for n, raw in fields if n in (b"to", b"cc"))
    ar_from, ar_helo = _from_authentication_results(after if index is not None else fields)
    mail_from = _sender(first.get(b"return-path"), ar_from, fields)
    if helo is None and ar_helo:
        helo = ar_helo
    source = "headers"
    if sidecar is not None:
        ip, helo, mail_from, rcpts = _apply_sidecar(sidecar, ip, helo, mail_from, rcpts)
        source = "sidecar" if index is None else "headers+sidecar"
    return Envelope(ip, helo, mail_from, tuple(dict.fromkeys(rcpts)), source, index)


def _client_hop(
    fields: list[tuple[bytes, bytes]], trusted: Callable[[str], bool]
) -> tuple[str | None, str | None, int | None]:
    """(IP, HELO, field index) of the topmost untrusted Postfix Received field."""
    for i, (name, raw) in enumerate(fields):
        if name != b"received":
            continue
        m = _RECEIVED.match(" ".join(field_value(raw).split()))
        if m is None or not _is_ip(m.group("ip")):
            continue
        candidate = normalize_ip(m.group("ip"))
        if not trusted(candidate):
            return candidate, m.group("helo"), i
    return None, None, None


def _added_after_mailgate(
    fields: list[tuple[bytes, bytes]], index: int | None
) -> list[tuple[bytes, bytes]]:
    """The fields written after mailgate saw the message: the ones :func:`prepare` drops.

    Return-Path, Delivered-To and X-Original-To further down came in with the
    message (a forward from another site): they are another hop's envelope.
    """
    if index is None:
        top = 0
        while top < len(fields) and fields[top][0] in _DELIVERY_FIELDS:
            top += 1
        return fields[:top]
    end = index + 1
    while end < len(fields) and fields[end][0] in _OUR_FIELDS:
        end += 1
    return fields[:end]


def _sender(return_path: str | None, ar_from: str, fields: list[tuple[bytes, bytes]]) -> str | None:
    """MAIL FROM: Return-Path, else Authentication-Results' ``smtp.mailfrom``; None if unknown.

    A Return-Path is the envelope sender as delivery saw it, ``<>`` included: a
    bounce does not fall back to another field. ``smtp.mailfrom`` may lack its local
    part: ours leaves a non-ASCII (SMTPUTF8) one out (``@domain``, see
    ``authresults.ascii_mailbox``), other writers give the bare domain. That domain
    alone replayed as ``<@domain>``, which SPF reads as ``postmaster@domain`` and no
    sender list matches, so the local part is taken from the From address at that
    domain (a non-ASCII one for ``@domain``): an SMTPUTF8 sender's envelope is
    nearly always its From mailbox. Without one the sender is unknown, never a
    guess: the message is skipped and a sidecar can name it.
    """
    if return_path is not None:
        found = _addresses([return_path])
        return found[0] if found else ""
    if not ar_from:
        return None
    local, at, domain = ar_from.rpartition("@")
    if local:
        return ar_from
    wanted = to_a_label(domain)
    for address in _addresses(field_value(raw) for n, raw in fields if n == b"from"):
        from_local, _, from_domain = address.rpartition("@")
        if wanted is None or to_a_label(from_domain) != wanted:
            continue
        if not at or not from_local.isascii():
            return address
    return None


# RFC 8601 pvalue: a token, or a quoted local part (with quoted-pairs) followed by @domain.
_AR_PROPERTY = re.compile(
    r'\bsmtp\.(mailfrom|helo)=((?:"(?:[^"\\]|\\.)*"|[^\s;"])+)', re.IGNORECASE
)


def _from_authentication_results(fields: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """``smtp.mailfrom`` and ``smtp.helo`` of the topmost Authentication-Results field."""
    for name, raw in fields:
        if name == b"authentication-results":
            value = field_value(raw)
            found = {m.group(1).lower(): m.group(2) for m in _AR_PROPERTY.finditer(value)}
            return found.get("mailfrom", ""), found.get("helo", "")
    return "", ""


def _apply_sidecar(
    data: dict[str, Any],
    ip: str | None,
    helo: str | None,
    mail_from: str | None,
    rcpts: list[str],
) -> tuple[str | None, str | None, str | None, list[str]]:
    unknown = set(data) - {"ip", "helo", "mail_from", "rcpts"}
    if unknown:
        raise ValueError(f"unknown sidecar keys: {', '.join(sorted(unknown))}")
    if "ip" in data:
        if not isinstance(data["ip"], str) or not _is_ip(data["ip"]):
            raise ValueError(f"sidecar ip {data['ip']!r} is not an IP address")
        ip = normalize_ip(data["ip"])
    if "helo" in data:
        if data["helo"] is not None and not isinstance(data["helo"], str):
            raise ValueError("sidecar helo must be a string or null")
        helo = data["helo"] or None
    if "mail_from" in data:
        if not isinstance(data["mail_from"], str):
            raise ValueError("sidecar mail_from must be a string ('' for the null sender)")
        mail_from = data["mail_from"].strip().strip("<>")
    if "rcpts" in data:
        value = data["rcpts"]
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            raise ValueError("sidecar rcpts must be a list of addresses")
        rcpts = [r.strip().strip("<>") for r in value if r.strip()]
    return ip, helo, mail_from, rcpts


def prepare(content: bytes, env: Envelope) -> bytes:
    """``content`` as mailgate received it: the fields added after it are removed.

    Without an identified client Received field only the local delivery fields at
    the top go; with one, every field above it, itself, and then mailgate's own
    fields right below it (its Authentication-Results and X-Spam-* on accepted mail).
    """
    end = header_end(content)
    if end is None:
        return content
    fields = list(split_fields(content[:end]))
    if env.received_index is not None:
        fields = fields[env.received_index + 1 :]
        while fields and fields[0][0] in _OUR_FIELDS:
            fields.pop(0)
    else:
        while fields and fields[0][0] in _DELIVERY_FIELDS:
            fields.pop(0)
    return b"".join(raw for _, raw in fields) + content[end:]


def collect_files(folder: Path) -> list[Path]:
    """The messages of a Maildir (``cur/`` and ``new/``) or of a folder of ``.eml`` files.

    Sorted, so two runs over the same folder list messages in the same order.
    Sidecar files and Maildir's ``tmp/`` (deliveries in progress) are never messages.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory")
    maildir = [folder / "cur", folder / "new"]
    if any(d.is_dir() for d in maildir):
        files = [
            p
            for d in maildir
            if d.is_dir()
            for p in d.iterdir()
            if p.is_file() and not p.name.endswith(".env.json") and not p.name.startswith(".")
        ]
    else:
        files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".eml"]
    return sorted(files)


def stateless(policy: Policy) -> Policy:
    """``policy`` with the checks that judge by stored state switched off (see above)."""
    changes: dict[str, Any] = {}
    for name in ("greylist", "ratelimit"):
        table = getattr(policy, name, None)
        if table is not None and getattr(table, "enabled", False):
            changes[name] = dataclasses.replace(table, enabled=False)
    return dataclasses.replace(policy, **changes) if changes else policy


@dataclass
class Judged:
    """One message's outcome under both policies, or why it was skipped."""

    file: str
    envelope: Envelope | None = None
    old: DryRun | None = None
    new: DryRun | None = None
    skipped: str = ""

    @property
    def delta(self) -> float:
        if self.old is None or self.new is None:
            return 0.0
        return round(self.new.verdict.score - self.old.verdict.score, 4)

    @property
    def action_changed(self) -> bool:
        return (
            self.old is not None
            and self.new is not None
            and self.old.verdict.action != self.new.verdict.action
        )

    @property
    def changed(self) -> bool:
        return self.action_changed or abs(self.delta) >= 0.005

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file}
        if self.skipped:
            out["skipped"] = self.skipped
            return out
        assert self.envelope is not None and self.old is not None and self.new is not None
        e = self.envelope
        out["envelope"] = {
            "ip": e.ip,
            "helo": e.helo,
            "mail_from": e.mail_from,
            "rcpts": list(e.rcpts),
            "source": e.source,
        }
        old_names = {s.name for s in self.old.verdict.symbols}
        new_names = {s.name for s in self.new.verdict.symbols}
        out["old"] = _outcome(self.old)
        out["new"] = _outcome(self.new)
        out["delta"] = self.delta
        out["action_changed"] = self.action_changed
        out["symbols_added"] = sorted(new_names - old_names)
        out["symbols_removed"] = sorted(old_names - new_names)
        return out


def _outcome(run: DryRun) -> dict[str, Any]:
    v = run.verdict
    return {
        "action": v.action.value,
        "score": v.score,
        "stage": run.stage.label,
        "reply": str(run.reply),
        "reason": v.reason,
        "symbols": [{"name": s.name, "score": s.score} for s in v.symbols],
    }


@dataclass
class ReplayReport:
    """Everything ``check --replay`` prints, as data (``--json`` prints :meth:`to_json`)."""

    folder: str
    new_policy: str
    old_policy: str
    messages: list[Judged] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def judged(self) -> list[Judged]:
        return [j for j in self.messages if not j.skipped]

    def counts(self, which: str) -> dict[str, int]:
        runs = [j.old if which == "old" else j.new for j in self.judged]
        c = Counter(r.verdict.action.value for r in runs if r is not None)
        return {a: c.get(a, 0) for a in ACTIONS}

    def transitions(self) -> dict[str, dict[str, int]]:
        """``{old action: {new action: count}}`` over every judged message."""
        out: dict[str, dict[str, int]] = {a: dict.fromkeys(ACTIONS, 0) for a in ACTIONS}
        for j in self.judged:
            assert j.old is not None and j.new is not None
            out[j.old.verdict.action.value][j.new.verdict.action.value] += 1
        return out

    def changed(self) -> list[Judged]:
        """Changed messages, action changes first, then by the size of the score change."""
        return sorted(
            (j for j in self.judged if j.changed),
            key=lambda j: (not j.action_changed, -abs(j.delta), j.file),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "policies": {"new": self.new_policy, "old": self.old_policy},
            "files": len(self.messages),
            "judged": len(self.judged),
            "skipped": [j.to_json() for j in self.messages if j.skipped],
            "actions": {"old": self.counts("old"), "new": self.counts("new")},
            "transitions": self.transitions(),
            "changed": [j.to_json() for j in self.changed()],
            "not_replayed": ["greylist", "ratelimit"],
            "seconds": round(self.seconds, 3),
        }


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10% elsewhere.

    Shown on a terminal, or for long runs (more than 50 files) whose output goes to a
    log, where a silent minute looks like a hang.
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = total > 0 and (self.tty or total > PROGRESS_MIN_FILES)
        self.started = time.monotonic()
        self._last_tenth = -1

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.monotonic() - self.started
        eta = elapsed / frac - elapsed if frac else 0.0
        text = f"{self.done}/{self.total} {frac * 100:3.0f}%  eta {eta:4.0f}s"
        if self.tty:
            width = 30
            bar = "#" * int(frac * width)
            self.stream.write(f"\rreplay [{bar:<{width}}] {text}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            tenth = int(frac * 10)
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(f"replay: {text}\n")
        self.stream.flush()


async def replay(
    files: Sequence[Path],
    new: Policy,
    old: Policy,
    resolver: Resolver | None,
    root: Path,
    progress: Progress | None = None,
) -> list[Judged]:
    """Judge every file under ``new`` and ``old`` (made :func:`stateless` here)."""
    new, old = stateless(new), stateless(old)
    pipelines = (
        Pipeline(build_checks(new), new.server.check_timeout),
        Pipeline(build_checks(old), old.server.check_timeout),
    )
    gate = asyncio.Semaphore(CONCURRENCY)

    def trusted(ip: str) -> bool:
        return ip_in(ip, new.server.trusted_networks)

    async def one(path: Path) -> Judged:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        async with gate:
            try:
                judged = await _judge(path, name, new, old, pipelines, resolver, trusted)
            finally:
                if progress is not None:
                    progress.step()
        return judged

    return list(await asyncio.gather(*(one(p) for p in files)))


async def _judge(
    path: Path,
    name: str,
    new: Policy,
    old: Policy,
    pipelines: tuple[Pipeline, Pipeline],
    resolver: Resolver | None,
    trusted: Callable[[str], bool],
) -> Judged:
    try:
        content, sidecar = await asyncio.to_thread(load, path)
        env = envelope_from(content, sidecar, trusted)
    except (OSError, ValueError) as exc:
        return Judged(name, skipped=f"unreadable: {exc}")
    if env.ip is None:
        hint = sidecar_path(path).name
        return Judged(name, env, skipped=f"no client IP in Received fields; add {hint}")
    if env.mail_from is None:
        hint = sidecar_path(path).name
        reason = "no envelope sender in Return-Path or Authentication-Results"
        return Judged(name, env, skipped=f"{reason}; add {hint} with mail_from")
    message = prepare(content, env)
    runs: list[DryRun] = []
    for policy, pipeline in zip((old, new), (pipelines[1], pipelines[0]), strict=True):
        try:
            runs.append(
                await evaluate(
                    policy,
                    pipeline,
                    message,
                    env.ip,
                    env.helo,
                    env.mail_from,
                    list(env.rcpts),
                    resolver,
                    None,
                )
            )
        except Exception as exc:  # one broken message must not end a long replay
            return Judged(name, env, skipped=f"evaluation failed: {type(exc).__name__}: {exc}")
    return Judged(name, env, runs[0], runs[1])


def format_report(report: ReplayReport, limit: int = 50) -> str:
    """The human summary: actions per policy, the old -> new matrix, changed messages."""
    lines = [
        f"replayed {len(report.judged)} of {len(report.messages)} messages from "
        f"{report.folder} in {report.seconds:.1f}s",
        f"old policy: {report.old_policy}",
        f"new policy: {report.new_policy}",
        "not replayed (they judge by stored state): greylist, ratelimit",
        "",
        f"{'action':12} {'old':>6} {'new':>6} {'change':>7}",
    ]
    old_c, new_c = report.counts("old"), report.counts("new")
    for a in ACTIONS:
        lines.append(f"{a:12} {old_c[a]:>6} {new_c[a]:>6} {new_c[a] - old_c[a]:>+7}")
    lines += ["", "old \\ new    " + " ".join(f"{a[:10]:>10}" for a in ACTIONS)]
    for a, row in report.transitions().items():
        lines.append(f"{a:12} " + " ".join(f"{row[b]:>10}" for b in ACTIONS))
    changed = report.changed()
    lines.append("")
    if not changed:
        lines.append("no verdict changed")
    else:
        moved = sum(1 for j in changed if j.action_changed)
        lines.append(f"changed: {moved} actions, {len(changed) - moved} scores only")
        lines.append(f"{'old':>10} {'score':>7}  {'new':>10} {'score':>7} {'delta':>7}  file")
        for j in changed[:limit]:
            assert j.old is not None and j.new is not None
            o, n = j.old.verdict, j.new.verdict
            mark = "*" if j.action_changed else " "
            lines.append(
                f"{o.action.value:>10} {o.score:7.2f}  {n.action.value:>10} {n.score:7.2f} "
                f"{j.delta:+7.2f}{mark} {j.file}"
            )
        if len(changed) > limit:
            lines.append(f"... and {len(changed) - limit} more (--json lists all)")
    skipped = [j for j in report.messages if j.skipped]
    if skipped:
        lines += ["", f"skipped {len(skipped)}:"]
        lines += [f"  {j.file}: {j.skipped}" for j in skipped[:limit]]
        if len(skipped) > limit:
            lines.append(f"  ... and {len(skipped) - limit} more (--json lists all)")
    return "\n".join(lines) + "\n"
