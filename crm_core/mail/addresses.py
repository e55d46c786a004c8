"""Address validation shared by every transport.

Why here and not in each transport: the guide's "Error validating e-mail" must be the
same whichever way the mail leaves, and it must say *which* address is wrong and *why*
(an extra space, an invalid character, a missing domain), before anything is queued.

Addresses are normalised: surrounding whitespace trimmed, Unicode normalised (NFC),
the domain converted to its IDNA form for transports that need ASCII.

An address may be typed with a display name, as a mail program shows it:
``Per Persson <per@example.se>`` or ``"Persson, Per" <per@example.se>``; the name is
kept. One value holds one address: ``a@b.se, c@d.se`` is refused with a hint to give
each its own ``--to``, rather than guessed at.

Private and special-use domains (:data:`SPECIAL_DOMAINS`, and names without a dot)
cannot be reached from the internet, so an address there is almost always a mistake
or an internal address copied by accident: they are refused unless the installation
sets ``mail.allow_private_domains`` (an on-premises network whose mail server
delivers ``corp.local``). ``.invalid``, ``.onion`` and ``.arpa`` are refused even
then: no mail server delivers to them on any network. email-validator's own
special-use list is a subset of these (a test keeps it so).
"""

from __future__ import annotations

import functools
import re
import shlex
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import idna

from crm_core.errors import MailValidationError, Problem

_LINE_BREAKS = ("\r", "\n")
_C0_NAMES = (
    "null", "start of heading", "start of text", "end of text", "end of transmission",
    "enquiry", "acknowledge", "bell", "backspace", "tab", "line feed", "vertical tab",
    "form feed", "carriage return", "shift out", "shift in", "data link escape",
    "device control one", "device control two", "device control three",
    "device control four", "negative acknowledge", "synchronous idle",
    "end of transmission block", "cancel", "end of medium", "substitute", "escape",
    "file separator", "group separator", "record separator", "unit separator",
)  # fmt: skip
"""The C0 control characters' names, by code point (Unicode's aliases, in lower case;
:mod:`unicodedata` has no names for control characters)."""
_NAME_SPECIALS = frozenset('()<>[]:;@\\,"')
"""Characters that a display name may hold only inside double quotes (RFC 5322)."""
_EXAMPLE = '"Persson, Per" <per@example.se>'
_STAND_IN = ".com"
"""A public label appended while email-validator checks a special-use domain."""

ALLOW_PRIVATE_DOMAINS = "mail.allow_private_domains"
"""The system setting that accepts addresses on private and special-use domains."""
ALLOW_PRIVATE_FIX = f"crm settings set {ALLOW_PRIVATE_DOMAINS} true"

_PRIVATE_USE = "not a public top-level domain, only a name used inside private networks"


@dataclass(frozen=True)
class SpecialDomain:
    """A domain that is not on the public internet (it and every name under it).

    ``private`` ones are accepted when ``mail.allow_private_domains`` is set; the
    others cannot receive mail on any network and are always refused.
    """

    name: str
    why: str
    private: bool = True


SPECIAL_DOMAINS: tuple[SpecialDomain, ...] = (
    SpecialDomain("local", "reserved for a local network (multicast DNS, RFC 6762)"),
    SpecialDomain("localhost", "reserved for this computer itself (RFC 6761)"),
    SpecialDomain("test", "reserved for testing (RFC 6761)"),
    SpecialDomain("internal", "reserved for private networks (ICANN, 2024)"),
    SpecialDomain("home.arpa", "reserved for home networks (RFC 8375)"),
    SpecialDomain("lan", _PRIVATE_USE),
    SpecialDomain("corp", _PRIVATE_USE),
    SpecialDomain("home", _PRIVATE_USE),
    SpecialDomain("intranet", _PRIVATE_USE),
    SpecialDomain("private", _PRIVATE_USE),
    SpecialDomain("invalid", "reserved never to exist (RFC 6761)", private=False),
    SpecialDomain("onion", "a Tor onion-service name (RFC 7686)", private=False),
    SpecialDomain(
        "arpa", "reserved for internet infrastructure such as reverse DNS", private=False
    ),
)
"""Private and special-use domains, first match wins (home.arpa before arpa).

Not here: example.com, example.se, example.org. RFC 6761 says applications should
treat the example domains as ordinary ones, and they are the documentation's and
the tests' sample domains.
"""


@dataclass(frozen=True)
class Address:
    """A validated mailbox: display name plus normalised address."""

    email: str
    name: str = ""

    @property
    def domain(self) -> str:
        """The domain part, as written (Unicode)."""
        return self.email.rpartition("@")[2]

    @property
    def ascii_email(self) -> str | None:
        """The address with an IDNA domain, or None if the local part is not ASCII."""
        local, _, domain = self.email.rpartition("@")
        if not local.isascii():
            return None
        return f"{local}@{ascii_domain(domain)}"

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII (the server must offer SMTPUTF8)."""
        return self.ascii_email is None

    def __str__(self) -> str:
        """As a person would type it; :func:`read_address` reads it back unchanged."""
        if not self.name:
            return self.email
        name = self.name
        if any(ch in _NAME_SPECIALS for ch in name):
            escaped = name.replace("\\", "\\\\").replace('"', '\\"')
            name = f'"{escaped}"'
        return f"{name} <{self.email}>"


@functools.lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The IDNA 2008 (UTS #46) ASCII form of ``domain``, as mail servers expect.

    Cached: a pure function of the text, asked several times for every message sent
    (envelope, headers, Message-ID), and idna's encoder showed in the profile.
    Errors are not cached, so a bad domain raises every time.
    """
    return idna.encode(domain, uts46=True).decode("ascii")


def explain_address(raw: str, allow_private: bool = False) -> str | None:
    """Why ``raw`` is not a usable bare address, in plain words, or None if it is fine.

    A bare address only (``name@example.com``): plugins use this for settings such as
    a username, where a display name would be wrong. Private and special-use domains
    are refused unless ``allow_private`` (see :func:`special_domain`).
    """
    problem = address_problem(raw, allow_private=allow_private)
    return problem.message if problem else None


def address_problem(raw: str, allow_private: bool = False) -> Problem | None:
    """Like :func:`explain_address`, as a Problem (no key) with a fix where one exists."""
    checked = _checked(raw, allow_private)
    return checked if isinstance(checked, Problem) else None


def _checked(raw: str, allow_private: bool) -> str | Problem:
    """The normalised form of a bare address, or why it is refused."""
    text = raw.strip()
    if not text:
        return Problem("", "the address is empty")
    if any(ch.isspace() for ch in text):
        return Problem("", "it contains a space or other blank inside the address; remove it")
    if "@" not in text:
        return Problem("", "it has no @ and domain (write it as name@example.com)")
    local, _, domain = text.rpartition("@")
    if not local:
        return Problem("", "the part before the @ is missing")
    if not domain:
        return Problem("", "the domain after the @ is missing")
    normalized = _validated(text)
    if isinstance(normalized, Problem):
        return normalized
    return _domain_problem(domain, allow_private) or unicodedata.normalize("NFC", normalized)


def _plain_reason(library_message: str) -> str:
    """Keep email-validator's precise message but make it read as advice."""
    message = library_message.rstrip(".")
    if "invalid character" in message.lower() or "not allowed" in message.lower():
        return f"{message}; remove or replace the character"
    return message


def special_domain(domain: str) -> SpecialDomain | None:
    """The rule for ``domain`` if it is private or special-use, else None.

    A name without a dot (``mailhost``) is private: only a local resolver knows it.
    """
    name = domain.lower()
    if "." not in name:
        return SpecialDomain(name, "has no dot (e.g. example.com)")
    return next((d for d in SPECIAL_DOMAINS if name == d.name or name.endswith(f".{d.name}")), None)


def _domain_problem(domain: str, allow_private: bool) -> Problem | None:
    rule = special_domain(domain)
    if rule is None or (rule.private and allow_private):
        return None
    if not rule.private:
        return Problem("", f"the domain {domain!r} is {rule.why}; no mail server delivers to it")
    if "." not in domain:
        return Problem(
            "",
            f"the domain {domain!r} has no dot (e.g. example.com); a name without a dot "
            "is only known inside a private network",
            f"write the whole domain, e.g. name@example.com; on a private network: "
            f"{ALLOW_PRIVATE_FIX}",
        )
    return Problem(
        "",
        f"the domain {domain!r} is {rule.why}; it is only reachable inside a private "
        "network, so it is refused unless private domains are allowed",
        ALLOW_PRIVATE_FIX,
    )


def _validated(text: str) -> str | Problem:
    """email-validator's normalised form of a bare address, or why it is refused.

    email-validator refuses special-use names (.local, .test, ...) whatever its
    options, and its list is module state that must not be changed at run time. So a
    private or special-use domain is checked with a public stand-in label appended,
    removed again afterwards: every other rule (characters, label lengths, IDNA) still
    applies, and :func:`_domain_problem` decides about the name itself. (The label's
    four characters count towards the 254-character limit; no real address is near.)
    Imported here: the library compiles its grammar on import, and commands that only
    list or show need no address checked.
    """
    import email_validator

    suffix = _STAND_IN if special_domain(text.rpartition("@")[2]) else ""
    try:
        normalized = email_validator.validate_email(
            text + suffix, check_deliverability=False, allow_smtputf8=True
        ).normalized
    except email_validator.EmailNotValidError as exc:
        return Problem("", _plain_reason(str(exc)))
    return str(normalized).removesuffix(suffix)


def read_address(raw: str, allow_private: bool = False, option: str = "") -> Address | Problem:
    """One address as a person types it, or why not (a Problem without a key).

    Accepts ``per@example.se``, ``Per Persson <per@example.se>`` and
    ``"Persson, Per" <per@example.se>``, keeping the display name (NFC). Strict: a
    value holding several addresses, or anything left over, is refused; ``option``
    (e.g. ``--to``) makes the hint say how to give several.
    """
    text = raw.strip()
    if _PLAIN.fullmatch(text) and text.isascii() and text.isprintable():
        return _bare(text, allow_private)  # the common case: nothing to split or unquote
    unsafe = header_problem(text, "")
    if unsafe is not None:
        return unsafe
    several = _several_addresses(text)
    if several:
        return _several_problem(several, option)
    name = ""
    if "<" in text or ">" in text or text.startswith('"'):
        parsed = _split_name_addr(text)
        if isinstance(parsed, Problem):
            return parsed
        name, text = parsed
    checked = _checked(text, allow_private)
    if isinstance(checked, Problem):
        return replace(checked, fix=checked.fix or _name_hint(text))
    return Address(checked, unicodedata.normalize("NFC", name))


_PLAIN = re.compile(r"[^\s\"<>,;@]+@[^\s\"<>,;@]+")
"""One bare address: no blank, quote, bracket, list separator or second @."""


def _bare(text: str, allow_private: bool) -> Address | Problem:
    """A bare printable ASCII address (what most values are): only the address rules
    apply; it cannot hold a name, several addresses or a control character."""
    checked = _checked(text, allow_private)
    return Address(checked) if isinstance(checked, str) else checked


def _name_hint(text: str) -> str:
    """For ``Per Persson per@example.se``: how to write a name with the address."""
    *words, last = text.split() or [""]
    if not words or "@" not in last or last.startswith("@") or any("@" in w for w in words):
        return ""
    named = Address(last, " ".join(words))
    return f"write the name before the address in angle brackets: {named}"


def _several_addresses(text: str) -> list[str]:
    """The addresses in ``text`` when it holds more than one (split at , ; or blanks)."""
    for separates in (_is_list_separator, str.isspace):
        found = [piece for piece in _split_outside(text, separates) if _has_at(piece)]
        if len(found) > 1:
            return found
    return []


def split_list(text: str) -> list[str]:
    """The values in one box where a person typed several addresses, one per line or
    separated by commas or semicolons (not inside "quotes" or <angle brackets>).

    Why: a form has one To box, while :func:`read_address` takes one address per
    value; ``"Persson, Per" <per@example.se>`` stays one value. Each value is then
    validated alone, so every bad one is named.
    """
    return _split_outside(text, lambda ch: ch in ",;\r\n")


def _is_list_separator(ch: str) -> bool:
    return ch in ",;"


def _has_at(text: str) -> bool:
    """An @ outside quotes: ``"per@example.se" <per@example.se>`` is one address."""
    inside, _ = _quoted(text)
    return any(ch == "@" and not quoted for ch, quoted in zip(text, inside, strict=True))


def _several_problem(found: list[str], option: str) -> Problem:
    fix = ""
    if option:
        each = " ".join(f"{option} {shlex.quote(a)}" for a in found)
        fix = f"give each address its own {option}: {each}"
    return Problem("", f"it holds {len(found)} addresses; one value takes one address", fix)


def _split_outside(text: str, separates: Callable[[str], bool]) -> list[str]:
    """Split at separators that are outside "quotes" and <angle brackets>."""
    inside, _ = _quoted(text)
    pieces: list[str] = []
    start = depth = 0
    for i, ch in enumerate(text):
        if inside[i]:
            continue
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif depth == 0 and separates(ch):
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def _quoted(text: str) -> tuple[list[bool], bool]:
    """For each character, whether it belongs to a "quoted string" (quotes included);
    and whether a quoted string is left open at the end."""
    inside: list[bool] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
            inside.append(True)
            continue
        inside.append(quoted)
    return inside, quoted


def _split_name_addr(text: str) -> tuple[str, str] | Problem:
    """``Name <address>`` as (name, address), or why it is not that form."""
    inside, left_open = _quoted(text)
    if left_open:
        return Problem("", 'a double quote (") is not closed')
    opening = next((i for i, ch in enumerate(text) if ch == "<" and not inside[i]), -1)
    closing = text.find(">", opening + 1) if opening >= 0 else -1
    if opening < 0 and text.startswith('"') and ">" not in text:
        return Problem("", f"write the address in <angle brackets> after the name, e.g. {_EXAMPLE}")
    if opening < 0:
        return Problem("", "it has a > without a < before it")
    if closing < 0:
        return Problem("", "the < has no closing >")
    rest = text[closing + 1 :].strip()
    if rest:
        return Problem("", f"there is text after the >: {rest!r}; remove it")
    address = text[opening + 1 : closing].strip()
    if "<" in address:
        return Problem("", "it has more than one <")
    name = _display_name(text[:opening].strip())
    return name if isinstance(name, Problem) else (name, address)


def _display_name(text: str) -> str | Problem:
    """The display name as meant: a "quoted string" unescaped, or plain words."""
    if not text.startswith('"'):
        specials = sorted({ch for ch in text if ch in _NAME_SPECIALS})
        if specials:
            found = " ".join(repr(ch) for ch in specials)
            return Problem(
                "", f"the name contains {found}; put the name in double quotes: {_EXAMPLE}"
            )
        return text
    end = _closing_quote(text)
    if end != len(text) - 1:
        return Problem("", f"write the whole name inside the double quotes: {_EXAMPLE}")
    return re.sub(r"\\(.)", r"\1", text[1:end])


def _closing_quote(text: str) -> int:
    """Where the quoted string that opens ``text`` ends, or -1 if it is not closed."""
    escaped = False
    for i, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return i
    return -1


def parse_address(raw: str, name: str = "", allow_private: bool = False) -> Address:
    """Validate and normalise one address, or raise MailValidationError for it.

    ``raw`` may carry a display name (``Per Persson <per@example.se>``); a ``name``
    given here (e.g. from the register) wins over it.
    """
    check_header_text(name, "display name")
    found = read_address(raw, allow_private=allow_private)
    if isinstance(found, Problem):
        raise MailValidationError([replace(found, key=repr(raw))])
    return replace(found, name=unicodedata.normalize("NFC", name)) if name else found


def validate_addresses(
    raws: Iterable[str], field: str, allow_private: bool = False
) -> tuple[list[Address], list[Problem]]:
    """Validate many addresses; return the good ones and one Problem per bad one.

    ``field`` (to, cc, bcc, reply-to) names the value in each Problem, and the
    option (``--to``) that the hint for a value holding several addresses suggests.
    """
    good: list[Address] = []
    problems: list[Problem] = []
    for raw in raws:
        found = read_address(raw, allow_private=allow_private, option=f"--{field}")
        if isinstance(found, Problem):
            problems.append(replace(found, key=f"{field} {raw!r}"))
        else:
            good.append(found)
    return good, problems


def header_problem(text: str, what: str) -> Problem | None:
    """A Problem naming ``what`` if ``text`` cannot be a header's text, else None.

    CR and LF could inject a header. Every other control character (a tab aside) is
    refused too, by name: Python's email package reads VT, FF, \\x1c-\\x1e, NEL and
    U+2028/U+2029 as line breaks and refuses the header when the worker renders the
    mail, and the rest would reach the recipient's screen. Refused at enqueue, no
    such message ever reaches a batch.
    """
    if any(ch in text for ch in _LINE_BREAKS):
        return Problem(what, "contains a line break; it must be on one line")
    found = next((ch for ch in text if _is_control(ch)), None)
    if found is not None:
        return Problem(what, f"contains a control character ({character_name(found)}); remove it")
    return None


def _is_control(ch: str) -> bool:
    """A control character (C0, DEL, C1) or a line or paragraph separator; not a tab."""
    return ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def character_name(ch: str) -> str:
    """``U+000B vertical tab``: the code point and a name a person can look up."""
    code = ord(ch)
    if code < len(_C0_NAMES):
        name = _C0_NAMES[code]
    elif code == 0x7F:
        name = "delete"
    elif code == 0x85:
        name = "next line"
    elif 0x80 <= code < 0xA0:
        name = "C1 control"
    else:
        name = unicodedata.name(ch, "").lower()
    return f"U+{code:04X} {name}".rstrip()


def check_header_text(text: str, what: str) -> None:
    """Raise MailValidationError if ``text`` could inject a header."""
    problem = header_problem(text, what)
    if problem is not None:
        raise MailValidationError([problem])
