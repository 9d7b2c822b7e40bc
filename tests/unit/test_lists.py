"""List files: parsing, matching rules and errors with file:line; the [lists] schema table."""

from __future__ import annotations

import os
from pathlib import Path

import idna
import pytest

from filter.lists import (
    MAX_REPORTED,
    AddressList,
    ClientList,
    ListFileError,
    clear_cache,
    load_addresses,
    load_clients,
    load_list,
    parse_address_list,
    parse_client_list,
    recipient_forms,
    sender_forms,
)
from filter.policy.schema import DEFAULT_POLICY, policy_from_dict

REPO = Path(__file__).resolve().parents[2]

CLIENTS = b"""\
# our backup MX
192.0.2.10
2001:db8:1::/48      # partner relay
198.51.100.0/24#no space before the comment
  203.0.113.7\t   \t# spaces and tabs around

::ffff:192.0.2.128/121
partner.example
.Relay.Example.NET.
xn--bcher-kva.example
d\xc3\xb6rfli.example
"""


@pytest.mark.parametrize(
    ("ip", "hostname", "line"),
    [
        ("192.0.2.10", None, 2),
        ("::ffff:192.0.2.10", None, 2),  # IPv4-mapped clients match IPv4 entries
        ("192.0.2.11", None, None),
        ("2001:db8:1:ffff::25", None, 3),
        ("2001:DB8:0001::1", None, 3),
        ("2001:db8:2::1", None, None),
        ("198.51.100.255", None, 4),
        ("203.0.113.7", None, 5),
        ("192.0.2.130", None, 7),  # ::ffff:192.0.2.128/121 is 192.0.2.128/25
        ("192.0.2.127", None, None),
        # rDNS suffixes: the name itself and names under it, on label boundaries.
        ("10.0.0.1", "partner.example", 8),
        ("10.0.0.1", "MX1.Partner.Example.", 8),
        ("10.0.0.1", "evil-partner.example", None),
        ("10.0.0.1", "partner.example.evil.test", None),
        ("10.0.0.1", "a.b.relay.example.net", 9),
        ("10.0.0.1", "relay.example.net", 9),
        ("10.0.0.1", "example.net", None),
        # IDN: either spelling in the file matches either spelling of the name.
        ("10.0.0.1", "mx.bücher.example", 10),
        ("10.0.0.1", "mx." + idna.encode("dörfli.example").decode(), 11),
        ("10.0.0.1", None, None),
        ("not an address", None, None),
    ],
)
def test_client_list_matches(ip: str, hostname: str | None, line: int | None) -> None:
    lst = parse_client_list(CLIENTS, "clients.txt", allow=True)
    found = lst.match(ip, hostname)
    assert (found.line if found else None) == line


def test_client_list_counts_entries_and_prefers_the_narrowest_network() -> None:
    lst = parse_client_list(b"192.0.2.0/24\n192.0.2.0/28\n192.0.2.5\n", "c.txt", allow=False)
    assert len(lst) == 3
    assert str(lst.match("192.0.2.5", None)) == "c.txt:3 (192.0.2.5)"
    assert str(lst.match("192.0.2.6", None)) == "c.txt:2 (192.0.2.0/28)"
    assert str(lst.match("192.0.2.200", None)) == "c.txt:1 (192.0.2.0/24)"
    # A duplicate is harmless (concatenated feeds have them) and keeps its first line.
    dup = parse_client_list(b"192.0.2.5\n192.0.2.5\n", "d.txt", allow=False)
    assert (len(dup), dup.match("192.0.2.5", None).line) == (1, 1)  # type: ignore[union-attr]


def test_address_before_name_and_empty_files() -> None:
    lst = parse_client_list(b"example.org\n192.0.2.1\n", "c.txt", allow=False)
    assert lst.match("192.0.2.1", "mx.example.org").line == 2  # type: ignore[union-attr]
    empty = parse_client_list(b"# nothing\n\n   \n", "e.txt", allow=False)
    assert len(empty) == 0 and not empty
    assert parse_client_list(b"", "e.txt", allow=True).match("192.0.2.1", "a.b") is None
    # A byte-order mark from a Windows editor is not part of the first entry.
    assert parse_client_list(b"\xef\xbb\xbf192.0.2.1\r\n", "b.txt", allow=False).match(
        "192.0.2.1", None
    )


@pytest.mark.parametrize(
    ("data", "allow", "problems"),
    [
        (b"192.0.2.1/24\n", False, ["c.txt:1: 192.0.2.1/24 has host bits set; did you mean "]),
        (b"# ok\n\n2001:db8::1/32\n", False, ["c.txt:3: 2001:db8::1/32 has host bits set"]),
        (b"192.0.2.300\n", False, ["c.txt:1: '192.0.2.300' is not an IP address"]),
        (b"1.2.3\n", False, ["c.txt:1: '1.2.3' is not an IP address"]),
        # A Postfix access-table prefix gets the network it means.
        (
            b"192.168\n",
            False,
            ["c.txt:1: '192.168' is not an IP address; for a network write 192.168.0.0/16"],
        ),
        (b"192.0.2.0/33\n", False, ["c.txt:1: '192.0.2.0/33' is not a CIDR network"]),
        (b"192.0.2.0/x\n", False, ["c.txt:1: '192.0.2.0/x': the prefix length"]),
        (b"192.0.2.1 REJECT\n", False, ["c.txt:1: one entry per line, got 2 words"]),
        (b"a.example b.example # two\n", False, ["c.txt:1: one entry per line"]),
        (b"0.0.0.0/0\n", True, ["c.txt:1: 0.0.0.0/0 is wider than /8"]),
        (b"2000::/15\n", True, ["c.txt:1: 2000::/15 is wider than /16"]),
        (b"com\n", True, ["c.txt:1: 'com' is a whole top-level domain"]),
        (b"*.example.com\n", False, ["c.txt:1: write example.com (it matches example.com"]),
        (b"exa mple\n", False, ["c.txt:1: one entry per line"]),
        (b"bad_char!.example\n", False, ["c.txt:1: 'bad_char!.example' is not a domain name"]),
        (b"..example.com\n", False, ["c.txt:1: '..example.com' is not a domain name"]),
        (b"ok.example\n\xff\xfe\n", False, ["c.txt:2: not UTF-8 text"]),
        (
            b"192.0.2.1/24\nfine.example\n198.51.100.1/24\n",
            False,
            ["c.txt:1: 192.0.2.1/24 has", "c.txt:3: 198.51.100.1/24 has"],
        ),
    ],
)
def test_client_list_errors_name_file_and_line(
    data: bytes, allow: bool, problems: list[str]
) -> None:
    with pytest.raises(ListFileError) as info:
        parse_client_list(data, "c.txt", allow=allow)
    messages = info.value.messages()
    assert len(messages) == len(problems)
    for message, start in zip(messages, problems, strict=True):
        assert message.startswith(start), message
    assert str(info.value) == "\n".join(messages)


def test_wide_entries_are_fine_in_block_lists() -> None:
    lst = parse_client_list(b"10.0.0.0/7\ntop\n", "b.txt", allow=False)
    assert lst.match("11.1.1.1", None) is not None
    assert lst.match("192.0.2.1", "host.example.top") is not None


def test_many_bad_lines_are_capped() -> None:
    data = b"".join(b"192.0.2.%d/24\n" % i for i in range(1, MAX_REPORTED + 6))
    with pytest.raises(ListFileError) as info:
        parse_client_list(data, "c.txt", allow=False)
    assert len(info.value.problems) == MAX_REPORTED + 5
    messages = info.value.messages()
    assert len(messages) == MAX_REPORTED + 1
    assert messages[-1] == "c.txt: 5 more bad lines not shown"


ADDRESSES = b"""\
Alice@Example.COM          # an address
billing@                   # a local part in every domain
@exact.example             # that domain only
tree.example               # that domain and below
.dotted.example
<bob@example.com>
carol+news@example.com
dave@b\xc3\xbccher.example
"""


@pytest.mark.parametrize(
    ("sender", "line"),
    [
        ("alice@example.com", 1),
        ("<ALICE@EXAMPLE.COM>", 1),
        ("alice+tag@example.com", 1),  # +extension dropped
        ("prvs=1234abcdef=alice@example.com", 1),  # BATV undone
        ("SRS0=HHH=TT=example.com=alice@forwarder.test", 1),  # SRS undone
        ("alice@sub.example.com", None),
        ("alicex@example.com", None),
        ("billing@anything.test", 2),
        ("BILLING@other.test", 2),
        ("x@exact.example", 3),
        ("x@sub.exact.example", None),
        ("x@tree.example", 4),
        ("x@deep.sub.tree.example", 4),
        ("x@subtree.example", None),  # label boundaries
        ("x@evil-tree.example", None),
        ("x@dotted.example", 5),
        ("x@a.dotted.example", 5),
        ("bob@example.com", 6),
        ("carol+news@example.com", 7),  # the form as written is compared too
        ("carol@example.com", None),
        ("dave@xn--bcher-kva.example", 8),
        ("", None),  # the null sender is on no list
        ("<>", None),
        ("postmaster", None),
    ],
)
def test_address_list_matches_senders(sender: str, line: int | None) -> None:
    lst = parse_address_list(ADDRESSES, "s.txt", allow=False)
    assert len(lst) == 8
    found = lst.match(sender_forms(sender))
    assert (found.line if found else None) == line


@pytest.mark.parametrize(
    ("rcpt", "line"),
    [
        ("alice@example.com", 1),
        ("Alice+Folder@Example.com", 1),
        ("billing+x@z.test", 2),
        ("y@exact.example", 3),
        ("carol+news@example.com", 7),
        ("carol+other@example.com", None),
    ],
)
def test_address_list_matches_recipients(rcpt: str, line: int | None) -> None:
    lst = parse_address_list(ADDRESSES, "r.txt", allow=False)
    found = lst.match(recipient_forms(rcpt))
    assert (found.line if found else None) == line


def test_sender_and_recipient_forms() -> None:
    assert sender_forms("<Alice+x@Example.ORG.>") == ["alice+x@example.org", "alice@example.org"]
    assert sender_forms("a@bücher.example") == ["a@xn--bcher-kva.example"]
    assert sender_forms("") == sender_forms("<>") == sender_forms("user") == []
    assert recipient_forms("Info+Sales@Example.org") == [
        "info+sales@example.org",
        "info@example.org",
    ]
    assert recipient_forms("<postmaster@example.org>") == ["postmaster@example.org"]


@pytest.mark.parametrize(
    ("data", "allow", "start"),
    [
        (b"<>\n", False, "a.txt:1: the null sender <> cannot be listed"),
        (b"@\n", False, "a.txt:1: a lone @ matches nothing"),
        (b"a@b@example.com\n", False, "a.txt:1: 'a@b@example.com' is not an address"),
        (b"<a@example.com\n", False, "a.txt:1: '<a@example.com' is not an address"),
        (b"user@.example.com\n", False, "a.txt:1: 'user@.example.com': write example.com"),
        (b"user@[192.0.2.1]\n", False, "a.txt:1: '[192.0.2.1]' is not a domain name"),
        (b"user@bad_dom!ain\n", False, "a.txt:1: 'bad_dom!ain' is not a domain name"),
        (b"org\n", True, "a.txt:1: 'org' is a whole top-level domain"),
        (b"@org\n", True, "a.txt:1: 'org' is a whole top-level domain"),
        (b"alice@example.com OK\n", False, "a.txt:1: one entry per line"),
        # Globs from other systems (SpamAssassin's whitelist_from) would never match.
        (
            b"*@example.com\n",
            True,
            "a.txt:1: '*@example.com': no wildcards in a local part; write @example.com",
        ),
        (b"news*@example.com\n", False, "a.txt:1: 'news*@example.com': no wildcards"),
        (b"*@\n", False, "a.txt:1: '*@': no wildcards"),
    ],
)
def test_address_list_errors(data: bytes, allow: bool, start: str) -> None:
    with pytest.raises(ListFileError) as info:
        parse_address_list(data, "a.txt", allow=allow)
    assert str(info.value).startswith(start), str(info.value)


def test_a_top_level_domain_may_be_blocked() -> None:
    lst = parse_address_list(b"xyz\n", "b.txt", allow=False)
    assert lst.match(sender_forms("a@spam.xyz")) is not None


# --- files and the cache ----------------------------------------------------------------


def test_files_are_parsed_once_until_they_change(tmp_path: Path) -> None:
    clear_cache()
    path = tmp_path / "block.txt"
    path.write_text("example.org\n")
    first = load_clients(str(path), allow=False)
    assert load_clients(str(path), allow=False) is first
    mtime = path.stat().st_mtime_ns
    # Same size and, forced, the same mtime (a coarse file system): ctime still differs.
    path.write_text("example.net\n")
    os.utime(path, ns=(mtime, mtime))
    second = load_clients(str(path), allow=False)
    assert second is not first
    assert second.match("192.0.2.1", "mx.example.net") is not None
    assert second.match("192.0.2.1", "mx.example.org") is None
    # The same file read as another kind is another cache entry.
    assert load_list("block_senders", str(path)) is not second
    clear_cache()


def test_a_broken_file_is_never_cached(tmp_path: Path) -> None:
    clear_cache()
    path = tmp_path / "allow.txt"
    path.write_text("a@example.org\n")
    assert load_addresses(str(path), allow=True).match(["a@example.org"]) is not None
    path.write_text("a@example.org\n<>\n")
    for _ in range(2):
        with pytest.raises(ListFileError, match=r"allow\.txt:2: the null sender"):
            load_addresses(str(path), allow=True)
    with pytest.raises(FileNotFoundError):
        load_clients(str(tmp_path / "missing.txt"), allow=False)
    clear_cache()


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("allow-clients.txt", "allow_clients"),
        ("block-clients.txt", "block_clients"),
        ("allow-senders.txt", "allow_senders"),
        ("block-senders.txt", "block_senders"),
        ("block-recipients.txt", "block_recipients"),
    ],
)
def test_shipped_examples_parse_and_list_nothing(name: str, key: str) -> None:
    path = REPO / "policies" / "lists" / name
    text = path.read_text()
    assert "#" in text.splitlines()[0]
    assert len(load_list(key, str(path))) == 0
    # The commented-out examples are valid entries once uncommented.
    examples = "\n".join(line.lstrip("# ") for line in text.split("\n\n")[-1].splitlines())
    assert len(_parse(key, examples)) > 0


def _parse(key: str, text: str) -> ClientList | AddressList:
    data = text.encode()
    if key.endswith("clients"):
        return parse_client_list(data, "x", allow=key.startswith("allow"))
    return parse_address_list(data, "x", allow=key.startswith("allow"))


# --- the [lists] table -------------------------------------------------------------------


def test_lists_table_defaults_and_values() -> None:
    lists = DEFAULT_POLICY.lists
    assert (lists.enabled, lists.mode, lists.allow_senders_require_spf) == (True, "enforce", True)
    assert lists.files() == []
    policy, problems = policy_from_dict(
        {"lists": {"block_clients": "lists/b.txt", "allow_senders": "/etc/a.txt"}}
    )
    assert problems == [] and policy is not None
    assert policy.lists.files() == [
        ("block_clients", "lists/b.txt"),
        ("allow_senders", "/etc/a.txt"),
    ]
    for name in ("LIST_ALLOW_CLIENT", "LIST_ALLOW_SENDER"):
        assert DEFAULT_POLICY.score(name) < -5
    for name in ("LIST_BLOCK_CLIENT", "LIST_BLOCK_SENDER", "LIST_BLOCK_RECIPIENT"):
        assert DEFAULT_POLICY.score(name) > 0


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"allow_clients": "a.txt", "block_clients": "a.txt"}, "lists.block_clients", "also set"),
        ({"block_senders": " b.txt"}, "lists.block_senders", "expected a file name"),
        ({"block_recipients": 3}, "lists.block_recipients", "expected a string"),
        ({"allow_senders_require_spf": "yes"}, "lists.allow_senders_require_spf", "true or"),
        ({"mode": "on"}, "lists.mode", "expected one of"),
        ({"block_client": "x"}, "lists.block_client", "did you mean"),
    ],
)
def test_lists_table_problems(table: dict[str, object], key: str, message: str) -> None:
    policy, problems = policy_from_dict({"lists": table})
    assert policy is None
    assert [k for k, _ in problems] == [key]
    assert message in problems[0][1]
