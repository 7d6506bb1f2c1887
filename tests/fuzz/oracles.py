"""What the harnesses check their outputs against: the exposition format's own rules, and no secret shown.

`check_text` applies what Prometheus' text parser and `promtool check metrics` reject in a body of the
classic text format (0.0.4): a line that is not HELP, TYPE, a comment or a sample; a metric or label
name outside the legacy charsets; a label value with an unescaped quote, backslash or newline; a value
that is not a float; a second HELP or TYPE for one name; a family whose samples are not contiguous;
the same series twice. `check_openmetrics` parses an OpenMetrics body with prometheus_client's strict
OpenMetrics parser (which rejects a duplicate series, a bad name or bad escaping) and checks `# EOF`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile

from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*={_VALUE}"
_FLOAT = r"[+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
SAMPLE = re.compile(
    rf"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{(?P<labels>{_LABEL}(?:,{_LABEL})*)?\}})? {_FLOAT}(?: -?[0-9]+)?"
)
_PAIR = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_VALUE})")
HELP = re.compile(r"# HELP (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?:[^\\\n]|\\[\\n])*")
TYPE = re.compile(r"# TYPE (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<type>counter|gauge|histogram|summary|untyped)")
# The sample names a family of each type may have, after its TYPE line's name.
SUFFIXES = {
    "counter": ("",),  # the text format names a counter family by its `_total` sample
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}


# A sample line's value (and timestamp): everything after the name and labels. A label value may hold
# `} `, so the value is found after the last `"} ` or, without labels, after the name.
_OM_VALUE = re.compile(r'^((?:[^#\n][^{ \n]*\{.*"\}|[^#\n][^{ \n]*) )[^\n]*$', re.MULTILINE)


class Violation(AssertionError):
    """An output that breaks the format's rules (or shows a secret)."""


def check_text(body: bytes) -> int:
    """Check a classic text-format body line by line; return how many samples it holds."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Violation(f"not UTF-8: {exc}") from None
    if text and not text.endswith("\n"):
        raise Violation("no newline at the end")
    helped: set[str] = set()
    typed: dict[str, str] = {}
    done: set[str] = set()  # families whose samples have ended
    series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    family: str | None = None
    samples = 0
    for line in text.split("\n")[:-1]:  # only \n ends a line in the format (splitlines() also splits at \x1c...)
        if line.startswith("# HELP "):
            m = HELP.fullmatch(line)
            if m is None:
                raise Violation(f"bad HELP line: {line[:200]!r}")
            if m["name"] in helped:
                raise Violation(f"second HELP for {m['name']}")
            helped.add(m["name"])
            continue
        if line.startswith("# TYPE "):
            m = TYPE.fullmatch(line)
            if m is None:
                raise Violation(f"bad TYPE line: {line[:200]!r}")
            if m["name"] in typed:
                raise Violation(f"second TYPE for {m['name']}")
            if family is not None:
                done.add(family)
            family = m["name"]
            typed[family] = m["type"]
            continue
        if line.startswith("#") or not line.strip():
            continue
        m = SAMPLE.fullmatch(line)
        if m is None:
            raise Violation(f"bad sample line: {line[:200]!r}")
        name = m["name"]
        owner = _family_of(name, typed)
        if owner is None or owner in done or owner != family:
            raise Violation(f"sample {name} outside its family's contiguous group")
        pairs = tuple(sorted(_PAIR.findall(m["labels"] or "")))
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise Violation(f"a label repeated in {line[:200]!r}")
        if any(k.startswith("__") for k in names):
            raise Violation(f"a reserved label name in {line[:200]!r}")
        if (name, pairs) in series:
            raise Violation(f"duplicate series {line[:200]!r}")
        series.add((name, pairs))
        samples += 1
    # And prometheus_client's own parser must read it (it unescapes what the regexes only matched).
    list(text_string_to_metric_families(text))
    return samples


def _family_of(name: str, typed: dict[str, str]) -> str | None:
    for base in (name, *(name[: -len(s)] for s in ("_bucket", "_count", "_sum") if name.endswith(s))):
        kind = typed.get(base)
        if kind is not None and name[len(base) :] in SUFFIXES[kind]:
            return base
    return None


def check_openmetrics(body: bytes) -> None:
    """Parse an OpenMetrics body strictly (names, escaping, duplicate series, `# EOF`)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Violation(f"not UTF-8: {exc}") from None
    if not text.endswith("# EOF\n"):
        raise Violation("no # EOF at the end")
    # The values are the workers' own numbers, summed: the parser's checks of values (integral
    # buckets, non-negative counters, a count equal to the +Inf bucket) are not the format's shape.
    text = _OM_VALUE.sub(r"\g<1>0", text)
    try:
        for fam in om_families(text):
            if not METRIC_NAME.fullmatch(fam.name):
                raise Violation(f"bad family name {fam.name!r}")
    except ValueError as exc:
        raise Violation(f"OpenMetrics parser: {exc}") from None


def check_no_secret(secret: str, *outputs: str | bytes) -> None:
    """The secret appears in none of the outputs (nor its percent-encoded form)."""
    if len(secret) < 4:  # a short secret is a substring of anything; the renderers mask by position
        return
    for out in outputs:
        text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
        if secret in text:
            raise Violation(f"secret {secret!r} shown in {text[:300]!r}")


def absolute(argv: list[str]) -> list[str]:
    """A harness's arguments with its paths made absolute (for a harness that changes directory), and
    itself as a command line libFuzzer can run again through the shell (`-merge=1`, `-fork=N`)."""
    out = [f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(argv[0]))}"]
    for arg in argv[1:]:
        flag = next((f for f in ("-dict=", "-artifact_prefix=", "-exact_artifact_path=") if arg.startswith(f)), None)
        if flag is not None:
            value = arg[len(flag) :]
            out.append(flag + os.path.abspath(value) + ("/" if value.endswith("/") else ""))
        else:
            out.append(arg if arg.startswith("-") else os.path.abspath(arg))
    return out


def scratch(harness: str) -> str:
    """A directory of this run's own (on tmpfs when there is one); those of earlier runs that are gone are removed.

    libFuzzer ends the process without running `atexit` handlers, so a run cannot clean up after itself.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    prefix = f"fuzz-{harness}-"
    for name in os.listdir(base):
        pid = name[len(prefix) :].partition("-")[0]
        if name.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
