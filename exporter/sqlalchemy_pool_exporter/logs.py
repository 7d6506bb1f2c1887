"""Logging set-up for the CLI: text or JSON lines, with known secrets scrubbed from every record.

A text line is one line whatever it names: pool and holder names come from URLs, clients and apps,
so what `str.isprintable()` refuses (line breaks, ANSI escapes, NUL, bidi overrides) is written as an
escape by the formatter, once for every line (JSON escapes it already).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

LogFormat = Literal["text", "json"]

# LogRecord attributes that are not `extra=` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

# The `extra=` field naming the multi-line stack that ends a record's message (a leak's checkout stack):
# TextFormatter escapes the line before it and keeps the stack's own lines; JSON has it in the message.
STACK = "stack"
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    named = _ESCAPES.get(char)
    if named is not None:
        return named
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, keep: str = "") -> str:
    """`text` with each character `str.isprintable()` refuses (but those in `keep`) as an escape: `\\n`, `\\x1b`."""
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


class Throttle:
    """Let one event through per `interval` seconds and count the ones held back in between.

    For what a client can trigger at will (bad credentials, stalled connections, accept() failing
    when descriptors run out): one line a minute says it happens and how often, a line per event
    would let anyone fill the disk. The one throttle: for a logger as its filter (`filter()`), and per
    place in instrumentation/failures.py.
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next: float | None = None
        self._held = 0

    def ready(self) -> int | None:
        """None while throttled (the event is counted); otherwise how many were held back before it."""
        now = self._clock()
        if self._next is not None and now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self.interval
        return held

    def note(self, held: int) -> str:
        """What to append to the line `ready()` let through."""
        return f" ({held} more since the last such line; at most one every {self.interval:g} s)" if held else ""

    def filter(self, record: logging.LogRecord) -> bool:
        """As a logger's filter: records below WARNING pass; of the rest, one per interval, with the note."""
        if record.levelno < logging.WARNING:
            return True
        held = self.ready()
        if held is None:
            return False
        if held:
            record.msg, record.args = record.getMessage() + self.note(held), None
        return True


class RedactFilter(logging.Filter):
    """Replace each secret by `***` in the final message and its extra fields."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is hidden whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.scrub(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key != STACK and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """One record, one line, escaped; a stack or traceback follows on lines of its own, escaped but its line breaks."""

    def format(self, record: logging.LogRecord) -> str:
        message, tails = record.getMessage(), []
        stack = getattr(record, STACK, None)
        if isinstance(stack, str) and stack and message.endswith(stack):
            message = message[: -len(stack)].rstrip("\n")
            tails.append(stack.rstrip("\n"))
        record.message = printable(message)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_text:  # set by RedactFilter, scrubbed
            tails.append(record.exc_text)
        elif record.exc_info:
            tails.append(self.formatException(record.exc_info))
        if record.stack_info:
            tails.append(self.formatStack(record.stack_info))
        return "\n".join([line, *(printable(tail, keep="\n") for tail in tails if tail)])


def setup(level: str = "INFO", fmt: LogFormat = "text", secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once, at the CLI edge."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is one line per scrape: useful only when debugging.
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
