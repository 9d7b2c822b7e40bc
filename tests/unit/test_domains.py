"""The shared A-label form of domain names."""

from __future__ import annotations

import pytest

from filter.domains import is_multi_label_host, to_a_label


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("  example.org ", "example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),  # UTS 46 maps case first
        ("_dmarc.example.org", "_dmarc.example.org"),  # ASCII passes as DNS holds it
        ("[192.0.2.1]", None),
        ("", None),
        (".", None),
        ("a\u200db.example", None),  # a joiner IDNA 2008 refuses here
    ],
)
def test_to_a_label(given: str, expected: str | None) -> None:
    assert to_a_label(given) == expected


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("example.org", True),
        ("localhost", False),
        ("192.0.2.1", False),
        ("a..b", False),
        ("x" * 64 + ".org", False),
        (".".join(["a" * 60] * 5), False),  # over 253 octets
    ],
)
def test_is_multi_label_host(name: str, ok: bool) -> None:
    assert is_multi_label_host(name) is ok
