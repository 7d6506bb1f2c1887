"""Fuzz pool and holder names, and database URLs, through naming and every renderer.

Input: a URL `<driver>://<user>:SECRET@<rest>` (driver, user and rest from the fuzzer), an explicit
pool name (or none: then the name comes from the URL), and a holder name. `labels.pool_name` and
`labels.safe_url` read the URL, as text and parsed; a real SQLite engine is instrumented under the
name, and a connection checked out under the holder. Everything that shows names is rendered: the
fast /metrics path (text and OpenMetrics, through `Exposition`), the /pools JSON and the index HTML
(the real handlers), and the log lines (our text and JSON formatters). Oracle: the expositions parse
(tests/fuzz/oracles.py), the JSON loads, the HTML holds no raw `<` from a name, each text log record is
one line, and SECRET (the password) appears in none of them.

Run: python tests/fuzz/fuzz_names.py tests/fuzz/corpus/names -dict=tests/fuzz/names.dict
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from html.parser import HTMLParser
from typing import Any

import atheris
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["sqlalchemy_pool_exporter"]):
    from sqlalchemy_pool_exporter import labels, logs
    from sqlalchemy_pool_exporter.core import Exporter
    from sqlalchemy_pool_exporter.exposition.render import Exposition
    from sqlalchemy_pool_exporter.instrumentation.holders import holder
    from sqlalchemy_pool_exporter.web.app import index_handler, local_pools, pools_handler

from oracles import absolute, check_no_secret, check_openmetrics, check_text

SECRET = "Hunter2XyZZy"
LOOP = asyncio.new_event_loop()
REQUEST = make_mocked_request("GET", "/")


TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "table", "tr", "th", "td", "p", "a"}


class Cells(HTMLParser):
    """The page's tags and the text of its table cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.tags.add(tag)
        self._in_cell = tag == "td"
        if self._in_cell:
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


CAPTURE = Capture()
logging.getLogger("sqlalchemy_pool_exporter").addHandler(CAPTURE)
logging.getLogger("sqlalchemy_pool_exporter").setLevel(logging.DEBUG)
logging.getLogger("sqlalchemy_pool_exporter").propagate = False
# One exporter and one renderer for every input (as in a process): each input's engine is instrumented,
# then uninstrumented. The renderer's self-test runs once, not at every input.
EXPORTER = Exporter(CollectorRegistry())
EXPOSITION = Exposition(EXPORTER.registry, [EXPORTER.collector])
TEXT, JSON = logs.TextFormatter("%(levelname)s %(name)s %(message)s"), logs.JsonFormatter()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    driver = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20))
    user = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 10))
    rest = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
    explicit = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40)) if fdp.ConsumeBool() else None
    who = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if SECRET in driver + user + rest + (explicit or "") + who:
        return
    url = f"{driver or 'postgresql'}://{user}:{SECRET}@{rest}"
    try:
        parsed = make_url(url)
    except Exception:
        return
    shown = [labels.pool_name(url), labels.safe_url(url), labels.pool_name(parsed), labels.safe_url(parsed)]
    check_no_secret(SECRET, *shown)

    CAPTURE.records.clear()
    exporter = EXPORTER
    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=1)
    try:
        name = shown[0] if explicit is None else explicit
        try:
            name = exporter.instrument(engine, name=name).name  # as validated and claimed
        except ValueError as exc:  # a name refused: one line, without the password
            assert "\n" not in str(exc), str(exc)
            check_no_secret(SECRET, str(exc))
            return
        try:
            with holder(who), engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
                held = engine.connect()
        except ValueError as exc:  # a holder name refused
            assert "\n" not in str(exc), str(exc)
            return
        logging.getLogger("sqlalchemy_pool_exporter").warning("pool %s at %s held by %r", name, shown[1], who)
        text, om = EXPOSITION.render(generate_latest), EXPOSITION.render(om_latest)
        check_text(text)
        check_openmetrics(om)
        pools: Any = LOOP.run_until_complete(pools_handler(local_pools(exporter))(REQUEST))
        json.loads(pools.body)
        page: Any = LOOP.run_until_complete(index_handler(local_pools(exporter), "/metrics")(REQUEST))
        cells = Cells()
        cells.feed(page.text)
        cells.close()
        if not cells.tags <= TAGS:
            raise AssertionError(f"a name added tags {cells.tags - TAGS} to the page")
        if name not in cells.cells:
            raise AssertionError(f"pool name {name!r} not a cell of the page")
        lines = []
        for record in CAPTURE.records:
            line = TEXT.format(record)
            if record.exc_info is None and record.stack_info is None and "\n" in line:
                raise AssertionError(f"a log record on two lines: {line!r}")
            lines.append(line)
            lines.append(JSON.format(record))
            json.loads(lines[-1])
        check_no_secret(SECRET, text, om, pools.body, page.text, *lines)
        held.close()
    finally:
        exporter.uninstrument(engine)
        engine.dispose()


def main() -> None:
    atheris.Setup(absolute(sys.argv), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
