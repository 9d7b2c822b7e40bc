"""Pure parts of the DNS layer: the TTL/LRU cache and name normalisation (no network)."""

from __future__ import annotations

import dns.resolver
import pytest

from filter.resolver import DNSCache, DNSResult, DNSTempError, Resolver, normalise_name


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def result(name: str = "a.test", ttl: int = 10, outcome: str = "ok") -> DNSResult:
    return DNSResult(name, "A", outcome, ("192.0.2.1",) if outcome == "ok" else (), ttl)


# -- DNSCache --------------------------------------------------------------------------------
def test_cache_expires_after_ttl() -> None:
    clock = FakeClock()
    cache = DNSCache(10, clock)
    cache.put(("a.test", "A"), result(ttl=10))
    hit = cache.get(("a.test", "A"))
    assert hit is not None
    assert hit.ttl == 10
    clock.now += 9.5
    hit = cache.get(("a.test", "A"))
    assert hit is not None
    assert hit.ttl == 0  # floor of the half second left
    assert hit.data == ("192.0.2.1",)
    clock.now += 0.5
    assert cache.get(("a.test", "A")) is None
    assert len(cache) == 0  # expired entries go on read


def test_cache_remaining_ttl_counts_down() -> None:
    clock = FakeClock()
    cache = DNSCache(10, clock)
    cache.put(("n.test", "TXT"), result("n.test", ttl=300, outcome="nxdomain"))
    clock.now += 100
    hit = cache.get(("n.test", "TXT"))
    assert hit is not None
    assert (hit.outcome, hit.ttl) == ("nxdomain", 200)


def test_cache_ttl_zero_not_stored_and_replaces_old() -> None:
    cache = DNSCache(10, FakeClock())
    cache.put(("a.test", "A"), result(ttl=10))
    cache.put(("a.test", "A"), result(ttl=0))
    assert cache.get(("a.test", "A")) is None
    assert len(cache) == 0


def test_cache_lru_eviction() -> None:
    cache = DNSCache(2, FakeClock())
    cache.put(("a", "A"), result("a"))
    cache.put(("b", "A"), result("b"))
    assert cache.get(("a", "A")) is not None  # a is now the most recent
    cache.put(("c", "A"), result("c"))
    assert len(cache) == 2
    assert cache.get(("b", "A")) is None
    assert cache.get(("a", "A")) is not None
    assert cache.get(("c", "A")) is not None


def test_cache_put_refreshes_recency() -> None:
    cache = DNSCache(2, FakeClock())
    cache.put(("a", "A"), result("a"))
    cache.put(("b", "A"), result("b"))
    cache.put(("a", "A"), result("a", ttl=20))
    cache.put(("c", "A"), result("c"))
    assert cache.get(("b", "A")) is None
    assert cache.get(("a", "A")) is not None


def test_cache_size_zero_disables() -> None:
    cache = DNSCache(0, FakeClock())
    cache.put(("a", "A"), result())
    assert len(cache) == 0


def test_cache_keys_include_rtype_and_clear() -> None:
    cache = DNSCache(10, FakeClock())
    cache.put(("a", "A"), result("a"))
    assert cache.get(("a", "AAAA")) is None
    cache.clear()
    assert cache.get(("a", "A")) is None


# -- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.TEST.", "example.test"),
        ("example.test", "example.test"),
        ("_dmarc.example.test", "_dmarc.example.test"),
        ("sel._domainkey.Example.test", "sel._domainkey.example.test"),
        ("2.0.0.127.zen.example", "2.0.0.127.zen.example"),
        ("bücher.example.test", "xn--bcher-kva.example.test"),
        ("BÜCHER.example.test", "xn--bcher-kva.example.test"),
        ("_dmarc.bücher.test", "_dmarc.xn--bcher-kva.test"),
        ("bücher。example．test", "xn--bcher-kva.example.test"),
        ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008, not the transitional "strasse"
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("x" * 63 + ".test", "x" * 63 + ".test"),
    ],
)
def test_normalise_name(raw: str, expected: str) -> None:
    assert normalise_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "a..test",
        ".a.test",
        "x" * 64 + ".test",
        ".".join(["x" * 60] * 5),  # over 255 octets
        "with space.test",
        "tab\t.test",
        "back\\slash.test",
        "☃.test",
        "bad\x00.test",
    ],
)
def test_normalise_name_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        normalise_name(raw)


# -- construction without nameservers --------------------------------------------------------
async def test_no_resolv_conf_gives_temp_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: object, f: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")  # type: ignore[no-untyped-call]

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", fail)
    r = Resolver()
    assert r.nameservers == []
    with pytest.raises(DNSTempError) as ei:
        await r.resolve("example.test", "A")
    assert ei.value.reason == "no nameservers"
    with pytest.raises(ValueError):
        await r.resolve("bad..name", "A")


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Resolver(timeout=0)
