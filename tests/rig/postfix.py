"""A private Postfix instance (own config dir, spool and Maildirs) for end-to-end tests.

Runs as root with ``postfix -c <abs dir>/etc``; every path is absolute because Postfix
silently ignores a relative ``-c`` on reload.  Delivery is virtual-only to Maildirs so no
system account or /etc/postfix is touched.

CLI (used by scripts/run.sh)::

    python -m tests.rig.postfix --dir run/postfix --port 10025 start|stop|status
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

DOMAIN = "example.test"
DISCARD_DOMAIN = "discard.test"
DEFAULT_MAILBOXES = ("bob", "alice", "carol")
REJECTED_CLIENT = "127.0.0.66"  # check_client_access rejects it: proves XCLIENT ADDR is used
# check_reverse_client_hostname_access rejects it: proves XCLIENT REVERSE_NAME is used
REJECTED_REVERSE_NAME = "unconfirmed.reverse.test"

_MASTER_SERVICES = """\
pickup    unix  n       -       n       1       1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def ipv6_loopback_available() -> bool:
    """True when ::1 can be bound (containers often lack IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _wait_port(host: str, port: int, timeout: float) -> bool:
    """Wait until something accepts on host:port and sends a 220 greeting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(2.0)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class PostfixInstance:
    """One private Postfix: virtual domain example.test, Maildirs under ``vmail/``.

    Recipients: bob, alice, carol @example.test (plus ``mailboxes``); any other local
    part gets ``550 5.1.1`` at RCPT (no catch-all).  ``x@discard.test`` is accepted and
    discarded; every other domain gets ``554 5.7.1 Relay access denied``.  XCLIENT and
    XFORWARD are allowed from 127.0.0.0/8 (and ::1); client ``127.0.0.66`` is rejected
    by ``check_client_access`` so tests can prove the XCLIENT address reaches Postfix.

    ``forbid_bare_newline`` defaults to ``"no"``, Postfix 3.7's own default: Postfix then
    takes a bare LF as a line end, so ``<LF>.<LF>`` ends DATA and a smuggled message
    would be delivered.  That is deliberate: smuggling tests must prove that *mailgate*
    blocks it, not that Postfix happens to.  (Even with ``reject``, Postfix's default
    ``smtpd_forbid_bare_newline_exclusions = $mynetworks`` exempts loopback clients, i.e.
    exactly the proxy.)  Pass ``"reject"`` to test the belt-and-braces setup.

    Filter topology (``proxy_filter_port`` + ``after_filter_port``): the public smtpd on
    ``listen_port`` hands every session to ``smtpd_proxy_filter=127.0.0.1:<filter>``
    (mailgate in filter mode, which gets XFORWARD from Postfix), and mailgate delivers to
    a restriction-less smtpd on ``127.0.0.1:<after>`` that believes XFORWARD/XCLIENT
    from loopback, as in SMTPD_PROXY_README.

    Admin snippets (``main_snippets`` / ``master_snippets``): text appended verbatim to
    main.cf / master.cf, e.g. the files in ``deploy/postfix/`` with their ports changed.
    A main.cf parameter a snippet sets is left out of the rig's own settings, so the
    snippet's value is the one Postfix reads (no duplicate-entry warnings).  With
    ``own_listeners=False`` the rig writes none of its smtpd services: the master
    snippets must provide ``listen_port`` (and the filter ports) themselves.
    """

    def __init__(
        self,
        base_dir: Path,
        listen_port: int,
        extra_main: dict[str, str] | None = None,
        extra_master: list[str] | None = None,
        *,
        listen_host: str = "127.0.0.1",
        mailboxes: Iterable[str] = (),
        forbid_bare_newline: str = "no",
        proxy_filter_port: int | None = None,
        after_filter_port: int | None = None,
        proxy_options: str = "",
        proxy_timeout: str = "30s",
        main_snippets: Sequence[str] = (),
        master_snippets: Sequence[str] = (),
        own_listeners: bool = True,
    ) -> None:
        if (proxy_filter_port is None) != (after_filter_port is None):
            raise ValueError("the filter topology needs both proxy_filter_port and after_port")
        self.base_dir = Path(base_dir).resolve()
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.extra_main = dict(extra_main or {})
        self.extra_master = list(extra_master or [])
        self.mailboxes = list(dict.fromkeys([*DEFAULT_MAILBOXES, *mailboxes]))
        self.forbid_bare_newline = forbid_bare_newline
        self.proxy_filter_port = proxy_filter_port
        self.after_filter_port = after_filter_port
        self.proxy_options = proxy_options
        self.proxy_timeout = proxy_timeout
        self.main_snippets = list(main_snippets)
        self.master_snippets = list(master_snippets)
        self.own_listeners = own_listeners
        self.ipv6 = ipv6_loopback_available()

    @classmethod
    def with_proxy_filter(
        cls,
        base_dir: Path,
        listen_port: int,
        filter_port: int,
        after_port: int,
        **kwargs: object,
    ) -> PostfixInstance:
        """Postfix before mailgate (smtpd_proxy_filter), mailgate -> after-filter smtpd."""
        return cls(
            base_dir,
            listen_port,
            proxy_filter_port=filter_port,
            after_filter_port=after_port,
            **kwargs,  # type: ignore[arg-type]
        )

    # -- paths -----------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.base_dir / "etc"

    @property
    def spool_dir(self) -> Path:
        return self.base_dir / "spool"

    @property
    def vmail_dir(self) -> Path:
        return self.base_dir / "vmail"

    @property
    def maillog_path(self) -> Path:
        return self.base_dir / "maillog"

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.listen_port)

    # -- config --------------------------------------------------------------------------
    def main_cf(self) -> dict[str, str]:
        """main.cf as a dict (tests may read it to see what the rig promises)."""
        d = str(self.base_dir)
        mynetworks = "127.0.0.0/8" + (" [::1]/128" if self.ipv6 else "")
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": f"{d}/spool",
            "data_directory": f"{d}/data",
            "myhostname": "postfix.mailgate.test",
            "mydomain": "mailgate.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1" + (", [::1]" if self.ipv6 else ""),
            "inet_protocols": "all" if self.ipv6 else "ipv4",
            "mynetworks": mynetworks,
            "syslog_name": f"postfix-mailgate-{self.listen_port}",
            "maillog_file": f"{d}/maillog",
            "maillog_file_prefixes": d,
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": f"{d}/vmail",
            "virtual_mailbox_maps": f"texthash:{d}/etc/vmailbox",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            "virtual_mailbox_limit": "0",
            "smtpd_reject_unlisted_recipient": "yes",
            "relay_domains": DISCARD_DOMAIN,
            "transport_maps": f"inline:{{ {DISCARD_DOMAIN}=discard: }}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unauth_destination",
            "smtpd_client_restrictions": (
                f"check_client_access inline:{{ {REJECTED_CLIENT}=REJECT }},"
                f" check_reverse_client_hostname_access inline:{{ {REJECTED_REVERSE_NAME}=REJECT }}"
            ),
            "smtpd_authorized_xclient_hosts": mynetworks,
            "smtpd_authorized_xforward_hosts": mynetworks,
            "smtpd_forbid_bare_newline": self.forbid_bare_newline,
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "message_size_limit": str(50 * 1024 * 1024),
            "smtputf8_enable": "yes",
            # Fast queue: a deferred message is retried within seconds, not minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "in_flow_delay": "0",
            # Tests provoke many errors on one connection; no tarpit, no disconnect.
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_junk_command_limit": "1000",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "default_process_limit": "100",
        }
        cf.update(self.extra_main)
        for key in self.snippet_main_keys():
            cf.pop(key, None)
        if not self.own_listeners:
            # The snippets' services decide whom they believe; a main.cf default from
            # the rig would let a snippet that forgot its -o pass the tests.
            cf.pop("smtpd_authorized_xclient_hosts", None)
            cf.pop("smtpd_authorized_xforward_hosts", None)
        return cf

    def snippet_main_keys(self) -> set[str]:
        """main.cf parameters that ``main_snippets`` set (commented lines do not count)."""
        keys: set[str] = set()
        for text in self.main_snippets:
            keys.update(re.findall(r"^([A-Za-z0-9_]+)[ \t]*=", text, flags=re.MULTILINE))
        return keys

    def master_cf(self) -> str:
        lines: list[str] = []
        hosts = [self.listen_host]
        if self.listen_host == "127.0.0.1" and self.ipv6:
            hosts.append("[::1]")
        if not self.own_listeners:
            hosts = []
        for host in hosts:
            lines.append(f"{host}:{self.listen_port} inet n - n - - smtpd")
            if self.proxy_filter_port is not None:
                lines += [
                    f"  -o smtpd_proxy_filter=127.0.0.1:{self.proxy_filter_port}",
                    f"  -o smtpd_proxy_options={self.proxy_options}",
                    f"  -o smtpd_proxy_timeout={self.proxy_timeout}",
                    "  -o smtpd_proxy_ehlo=postfix-before.mailgate.test",
                ]
        if self.after_filter_port is not None and self.own_listeners:
            lines += [
                f"127.0.0.1:{self.after_filter_port} inet n - n - - smtpd",
                "  -o syslog_name=postfix-after-filter",
                "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8",
                "  -o smtpd_authorized_xclient_hosts=127.0.0.0/8",
                "  -o smtpd_client_restrictions=",
                "  -o smtpd_helo_restrictions=",
                "  -o smtpd_sender_restrictions=",
                "  -o smtpd_relay_restrictions=",
                "  -o smtpd_recipient_restrictions=reject_unauth_destination",
                "  -o smtpd_data_restrictions=",
                "  -o smtpd_end_of_data_restrictions=",
                "  -o mynetworks=127.0.0.0/8",
                "  -o smtpd_proxy_filter=",
            ]
        lines.append(_MASTER_SERVICES)
        lines += self.extra_master
        lines += [text.rstrip("\n") for text in self.master_snippets]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        """Create the directory tree and write main.cf, master.cf and the mailbox map."""
        for sub in ("etc", "spool", "data", "vmail"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        # Daemons run as postfix/nobody and open absolute paths under base_dir.
        for parent in self.base_dir.parents:
            if not parent.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{parent} is not searchable by others; Postfix daemons could not reach "
                    f"{self.base_dir} (use a directory such as tempfile.mkdtemp())"
                )
        # master.lock lives in data_directory, which must belong to mail_owner.
        shutil.chown(self.base_dir / "data", "postfix", "postfix")
        shutil.chown(self.vmail_dir, "nobody", "nogroup")
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        main += "".join("\n" + text.rstrip("\n") + "\n" for text in self.main_snippets)
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(self.master_cf())
        self._write_mailboxes()
        self.maillog_path.touch()

    def _write_mailboxes(self) -> None:
        text = "".join(f"{m}@{DOMAIN} {m}/\n" for m in self.mailboxes)
        (self.config_dir / "vmailbox").write_text(text)

    # -- lifecycle -----------------------------------------------------------------------
    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["postfix", "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"postfix {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stdout}{proc.stderr}\n--- maillog tail ---\n{self.maillog()[-3000:]}"
            )
        return proc

    def master_pid(self) -> int | None:
        """PID of the running master, or None (stale pid files are ignored)."""
        try:
            pid = int((self.spool_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def is_running(self) -> bool:
        # Not `postfix status`: that takes ~2.4 s when the instance is down.
        return self.master_pid() is not None

    def start(self, timeout: float = 20.0) -> PostfixInstance:
        """Write config and start; returns once the SMTP port greets with 220."""
        if shutil.which("postfix") is None:
            raise RuntimeError("postfix is not installed: run scripts/bootstrap.sh")
        if os.geteuid() != 0:
            raise RuntimeError("the private Postfix instance needs root")
        self.write_config()
        if self.is_running():
            self.stop()
        self._postfix("start")
        ports = [self.listen_port]
        if self.after_filter_port is not None:
            ports.append(self.after_filter_port)
        for port in ports:
            # The before-filter smtpd greets only after its proxy connect succeeds,
            # so for it we wait for the socket alone.
            if port == self.listen_port and self.proxy_filter_port is not None:
                ok = self._wait_listen(port, timeout)
            else:
                ok = _wait_port("127.0.0.1", port, timeout)
            if not ok:
                raise RuntimeError(
                    f"Postfix did not answer on 127.0.0.1:{port}\n{self.maillog()[-3000:]}"
                )
        return self

    @staticmethod
    def _wait_listen(port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self, timeout: float = 15.0, wait: bool = True) -> None:
        """Stop the master (idempotent); waits for it to exit unless ``wait=False``.

        The master needs ~1.5 s to exit; session teardown need not wait for that.
        """
        pid = self.master_pid()
        if pid is None:
            return
        self._postfix("stop", check=False)
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)

    def reload(self) -> None:
        """Re-read main.cf/master.cf (config is rewritten first) and restart the daemons."""
        self.write_config()
        self._postfix("reload")
        time.sleep(0.3)  # master restarts its children asynchronously

    def add_mailbox(self, name: str) -> None:
        """Add name@example.test -> name/ and reload."""
        if name not in self.mailboxes:
            self.mailboxes.append(name)
        self.reload()

    def flush(self) -> None:
        """Retry deferred mail now."""
        self._postfix("flush", check=False)

    # -- observation -----------------------------------------------------------------------
    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _mail_files(self, mailbox: str) -> list[Path]:
        root = self.vmail_dir / mailbox
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = root / sub
            if d.is_dir():
                files += [p for p in d.iterdir() if p.is_file()]
        # Maildir names start with the delivery time in seconds, then a unique part.
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return files

    def messages(self, mailbox: str) -> list[bytes]:
        """Raw messages (as delivered, LF line ends) in vmail/<mailbox>, oldest first."""
        out = []
        for p in self._mail_files(mailbox):
            with contextlib.suppress(FileNotFoundError):
                out.append(p.read_bytes())
        return out

    def wait_for_messages(self, mailbox: str, n: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Poll until at least n messages are in the mailbox; raise with the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(mailbox)
            if len(msgs) >= n:
                return msgs
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{mailbox}: {len(msgs)} of {n} messages after {timeout}s\n"
                    f"--- maillog tail ---\n{self.maillog()[-4000:]}"
                )
            time.sleep(0.05)

    def clear_mail(self) -> None:
        """Empty every Maildir (keeps the directories Postfix created)."""
        if not self.vmail_dir.is_dir():
            return
        for box in self.vmail_dir.iterdir():
            for sub in ("new", "cur", "tmp"):
                d = box / sub
                if d.is_dir():
                    for p in d.iterdir():
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()

    def queue_is_empty(self) -> bool:
        """True when nothing is waiting in incoming/active/deferred."""
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.spool_dir / sub
            if d.is_dir() and any(p.is_file() for p in d.rglob("*")):
                return False
        return True

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``start`` / ``stop`` / ``status`` a private instance from the command line."""
    ap = argparse.ArgumentParser(prog="python -m tests.rig.postfix", description=main.__doc__)
    ap.add_argument("--dir", required=True, type=Path, help="instance directory")
    ap.add_argument("--port", required=True, type=int, help="SMTP port on 127.0.0.1")
    ap.add_argument("action", choices=["start", "stop", "status"])
    args = ap.parse_args(argv)
    pf = PostfixInstance(args.dir, args.port)
    if args.action == "start":
        pf.start()
        print(f"postfix listening on 127.0.0.1:{args.port}, mail in {pf.vmail_dir}/<user>/new")
    elif args.action == "stop":
        pf.stop()
    else:
        running = pf.master_pid() is not None
        print("running" if running else "stopped")
        return 0 if running else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
