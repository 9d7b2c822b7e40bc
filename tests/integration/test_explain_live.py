"""`mailgate explain ID` finds the verdict of a message that went through a live mailgate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from tests.integration.conftest import StartMailgate, message
from tests.rig.client import smtp_client
from tests.rig.upstream import ScriptedUpstream

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _explain(config: str, ident: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filter", "explain", ident, "--config", config, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_explain_a_relayed_message_by_its_log_id(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate({"redis": {"url": redis_url}})
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        c.ehlo("client.example.org")
        c.mail("alice@example.org")
        c.rcpt("bob@example.test")
        assert c.data(message("explain me"))[0] == 250
    time.sleep(0.5)  # the record is written in the background
    ids = re.findall(r"event=message id=(\S+)", mg.logs())
    assert ids, mg.logs()
    out = _explain(str(mg.config_path), ids[-1])
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    [rec] = found["records"]
    assert rec["action"] == "accept" and rec["from"] == "alice@example.org"
    assert rec["rcpts"] == ["bob@example.test"]
    assert any(s["name"].startswith("RDNS") for s in rec["symbols"])
    # By session id too, and a clear "not found" for an unknown id.
    assert _explain(str(mg.config_path), ids[-1].split(".")[0]).returncode == 0
    assert _explain(str(mg.config_path), "DEADBEEF0000.1").returncode == 1


def test_explain_a_refusal_at_rcpt(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str
) -> None:
    mg = mailgate({"redis": {"url": redis_url}, "server": {"max_recipients": 5}})
    # A greylisting refusal at RCPT is explained with its envelope.
    mg.reload({"greylist": {"enabled": True}})
    time.sleep(0.5)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.44") as c:
        c.ehlo("client.example.org")
        c.mail("carol@example.org")
        assert c.rcpt("bob@example.test")[0] == 451
    time.sleep(0.5)
    ids = re.findall(r"event=rcpt_refused id=(\S+)", mg.logs())
    assert ids, mg.logs()
    out = _explain(str(mg.config_path), ids[-1])
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)["records"][0]
    assert rec["action"] == "greylist" and rec["rcpt"] == "bob@example.test"
