"""Table tests for the strict MAIL/RCPT path parser (relay/address.py)."""

from __future__ import annotations

import pytest

from relay.address import AddressError, check_mailbox, parse_path

ACCEPTED = [
    ("<a@example.com>", "a@example.com", ""),
    ("<a@example.com> SIZE=10 BODY=8BITMIME", "a@example.com", "SIZE=10 BODY=8BITMIME"),
    (" <a@example.com>", "a@example.com", ""),
    ("<>", "", ""),
    ('<"john smith"@example.com>', '"john smith"@example.com', ""),
    ('<"a>b"@example.com>', '"a>b"@example.com', ""),
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com', ""),
    ("<a.b+tag@sub-1.example.com>", "a.b+tag@sub-1.example.com", ""),
    ("<@relay1.example,@relay2.example:a@example.com>", "a@example.com", ""),
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]", ""),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", ""),
    ("<jörg@bücher.example>", "jörg@bücher.example", ""),
]


@pytest.mark.parametrize(("argument", "address", "rest"), ACCEPTED)
def test_valid_paths_are_kept_exactly(argument: str, address: str, rest: str) -> None:
    assert parse_path(argument) == (address, rest)


REFUSED = [
    # The forged-sender trick: a CR inside a quoted local part (issue 8, item 1).
    ('<"a\r<ceo@bank.test>"@x.test>', 501, "5.5.2"),
    ('<"a\n<ceo@bank.test>"@x.test>', 501, "5.5.2"),
    ("<a\x00b@example.com>", 501, "5.5.2"),
    ("<a\x0bb@example.com>", 501, "5.5.2"),
    ("<a\x7fb@example.com>", 501, "5.5.2"),
    ("<bad address@example.com>", 553, "5.1.3"),
    ("<a..b@example.com>", 553, "5.1.3"),
    (".a@example.com", 501, "5.5.4"),
    ("a@example.com", 501, "5.5.4"),
    ("<a@example.com", 501, "5.5.4"),
    ("<a@example.com>SIZE=1", 501, "5.5.4"),
    ("<example.com>", 553, "5.1.3"),
    ("<a@>", 553, "5.1.2"),
    ("<a@-example.com>", 553, "5.1.2"),
    ("<a@exa_mple.com>", 553, "5.1.2"),
    ("<a@[300.1.1.1]>", 553, "5.1.2"),
    ("<a@[IPv6:zz::1]>", 553, "5.1.2"),
    ("<" + "a" * 65 + "@example.com>", 553, "5.1.3"),
    ("<a@" + "b" * 64 + ".example>", 553, "5.1.2"),
    ("<a@" + ".".join(["b" * 60] * 5) + ">", 553, "5.1.3"),  # path over 256 octets
    ("<a\u0085b@example.com>", 553, "5.6.7"),  # NEL: a line break to some parsers
    ("<a\u2028b@example.com>", 553, "5.6.7"),
    ("<a\u200bb@example.com>", 553, "5.6.7"),  # zero-width space: invisible
    ("<a\udcffb@example.com>", 553, "5.6.7"),  # undecodable byte kept by surrogateescape
]


@pytest.mark.parametrize(("argument", "code", "enhanced"), REFUSED)
def test_invalid_paths_are_refused_with_a_precise_reply(argument: str, code: int,
                                                        enhanced: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_path(argument)
    assert (caught.value.code, caught.value.enhanced) == (code, enhanced)
    reply = caught.value.reply("Sender")
    assert reply.startswith(f"{code} {enhanced} Sender address rejected: ")
    assert "\r" not in reply and "\n" not in reply


def test_check_mailbox_is_the_same_rule_without_brackets() -> None:
    check_mailbox("postmaster@example.com")
    with pytest.raises(AddressError):
        check_mailbox('"a\r<x@y.z>"@example.com')
