"""Environment files read exactly as systemd's `EnvironmentFile=` reads them.

systemd hands the service the secrets of /etc/esmail/env; esmail-admin (through `esmail env-file`)
and `.env.{stage}` are read here with the same rules, so an admin command and the service never
see different values (systemd.exec(5), "EnvironmentFile="; checked against systemd's own parser in
tests/test_envfile.py):

- one `KEY=VALUE` a line; blanks around the key and before the value are dropped; a line without
  `=` is ignored; a later assignment of a key wins;
- a line whose first non-blank character is `#` or `;` is a comment; there are no comments after a
  value: `KEY=value   # note` is the value `value   # note`;
- unquoted, trailing blanks are dropped, a backslash keeps the next character as it is and a
  backslash at the end of a line joins the next one;
- `'…'` keeps everything up to the next `'` (newlines too); `"…"` the same, where a backslash
  before `"`, `\\`, `` ` `` or `$` keeps that character, before a newline joins the lines, and
  otherwise stays; quoted and unquoted parts that touch are joined (`A="x"y` is `xy`);
- a key must be a shell variable name (letters, digits, `_`, not a digit first): `export KEY=…` is
  ignored, as systemd ignores it;
- the file must be UTF-8 (systemd refuses the whole file otherwise).

One rule differs between systemd versions: a comment ending in a backslash swallows the next line
up to 253 (Debian 12 has 252) and not from 254. Such a file is refused rather than guessed at.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from esmail.errors import ConfigError

_BLANK = " \t\n\r"
_LINE_END = "\n\r"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """The variables of an env file and a note for every line systemd would ignore; a missing file has none."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        hint = " (it is root's alone: run this as root)" if isinstance(exc, PermissionError) else ""
        raise ConfigError(f"{path}: cannot read the environment file: {exc.strerror or exc}{hint}") from None
    return parse(data, str(path))


def parse(data: bytes, where: str) -> tuple[dict[str, str], list[str]]:
    """`read`'s rules applied to the bytes of a file named `where` (for messages)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{where}: line {line} is not UTF-8; systemd would ignore the whole file: write it as UTF-8") from None
    if "\0" in text:
        raise ConfigError(f"{where}: line {text[:text.index(chr(0))].count(chr(10)) + 1} holds a NUL byte; remove it")
    values: dict[str, str] = {}
    ignored: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _BLANK:
            i += 1
            continue
        line = text.count("\n", 0, i) + 1
        end = _line_end(text, i)
        if c in "#;":
            backslashes = len(text[i:end]) - len(text[i:end].rstrip("\\"))
            joins = text.startswith("\n", end) or (text.startswith("\r", end) and not text.startswith("\r\n", end))
            if backslashes % 2 and joins:
                raise ConfigError(f"{where}: line {line}: a comment ending in a backslash means different things to systemd 252 "
                                  "(it also hides the next line) and 254 (it does not): remove the backslash")
            i = end
            continue
        equals = text.find("=", i + 1, end)  # a line's first character is part of the key, even a "="
        if equals < 0:
            ignored.append(f"{where}: line {line}: no '=' in {text[i:end].strip()[:40]!r}: ignored")
            i = end
            continue
        key = text[i:equals].rstrip(_BLANK)
        value, i = _value(text, equals + 1)
        if _NAME.fullmatch(key):
            values[key] = value
        else:
            hint = " (write it without 'export')" if key.startswith("export ") else ""
            ignored.append(f"{where}: line {line}: {key[:40]!r} is not a variable name (letters, digits, _): "
                           f"systemd ignores the line{hint}")
    return values, ignored


def _line_end(text: str, i: int) -> int:
    ends = [p for p in (text.find("\n", i), text.find("\r", i)) if p >= 0]
    return min(ends) if ends else len(text)


def _value(text: str, i: int) -> tuple[str, int]:
    """The value that starts at text[i] (just after `=`), and where the next line starts."""
    out: list[str] = []
    unquoted = False  # inside an unquoted run: trailing blanks are dropped at the line's end
    trailing = None   # where the current run of unquoted blanks began in `out`
    n = len(text)
    while i < n:
        c = text[i]
        if c in _LINE_END:
            break
        i += 1
        if c == "\\":
            if i < n:
                if text[i] not in _LINE_END:
                    out.append(text[i])
                i += 1
            unquoted, trailing = True, None
        elif unquoted:
            if c in _BLANK:
                trailing = len(out) if trailing is None else trailing
            else:
                trailing = None
            out.append(c)
        elif c == "'":
            close = text.find("'", i)
            close = n if close < 0 else close
            out.append(text[i:close])
            i = close + 1
        elif c == '"':
            i = _double_quoted(text, i, out)
        elif c not in _BLANK:
            unquoted = True
            out.append(c)
    if unquoted and trailing is not None:
        del out[trailing:]
    return "".join(out), i


def _double_quoted(text: str, i: int, out: list[str]) -> int:
    """Append a double-quoted part that starts at text[i] (after its `"`); return where it ends."""
    n = len(text)
    while i < n:
        c = text[i]
        i += 1
        if c == '"':
            break
        if c == "\\":
            escaped = text[i:i + 1]  # none at the end of the file
            i += 1
            if escaped and escaped in '"\\`$':
                out.append(escaped)
            elif escaped not in ("", "\n"):
                out.append("\\" + escaped)
        else:
            out.append(c)
    return i
