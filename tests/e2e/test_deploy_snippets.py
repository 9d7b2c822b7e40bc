"""The admin's files in deploy/, used as they are, against a real Postfix.

A private Postfix gets ``deploy/postfix/<mode>-main.cf`` appended to its main.cf and
``<mode>-master.cf`` as its only smtpd services; mailgate gets
``deploy/mailgate/10-<mode>.toml`` as a ``local.d`` drop-in. The only change to each
file is the ports (25, 10024, 10025 become free test ports, bound on loopback), so a
snippet that stops working with Postfix, or drifts from what mailgate expects, fails
here. One message per topology goes client -> ... -> Maildir.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import message
from tests.rig.client import smtp_client
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess
from tests.rig.ports import free_port
from tests.rig.postfix import PostfixInstance
from tests.rig.workers import TEST_REDIS_URL

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

pytestmark = pytest.mark.postfix


def substituted(path: Path, replacements: list[tuple[str, str]]) -> str:
    """The file's text with each (pattern, replacement) applied; every pattern must match,
    so a snippet that changes shape fails loudly instead of being tested half-applied."""
    text = path.read_text()
    for pattern, repl in replacements:
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        assert n >= 1, f"{path.relative_to(REPO)}: {pattern!r} no longer matches"
    return text


def postconf(pf: PostfixInstance, *args: str) -> str:
    """postconf's output; a warning (a misspelt or unused parameter in a snippet, a
    malformed master.cf line) fails the test, although Postfix would still start."""
    proc = subprocess.run(
        ["postconf", "-c", str(pf.config_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "warning" not in proc.stderr, proc.stderr
    return proc.stdout


def inet_services(pf: PostfixInstance) -> list[str]:
    """``postconf -M`` lines of the inet services (name type private unpriv chroot ...)."""
    lines = postconf(pf, "-M").splitlines()
    return [line for line in lines if line.split()[1:2] == ["inet"]]


def _need_postfix() -> None:
    if shutil.which("postfix") is None:
        pytest.fail("postfix is not installed; run scripts/bootstrap.sh", pytrace=False)


def _private_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def _mailgate(tmp_path: Path, dropin: str, smtp_port: int, dns: ZoneDNSServer) -> MailgateProcess:
    """mailgate with the test basics in its main file and the deploy drop-in in local.d."""
    mg = MailgateProcess(
        tmp_path / "mg",
        {
            "dns": {"nameservers": [dns.nameserver], "timeout": "1s"},
            "greylist": {"enabled": False},
            "redis": {"url": TEST_REDIS_URL},
        },
        smtp_port=smtp_port,
    )
    (mg.dir / "local.d").mkdir(exist_ok=True)
    (mg.dir / "local.d" / "10-deploy.toml").write_text(dropin)
    return mg


# -- front mode ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def front_postfix() -> Iterator[PostfixInstance]:
    """front-main.cf appended, front-master.cf as the only smtpd (10025 -> a free port)."""
    _need_postfix()
    port = free_port()
    main = (DEPLOY / "postfix/front-main.cf").read_text()
    master = substituted(
        DEPLOY / "postfix/front-master.cf", [(r"127\.0\.0\.1:10025\b", f"127.0.0.1:{port}")]
    )
    base = _private_dir("mailgate-deploy-front-")
    pf = PostfixInstance(
        base, port, main_snippets=[main], master_snippets=[master], own_listeners=False
    )
    pf.start()
    yield pf
    pf.stop(wait=False)
    shutil.rmtree(base, ignore_errors=True)


def test_front_snippets_are_what_postfix_reads(front_postfix: PostfixInstance) -> None:
    postconf(front_postfix, "-n")  # no warnings about what the snippets set
    # XCLIENT is believed by the loopback smtpd alone, not by every smtpd of main.cf.
    assert postconf(front_postfix, "-h", "smtpd_authorized_xclient_hosts").strip() == ""
    service = f"127.0.0.1:{front_postfix.listen_port}/inet/smtpd_authorized_xclient_hosts"
    assert postconf(front_postfix, "-P", service).strip() == f"{service} = 127.0.0.1"
    smtpd = inet_services(front_postfix)
    # Only the loopback smtpd: the public "smtp inet" line stays commented out.
    assert len(smtpd) == 1 and smtpd[0].startswith(f"127.0.0.1:{front_postfix.listen_port} ")


@pytest.mark.parametrize(
    ("client", "listen"),
    [
        ("127.0.0.9", '"127.0.0.1:{port}"'),
        # XCLIENT ADDR=IPV6:..., which a Postfix with inet_protocols = ipv4 refuses, as
        # front-main.cf warns.
        ("::1", '"127.0.0.1:{port}", "[::1]:{port}"'),
    ],
)
def test_front_mode_delivers_with_the_deploy_files(
    tmp_path: Path,
    front_postfix: PostfixInstance,
    dns_server: ZoneDNSServer,
    client: str,
    listen: str,
) -> None:
    if ":" in client and not front_postfix.ipv6:
        pytest.fail("this machine has no IPv6 loopback: the IPv6 path cannot be tested")
    front_postfix.clear_mail()
    mg_port = free_port()
    dropin = substituted(
        DEPLOY / "mailgate/10-front.toml",
        [
            (r'"0\.0\.0\.0:25", "\[::\]:25"', listen.format(port=mg_port)),
            (r"127\.0\.0\.1:10025\b", f"127.0.0.1:{front_postfix.listen_port}"),
        ],
    )
    mg = _mailgate(tmp_path, dropin, mg_port, dns_server).start()
    try:
        host = "::1" if ":" in client else "127.0.0.1"
        with smtp_client(host, mg_port, source_ip=client) as c:
            c.ehlo("mail.sender.example")
            c.mail("alice@example.org")
            c.rcpt("bob@example.test")
            code, text = c.data(message(f"deploy front {client}"))
        assert code == 250 and re.search(rb"queued as [A-Z0-9]+", text), text
        [msg] = front_postfix.wait_for_messages("bob", 1)
        assert f"Subject: deploy front {client}".encode() in msg
        assert b"X-Spam-Status: No" in msg
        # XCLIENT was believed (smtpd_authorized_xclient_hosts from front-master.cf):
        # Postfix logged the real client, not mailgate on 127.0.0.1.
        assert f"client=unknown[{client}]" in front_postfix.maillog()
    finally:
        mg.stop()


# -- filter mode ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def filter_postfix() -> Iterator[PostfixInstance]:
    """filter-main.cf appended; filter-master.cf's smtp (25), 10024 and 10025 on free ports."""
    _need_postfix()
    listen, filt, after = free_port(), free_port(), free_port()
    main = (DEPLOY / "postfix/filter-main.cf").read_text()
    master = substituted(
        DEPLOY / "postfix/filter-master.cf",
        [
            (r"^smtp(\s+inet\s)", f"127.0.0.1:{listen}\\1"),
            (r"127\.0\.0\.1:10024\b", f"127.0.0.1:{filt}"),
            (r"127\.0\.0\.1:10025\b", f"127.0.0.1:{after}"),
        ],
    )
    base = _private_dir("mailgate-deploy-filter-")
    pf = PostfixInstance(
        base,
        listen,
        proxy_filter_port=filt,
        after_filter_port=after,
        main_snippets=[main],
        master_snippets=[master],
        own_listeners=False,
    )
    pf.start()
    yield pf
    pf.stop(wait=False)
    shutil.rmtree(base, ignore_errors=True)


def test_filter_snippets_are_what_postfix_reads(filter_postfix: PostfixInstance) -> None:
    postconf(filter_postfix, "-n")  # no warnings about what the snippets set
    public = f"127.0.0.1:{filter_postfix.listen_port}/inet"
    after = f"127.0.0.1:{filter_postfix.after_filter_port}/inet"
    proxy = postconf(filter_postfix, "-P", f"{public}/smtpd_proxy_filter")
    assert proxy.strip().endswith(f"= 127.0.0.1:{filter_postfix.proxy_filter_port}")
    after_params = postconf(filter_postfix, "-P")
    assert f"{after}/smtpd_authorized_xforward_hosts = 127.0.0.0/8" in after_params
    assert f"{after}/smtpd_proxy_filter =" in after_params
    assert [s.split()[0] for s in inet_services(filter_postfix)] == [
        f"127.0.0.1:{filter_postfix.listen_port}",
        f"127.0.0.1:{filter_postfix.after_filter_port}",
    ]


def test_filter_mode_delivers_with_the_deploy_files(
    tmp_path: Path, filter_postfix: PostfixInstance, dns_server: ZoneDNSServer
) -> None:
    filter_postfix.clear_mail()
    assert filter_postfix.proxy_filter_port and filter_postfix.after_filter_port
    dropin = substituted(
        DEPLOY / "mailgate/10-filter.toml",
        [
            (r"127\.0\.0\.1:10024\b", f"127.0.0.1:{filter_postfix.proxy_filter_port}"),
            (r"127\.0\.0\.1:10025\b", f"127.0.0.1:{filter_postfix.after_filter_port}"),
        ],
    )
    mg = _mailgate(tmp_path, dropin, filter_postfix.proxy_filter_port, dns_server).start()
    try:
        with smtp_client("127.0.0.1", filter_postfix.listen_port, source_ip="127.0.0.8") as c:
            c.ehlo("mail.sender.example")
            c.mail("alice@example.org")
            c.rcpt("bob@example.test")
            code, text = c.data(message("deploy filter"))
        assert code == 250 and re.search(rb"queued as [A-Z0-9]+", text), text
        [msg] = filter_postfix.wait_for_messages("bob", 1)
        assert b"Subject: deploy filter" in msg and b"X-Spam-Status: No" in msg
        # XFORWARD from the before-filter smtpd reached mailgate (xforward_hosts in
        # 10-filter.toml): it judged the real client, not Postfix on loopback.
        logs = mg.logs()
        assert "event=message" in logs and "client=127.0.0.8" in logs, logs
        assert "helo=mail.sender.example" in logs
    finally:
        mg.stop()
