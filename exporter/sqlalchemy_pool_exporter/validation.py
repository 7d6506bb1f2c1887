"""One validator per value, shared by the settings (CLI, environment) and the library's own arguments.

Each takes what a user gave and returns the clean value, or raises ValueError with a message that
names the problem but never repeats a secret. Settings wrap the message into their one-line error.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import catalog
from .metricnames import NAMES, Names

# Prometheus metric names are ASCII: [a-zA-Z_:][a-zA-Z0-9_:]*; a namespace is their first part.
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_REST = _NAME_START | frozenset("0123456789")
# Every bound is a series per labelled histogram: keep what one setting can cost bounded.
MAX_BUCKETS = 40
MAX_POOL_NAME = 200
# Certificates, keys and web config files are a few KiB; a cap keeps a wrong path (/dev/zero, a disk
# image) harmless.
MAX_FILE_BYTES = 1 << 20


def namespace(value: object) -> str:
    """Letters, digits and underscores (ASCII), not starting with a digit; empty means no prefix."""
    if not isinstance(value, str):
        raise ValueError(f"namespace must be a string, got {type(value).__name__}")
    if value and (value[0] not in _NAME_START or not set(value) <= _NAME_REST):
        raise ValueError(
            f"namespace must be ASCII letters, digits and underscores, not starting with a digit: {value!r}"
        )
    return value


def names(value: object) -> Names:
    """`default` (our metric names) or `semconv` (OpenTelemetry's semantic conventions, metricnames.py)."""
    for known in NAMES:
        if value == known:
            return known
    raise ValueError(f"names must be one of {', '.join(NAMES)}, got {value!r}")


def bounds(name: str, values: object) -> tuple[float, ...]:
    """Histogram bounds: finite, positive, strictly increasing numbers (the +Inf bucket is implicit)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"buckets[{name!r}] must be a list of numbers, got {type(values).__name__}")
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"buckets[{name!r}] must be numbers") from None
    if not floats:
        raise ValueError(f"buckets[{name!r}] must not be empty")
    if len(floats) > MAX_BUCKETS:
        raise ValueError(f"buckets[{name!r}] has {len(floats)} bounds; at most {MAX_BUCKETS}")
    if not all(math.isfinite(b) for b in floats):
        raise ValueError(f"buckets[{name!r}] must be finite numbers (+Inf is always added), got {list(values)!r}")
    if floats[0] <= 0 or any(b <= a for a, b in itertools.pairwise(floats)):
        raise ValueError(f"buckets[{name!r}] must be positive and strictly increasing, got {list(values)!r}")
    return floats


def buckets(
    value: Mapping[str, Sequence[float]] | None, defaults: Mapping[str, tuple[float, ...]] | None = None
) -> dict[str, tuple[float, ...]]:
    """Every bucket set, the defaults (catalog.DEFAULT_BUCKETS unless given) overridden by `value`."""
    out = dict(catalog.DEFAULT_BUCKETS if defaults is None else defaults)
    if value is None:
        return out
    if not isinstance(value, Mapping):
        raise ValueError(f"buckets must be a mapping of bucket set to bounds, got {type(value).__name__}")
    for key, values in value.items():
        if key not in catalog.DEFAULT_BUCKETS:
            known = ", ".join(sorted(catalog.DEFAULT_BUCKETS))
            raise ValueError(f"unknown bucket set {key!r}; expected one of {known}")
        out[key] = bounds(key, values)
    return out


def seconds(name: str, value: object, *, upper: float | None = None) -> float:
    """A finite, positive number of seconds (at most `upper`)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number of seconds greater than 0, got {value!r}")
    if upper is not None and number > upper:
        raise ValueError(f"{name} must be at most {upper:g} seconds, got {value!r}")
    return number


def probability(name: str, value: object) -> float:
    """A probability strictly between 0 and 1."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be a number between 0 and 1 (both excluded), got {value!r}")
    return number


_PROMETHEUS_DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+", re.ASCII)


def prometheus_duration(name: str, value: object) -> str:
    """A Prometheus duration (`7d`, `1h30m`), as a range selector takes it."""
    ok = isinstance(value, str) and _PROMETHEUS_DURATION.fullmatch(value) is not None
    if not ok or not any(c in "123456789" for c in str(value)):  # 0d is no range
        raise ValueError(f"{name} must be a Prometheus duration such as 7d, 12h or 1h30m, got {str(value)[:40]!r}")
    return str(value)


def leak_threshold(value: object) -> float | None:
    """None (off) or a finite, positive number of seconds."""
    return None if value is None else seconds("leak_threshold", value)


def encodable(text: str) -> str:
    """`text` as valid UTF-8 text: lone surrogates (from surrogateescape-decoded paths or env) replaced."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        # Bytes smuggled as \udc80-\udcff become what they were, then U+FFFD where not UTF-8.
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def pool_name(value: object) -> str:
    """A `pool` label value: a non-empty string, made encodable, at most MAX_POOL_NAME characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"name must be a non-empty string, got {value!r}")
    return encodable(value)[:MAX_POOL_NAME]


# PostgreSQL's identifiers (a database name, an application_name) are at most NAMEDATALEN - 1 bytes.
PG_NAME_BYTES = 63
ALL_DATABASES = "*"
MAX_DATABASES = 100


def server_view_databases(value: object) -> tuple[str, ...] | None:
    """The databases the server view watches: names separated by commas, `("*",)` for every database,
    None (empty, unset) for the one the database URL connects to."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected database names separated by commas, or *, got {type(value).__name__}")
    names = [part.strip() for part in value.split(",")]
    if names == [""]:
        return None
    if ALL_DATABASES in names:
        if len(names) > 1:
            raise ValueError("* (every database) stands alone")
        return (ALL_DATABASES,)
    if len(names) > MAX_DATABASES:
        raise ValueError(f"at most {MAX_DATABASES} databases")
    for name in names:
        if not name:
            raise ValueError("an empty database name (two commas, or one at an end)")
        if "://" in name:  # a URL pasted here would be repeated back, password and all
            raise ValueError("a URL, not a database name (the server view's URL is database_url)")
        if not name.isprintable() or len(encodable(name).encode()) > PG_NAME_BYTES:
            shown = "(not repeated: it holds an '@')" if "@" in name else repr(name)
            raise ValueError(f"not a PostgreSQL database name (printable, at most {PG_NAME_BYTES} bytes): {shown}")
    return tuple(dict.fromkeys(names))


# -- HTTP side ----------------------------------------------------------------------------------

# Paths the exporter's own app serves besides the metrics endpoint.
RESERVED_PATHS = frozenset({"/", "/healthz", "/readyz", "/pools"})
# RFC 3986 pchar without percent-encoding: what aiohttp matches literally. '%' is left out on
# purpose: aiohttp matches the decoded path, so '/a%2Fb' would not be served at the path given.
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@")
MAX_PATH = 200
MAX_WORKERS = 64
MAX_HTTP_CONNECTIONS = 100_000


MAX_HOLDER_NAME = 120


def holder_name(value: object) -> str:
    """A `holder` label value: a non-empty string, made encodable, at most MAX_HOLDER_NAME characters."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"a holder name must be a non-empty string, got {value!r}")
    return encodable(value)[:MAX_HOLDER_NAME]


def max_holders(value: object) -> int:
    """How many holder names a pool keeps apart (1 to 1,000); more fold into `other`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ValueError(f"max_holders must be a whole number from 1 to 1000, got {value!r}")
    return value


def metrics_path(value: object) -> str:
    """An absolute path of non-empty ASCII segments, no trailing '/', not one of our other routes."""
    if not isinstance(value, str):
        raise ValueError(f"metrics_path must be a string, got {type(value).__name__}")
    problem = ""
    if not value.startswith("/") or len(value) > MAX_PATH:
        problem = f"must start with '/' and be at most {MAX_PATH} characters"
    elif value in RESERVED_PATHS:
        problem = "must not be /, /healthz, /readyz or /pools"
    elif value.endswith("/") or "//" in value:
        # '/pools/' used to be stripped to '/pools' and shadow it; no form of a path is guessed at.
        problem = "must not end with '/' or contain '//'"
    elif not set(value[1:].replace("/", "")) <= _PATH_CHARS:
        problem = "may hold only ASCII letters, digits and -._~!$&'()*+,;=:@ between '/' (no ?, #, % or spaces)"
    elif any(segment in (".", "..") for segment in value.split("/")):
        problem = "must not contain '.' or '..' segments"
    if problem:
        raise ValueError(f"metrics_path {problem}, got {value!r}")
    return value


# DNS: 253 characters a name (without its final dot), 63 a label; socket names its own (RFC 1035).
MAX_HOST = 253
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def host(value: object) -> str:
    """An address to listen on: "" (every address), an IP literal, or a host name DNS could hold.

    Checked here because asyncio's lookup raises UnicodeError (not an OSError) for a name IDNA
    cannot encode (a label over 63 characters, an empty one), which no bind-failure handler expects.
    """
    if not isinstance(value, str):
        raise ValueError(f"host must be a string, got {type(value).__name__}")
    if value == "":
        return value
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    # A long value is not quoted at all: cut short, a URL given here could lose the '@' that tells
    # the setting error to mask its password.
    shown = repr(value) if len(value) <= 80 else f"{len(value)} characters"
    try:
        ascii_name = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"host must be an IP address or a host name, got {shown}") from None
    labels = ascii_name.removesuffix(".").split(".")
    if len(ascii_name.removesuffix(".")) > MAX_HOST or not all(
        0 < len(label) <= 63 and set(label) <= _LABEL_CHARS for label in labels
    ):
        raise ValueError(
            f"host must be an IP address or a host name (labels of letters, digits, '-' and '_', at most"
            f" {MAX_HOST} characters), got {shown}"
        )
    return value


def _whole(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else ""
    # ASCII digits only (str.isdecimal also takes other scripts' digits), and few of them.
    if text.isascii() and text.isdecimal() and len(text) <= 9:
        return int(text)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def workers(value: object) -> int:
    """How many demo app processes: 1 to MAX_WORKERS."""
    number = _whole("workers", value)
    if not 1 <= number <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {value!r}")
    return number


def max_http_connections(value: object) -> int:
    """The cap on open client connections of our HTTP server: 1 to MAX_HTTP_CONNECTIONS."""
    number = _whole("max_http_connections", value)
    if not 1 <= number <= MAX_HTTP_CONNECTIONS:
        raise ValueError(f"max_http_connections must be between 1 and {MAX_HTTP_CONNECTIONS}, got {value!r}")
    return number


# -- credentials ----------------------------------------------------------------------------------


def token(value: str | None) -> str | None:
    """None (no token auth) or a token that is not empty nor only whitespace."""
    if value is not None and not value:
        raise ValueError("token is empty: an empty token would accept an empty 'Bearer' header (unset it instead)")
    if value is not None and value.isspace():
        # No client sends it (headers are stripped), so it locks everyone out; and, scrubbed from
        # the log as a secret, it would turn every space of every line into ***.
        raise ValueError("token is only whitespace: it would lock everyone out (unset it instead)")
    return value


def basic_auth(user: str | None, password: str | None) -> tuple[str | None, str | None]:
    """Both None (no basic auth), or a non-empty user without ':' and a non-empty password."""
    if user is None and password is None:
        return None, None
    if user is not None and (not user or ":" in user):
        raise ValueError("basic auth user must be non-empty and contain no ':' (RFC 7617)")
    if user is None:
        raise ValueError("a basic auth password needs a basic auth user")
    if password is None:
        raise ValueError("a basic auth user needs a basic auth password")
    if not password:
        raise ValueError("basic auth password is empty: it would lock everyone out (unset both to turn it off)")
    if password.isspace():
        # As a token of spaces: it locks everyone out, and would turn every space in the log into ***.
        raise ValueError("basic auth password is only whitespace: it would lock everyone out")
    return user, password


# -- files named by settings ------------------------------------------------------------------------


def shown_path(path: Path) -> str:
    """A path as an error line repeats it: quoted when it is printable; not at all when it holds an '@'
    (a URL given where a file name was expected would repeat its password; found by fuzz_settings)."""
    text = str(path)
    if "@" in text:
        return "(a path holding '@', not repeated)"
    return repr(text) if not text.isprintable() else text


def small_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`: a readable regular file of at most `limit` bytes.

    Symlinks are followed (mounted Kubernetes secrets are symlinks). The file is checked before it is
    opened (opening a device can have effects), opened without blocking (a FIFO swapped in meanwhile
    cannot hang us), checked again through the descriptor, and never read past `limit` + 1 bytes.
    """
    try:
        before = path.stat()
        _small_regular(path, before, limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read {shown_path(path)}: {exc.strerror}") from None
    except ValueError as exc:
        if isinstance(exc, _NotSmallRegular):
            raise ValueError(str(exc)) from None
        raise ValueError(f"not a usable path: {shown_path(path)}") from None  # a NUL in it
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise ValueError(f"{shown_path(path)} was replaced while being read")
        _small_regular(path, now, limit)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ValueError(f"cannot read {shown_path(path)}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise ValueError(f"{shown_path(path)} grew past {limit} bytes while being read")
    return b"".join(chunks)


class _NotSmallRegular(ValueError):
    pass


def _small_regular(path: Path, info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _NotSmallRegular(f"{shown_path(path)} is not a regular file")
    if info.st_size > limit:
        raise _NotSmallRegular(f"{shown_path(path)} is {info.st_size} bytes; at most {limit} expected")
