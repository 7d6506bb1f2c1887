"""Strict YAML for the web config file: a safe loader that refuses a repeated key, and the two scalar
rules of Go's YAML decoder (go.yaml.in/yaml/v2, which the toolkit uses strictly) that pydantic lacks:
a number written where a string goes is its text (`X-XSS-Protection: 1`), and a duration is Go's
`time.ParseDuration` syntax or a whole number of nanoseconds.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

from ...errors import MissingExtra, require


class WebConfigError(ValueError):
    """A problem with the web config file, as one line naming the field."""


# The format nests 4 deep. Composing a document nests as deep as the document does, in C: PyYAML
# 6.0.1-6.0.3's libyaml has no nesting limit, and 100,000 nested `[` crashed the process (SIGSEGV,
# measured on 6.0.1). Its event parser keeps an explicit stack, so the depth is checked on events first.
MAX_DEPTH = 32


def load_yaml(raw: bytes) -> object:
    """The document in `raw`; WebConfigError (with line and column) if it is not valid YAML.

    PyYAML is the `sidecar` extra's, imported here, at the first file read: without it, reading a
    file is this one-line WebConfigError naming the extra, and nothing else of the package needs it.
    """
    try:
        require("yaml", "sidecar", "the web config file (--web.config.file)")
    except MissingExtra as exc:
        raise WebConfigError(str(exc)) from None
    import yaml

    loader, strict_loader = _loaders()
    opening = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    closing = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    try:
        depth = 0
        for event in yaml.parse(raw, Loader=loader):
            if isinstance(event, opening):
                depth += 1
                if depth > MAX_DEPTH:
                    raise WebConfigError(f"nested more than {MAX_DEPTH} deep{_where(event.start_mark)}")
            elif isinstance(event, closing):
                depth -= 1
        return yaml.load(raw, Loader=strict_loader)
    except yaml.MarkedYAMLError as exc:
        raise WebConfigError(f"not valid YAML: {exc.problem or exc.context}{_where(exc.problem_mark)}") from None
    except yaml.reader.ReaderError as exc:  # its text has a second line: `in "<byte string>", position N`
        raise WebConfigError(f"not valid YAML: {str(exc).splitlines()[0]} (position {exc.position + 1})") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # pure-Python PyYAML, below MAX_DEPTH: not expected, but never a traceback
        raise WebConfigError("not valid YAML: nested too deeply") from None


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


@functools.cache
def _loaders() -> tuple[Any, Any]:
    """PyYAML's safe loader, and ours that also refuses a repeated key; made at the first file read."""
    import yaml

    # libyaml's parser where PyYAML has it (its wheels do): a 1 MiB file of users parses in 0.3 s, not 2.6 s.
    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class StrictLoader(loader):  # type: ignore[misc]
        """A safe loader that also refuses a key given twice (the toolkit's strict decoding does too)."""

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[object] = set()
            for key_node, _ in node.value:
                # A number is its text wherever a string goes (every mapping of the file has string keys):
                # `1` and `"1"` are the same key, as in Go, not a second one that silently wins.
                key = _number_as_text(self.construct_object(key_node, deep=deep))
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: construct_mapping below says so
                    repeated = False
                if repeated:
                    problem = f"key {str(key)!r} given twice"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
            return mapping

    return loader, StrictLoader


def _number_as_text(value: object) -> object:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# A string; a number stands for its text, as in Go (a boolean does not).
GoStr = Annotated[str, BeforeValidator(_number_as_text)]

# Go's time.ParseDuration: a sequence of decimal numbers with units, e.g. "1s", "1.5m", "1m30s".
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# Go's time.Duration is an int64 of nanoseconds: about 292 years. ParseDuration refuses more, and so
# do we: 10**400 nanoseconds was an OverflowError traceback, and `999…9h` parsed as infinity.
MAX_NANOSECONDS = 2**63 - 1
MAX_SECONDS = MAX_NANOSECONDS / 1e9


def _seconds(value: object) -> float:
    """Go's time.Duration in YAML: a duration string ("1s", "1m30s"), or a whole number of nanoseconds."""
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_NANOSECONDS:
            raise ValueError("out of range: at most 2562047h (Go's time.Duration)")
        seconds = value * 1e-9
    elif text in ("0", ""):
        seconds = 0.0
    elif (
        text
        and (parts := _DURATION_PART.findall(text))
        and "".join(n + u for n, u in parts) == text
        and all(n not in ("", ".") for n, _ in parts)
    ):
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r} (e.g. 1s, 500ms, 1m30s)")
    if not seconds <= MAX_SECONDS:  # infinity too (a float of 400 digits is inf, not an error)
        raise ValueError("out of range: at most 2562047h (Go's time.Duration)")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


# Seconds, from a Go duration.
Duration = Annotated[float, BeforeValidator(_seconds)]
