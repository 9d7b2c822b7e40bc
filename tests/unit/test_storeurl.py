"""``url_problem``: a redis.url is judged by what redis-py would make of it, before
anything connects (``policy check`` and reloads refuse it with a reason)."""

from __future__ import annotations

import pytest

from filter.storeurl import url_problem


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@r.example:6380",
        "rediss://r.example:6380/2?ssl_cert_reqs=none",
        "redis://r/0?socket_timeout=2&client_name=mailgate",
        "unix:///run/redis.sock?db=3",
        "redis+sentinel://s1:26379,s2/mymaster/1?sentinel_password=x",
        "redis+cluster://n1:7000,[::1]:7001",
    ],
)
def test_usable_urls(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://127.0.0.1:99999/0", "port out of range 1-65535"),
        ("redis://127.0.0.1:0/0", "port out of range 1-65535"),
        ("redis://r/13?sockettimeout=5", "unknown option 'sockettimeout'"),
        ("redis://r/xx", "database 'xx' is not a number"),
        ("redis://r/0?db=q", "Invalid value for 'db'"),
        ("redis:///0", "no host"),
        ("redis+cluster://n1:7000?readonly=1", "unknown option 'readonly'"),
        ("redis+cluster://n1:70000", "out of range 1-65535"),
        ("redis+sentinel://s1/mymaster/one", "database 'one' is not a number"),
        ("redis+sentinel://s1:x/mymaster", "bad port"),
    ],
)
def test_unusable_urls(url: str, words: str) -> None:
    problem = url_problem(url)
    assert problem is not None and words in problem, problem


def test_problem_never_shows_the_password() -> None:
    problem = url_problem("redis://user:s3cret@r:6379/0?sockettimeout=5")
    assert problem is not None and "s3cret" not in problem
