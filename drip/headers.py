"""Header fields: what text may go into one, and how drip writes the ones that hold free text.

A header field is one line (RFC 5322 §2.2; a folded line goes on with a space), and nothing a
value holds may start another. Two kinds of text could:

- a line break or another control character: CR, LF, NUL, every C0 and C1 control (NEL, U+0085,
  among them) and the Unicode line and paragraph separators U+2028 and U+2029, which some
  programs along a message's way take for line ends;
- an RFC 2047 encoded word: `=?utf-8?b?eA0KQmNjOiBhQGV2aWw=?=` is harmless ASCII to every check
  of the raw text, yet mail programs decode it, CR LF and all, and Python's email package, given
  it as a header's text, decodes it and writes the line break out as a header of its own.

`problem(text)` says which, naming the character by its code point and never echoing the value.
It is the one test every way in applies: patients' names and addresses (drip.patients),
DRIP_FROM (drip.addresses), campaign subjects (drip.campaigns), and drip.messages again when a
message is built, for a value that reached the database some other way.

`unstructured` (Subject) and `mailbox` (From) write a header themselves, folded per RFC 5322
§2.2.3 into lines of at most 78 characters: printable ASCII as it is (a display name quoted);
anything else, or a word too long for a line, as RFC 2047 encoded words in UTF-8 (Q, or base64
when shorter, as for most non-Latin scripts) of at most 75 characters, each holding whole
characters, folded before a space or between two encoded words, never inside one; in a display
name, the words that are plain atoms stay as they are between them. Not the email package's
folder: in Python 3.11 to 3.13 it drops a display name's quotes once one of its words is longer
than a line, so a comma in the name would start a second address.
"""

from __future__ import annotations

import base64
import re
import unicodedata
from collections.abc import Callable

from drip.errors import MessageError

MAX_LINE = 78  # RFC 5322 §2.1.1: a line SHOULD be at most 78 characters, CRLF excluded
HARD_LIMIT = 998  # ... and MUST be at most 998
MAX_ENCODED_WORD = 75  # RFC 2047 §2
ENCODED_WORD_START = "=?"
_EW_OVERHEAD = len("=?utf-8?q?") + len("?=")  # the same for ?b?
_REFUSED = {
    "Cc": "a control character",
    "Cs": "a surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_CONTROL_NAMES = {  # unicodedata has no names for controls
    0x00: "NUL",
    0x09: "TAB",
    0x0A: "LINE FEED",
    0x0B: "LINE TABULATION",
    0x0C: "FORM FEED",
    0x0D: "CARRIAGE RETURN",
    0x7F: "DELETE",
    0x85: "NEXT LINE",
}
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # ASCII letters, digits, punctuation and space
_ADDR_SPEC = re.compile(r"[\x21-\x7e]+@[\x21-\x7e]+")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")  # RFC 5322 §3.2.3 atext
# RFC 2047 §5(3): the characters a Q-encoded word may hold as they are, even in a phrase
_Q_AS_IS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


def code_point(char: str) -> str:
    """U+000A (LINE FEED): ASCII whatever the character, so it is named, never echoed."""
    name = unicodedata.name(char, "") or _CONTROL_NAMES.get(ord(char), "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


def problem(text: str) -> str | None:
    """Why `text` may not go into a header ("contains a control character, U+000A (LINE
    FEED)"), or None when it may."""
    for char in text:
        kind = _REFUSED.get(unicodedata.category(char))
        if kind:
            return f"contains {kind}, {code_point(char)}"
    if ENCODED_WORD_START in text:
        return (
            "contains '=?', which mail programs read as the start of an RFC 2047 encoded word "
            "(a way to hide a line break)"
        )
    return None


def unstructured(name: str, text: str) -> bytes:
    """`Name: text` folded, CRLF-terminated (Subject). Spaces at either end are not kept."""
    _refuse(name, "text", text)
    if not text.strip(" "):
        raise MessageError(f"the {name} header is empty")
    head = f"{name}:"
    lines = _fold(head, _plain_words(text)) if _PRINTABLE.fullmatch(text) else None
    # the email package reads a fold right after the colon as a space of the text
    if lines is None or lines[0] == head or any(len(line) > MAX_LINE for line in lines):
        lines = _fold(head, _encoded_words(text, first=MAX_LINE - len(head) - 1))
    return _written(name, lines)


def mailbox(name: str, display_name: str, addr_spec: str) -> bytes:
    """`Name: "Display Name" <addr@spec>` folded, CRLF-terminated (From). The addr-spec must be
    printable ASCII (an international domain in its xn-- form)."""
    _refuse(name, "display name", display_name)
    if not _ADDR_SPEC.fullmatch(addr_spec) or ENCODED_WORD_START in addr_spec:
        raise MessageError(f"the {name} header's address is not one ASCII addr-spec")
    head = f"{name}:"
    if not display_name.strip(" "):
        return _written(name, [f"{head} {addr_spec}"])
    first = MAX_LINE - len(head) - 1
    lines = None
    if _PRINTABLE.fullmatch(display_name):
        quoted = '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines = _fold(head, [*_plain_words(quoted), f" <{addr_spec}>"])
    if lines is None or any(len(line) > MAX_LINE for line in lines[:-1]):
        lines = _fold(head, [*_phrase(display_name, first=first), f" <{addr_spec}>"])
    return _written(name, lines)


def _refuse(name: str, what: str, text: str) -> None:
    if found := problem(text):
        raise MessageError(f"the {name} header's {what} {found}")


def _plain_words(text: str) -> list[str]:
    """Words split before each run of spaces (where a fold may go), each but the first with the
    spaces before it."""
    return re.findall(r" *[^ ]+", text.strip(" "))


def _phrase(text: str, *, first: int) -> list[str]:
    """A display name that is not printable ASCII, as words to fold: each word that is an
    RFC 5322 atom as it is, each run of the others as encoded words (spaces inside them), so
    the spaces around an atom stay plain spaces, which every decoder keeps."""
    words: list[str] = []
    run, lead = "", ""
    for token in _plain_words(text):
        word = token.lstrip(" ")
        spaces = token[: len(token) - len(word)]
        if _ATOM.fullmatch(word) and len(token) < MAX_ENCODED_WORD:  # longer: encoded, to fold
            if run:
                words += _encoded_run(lead, run, first if not words else MAX_LINE - len(lead))
                run = ""
            words.append(token)
        elif run:
            run += spaces + word
        else:
            run, lead = word, spaces
    if run:
        words += _encoded_run(lead, run, first if not words else MAX_LINE - len(lead))
    return words


def _encoded_run(spaces: str, run: str, first: int) -> list[str]:
    """A run of words as encoded words, the spaces before it kept as they are, plain. A run
    that would fit one encoded word on a line of its own, but not in `first`, goes on the next
    line whole rather than in two words (which the email package reads with a space between)."""
    size = min(_size([_q(char) for char in run]), _b_size(run)) + _EW_OVERHEAD
    if first < size <= min(MAX_ENCODED_WORD, MAX_LINE - max(len(spaces), 1)):
        first = MAX_LINE
    encoded = _encoded_words(run, first=first)
    return [spaces + encoded[0], *encoded[1:]]


def _encoded_words(text: str, *, first: int) -> list[str]:
    """`text` as RFC 2047 encoded words, the first at most `first` characters long, the others
    at most 75 (each goes on a line of its own after a space); every one but the first starts
    with the space a fold replaces, which decoders ignore between encoded words (§6.2). Q
    encoding (readable) unless base64 is shorter, as it is for most non-Latin scripts.

    A word ends after a space of the text where one allows, so a split falls between the
    text's own words. (The email package reads a display name in two encoded words with a
    space between them, against §6.2; every mail client we know reads them right.)"""
    q = [_q(char) for char in text]
    size: Callable[[list[str]], int] = _size
    if _size(q) <= _b_size(text):
        chunks, marker = q, "q"
    else:
        chunks, size, marker = list(text), _b_size, "b"
    words: list[list[str]] = []
    current: list[str] = []
    budget, later = min(first, MAX_ENCODED_WORD) - _EW_OVERHEAD, MAX_ENCODED_WORD - _EW_OVERHEAD
    for chunk in chunks:
        if current and size([*current, chunk]) > budget:
            cut = _after_last_space(current)
            if size([*current[cut:], chunk]) > later:
                cut = len(current)
            words.append(current[:cut])
            current, budget = current[cut:], later
        current.append(chunk)
    words.append(current)
    encode = (lambda w: "".join(w)) if marker == "q" else _b
    return [(" " if i else "") + f"=?utf-8?{marker}?{encode(w)}?=" for i, w in enumerate(words)]


def _b_size(chars: str | list[str]) -> int:
    return -(-len("".join(chars).encode("utf-8")) // 3) * 4


def _b(chars: list[str]) -> str:
    return base64.b64encode("".join(chars).encode("utf-8")).decode("ascii")


def _size(pieces: list[str]) -> int:
    return sum(map(len, pieces))


def _after_last_space(pieces: list[str]) -> int:
    """Where to end an encoded word of these characters: after its last space, else at the end."""
    for i in range(len(pieces) - 1, 0, -1):
        if pieces[i - 1] in ("_", " "):  # a space, Q-encoded or not yet base64-encoded
            return i
    return len(pieces)


def _q(char: str) -> str:
    """One character, Q-encoded (RFC 2047 §4.2): a space as `_`, its UTF-8 bytes as =XX."""
    if char in _Q_AS_IS:
        return char
    if char == " ":
        return "_"
    return "".join(f"={byte:02X}" for byte in char.encode("utf-8"))


def _fold(head: str, words: list[str]) -> list[str]:
    """Lines of at most 78 characters where the words allow: each word (every one but the first
    starts with its space) on the line so far if it fits, else on the next, the fold going
    before its space. A first word too long for the head's line goes on the next one too."""
    lines = [head]
    for word in words:
        word = word if word.startswith(" ") else " " + word
        if len(lines[-1]) + len(word) <= MAX_LINE:
            lines[-1] += word
        else:
            lines.append(word)
    return lines


def _written(name: str, lines: list[str]) -> bytes:
    """The lines as the header's bytes, checked: printable ASCII, each line after the first a
    continuation (it starts with a space), none over the hard limit of 998 characters."""
    for i, line in enumerate(lines):
        if not _PRINTABLE.fullmatch(line) or (i and not line.startswith(" ")):
            raise MessageError(f"the {name} header could not be written as one header")
        if len(line) > HARD_LIMIT:
            raise MessageError(f"the {name} header has a line over {HARD_LIMIT} characters")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
