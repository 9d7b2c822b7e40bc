"""What a process imports at start: the suite and admins start mailgate hundreds of times.

Run in fresh interpreters (a module once imported stays in this one).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.rig.cli import REPO


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport sys\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def importtime_modules(*args: str) -> set[str]:
    """The modules ``python -X importtime -m filter ARGS`` imported (from its report)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "filter", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }


@pytest.mark.parametrize("module", ["filter.app", "filter.domaincheck", "filter.checks.spf"])
def test_dnspython_loads_no_http_client(module: str) -> None:
    """checkdmarc installs dnspython[doh]; mailgate never speaks DoH, so dns.query must
    not import the HTTP/2 client it would bring (about 70 ms at every start)."""
    mods = imported_after(
        f"import {module}\nimport dns.query, dns._features\nassert not dns._features.have('doh')"
    )
    assert "dns.query" in mods
    assert not {"httpx2", "httpcore2", "h2"} & mods


def test_help_imports_neither_the_policy_nor_the_libraries() -> None:
    """`mailgate --help` and usage errors answer at once: no policy, Redis or DNS code."""
    mods = importtime_modules("--help")
    assert "filter.cli" in mods
    heavy = {"filter.policy", "filter.policy.schema", "redis", "dns", "asyncio", "dkim"}
    assert not heavy & mods
