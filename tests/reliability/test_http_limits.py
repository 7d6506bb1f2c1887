"""A client cannot hold the port hostage: stalled request heads, idle floods, descriptors running out,
and Accept headers prometheus_client's negotiation chokes on."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.reliability

# Generous: only a server that never closes misses it. No test asserts how fast anything is.
BOUND = 30.0


async def _scrape(base: str, **kwargs: object) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=BOUND), **kwargs) as r,  # type: ignore[arg-type]
    ):
        return r.status, await r.text()


ACCEPT_HEADERS = [
    "application/openmetrics-text; version=abc",
    "application/openmetrics-text; version=1.x",
    "application/openmetrics-text;version=1.0.0.ä",
    "text/plain; version=zz",
    "text/plain;version=",
    ";;;,,,=;version=.",
    "*/*;q=abc",
]


@pytest.mark.parametrize("accept", ACCEPT_HEADERS)
async def test_unparseable_accept_falls_back_to_text(registry: CollectorRegistry, serve, accept: str) -> None:
    """Fault: Accept headers with a version prometheus_client cannot compare (it raised TypeError: 500).

    The answer is 200 in the classic text format, as Prometheus itself falls back, and parses.
    """
    Counter("hostile_accept", "A counter.", registry=registry).inc(3)
    async with serve(registry) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: " + accept.encode() + b"\r\n\r\n"
            )
            data = await asyncio.wait_for(reader.read(), BOUND)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head
    samples = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples["hostile_accept_total"] == 3.0


async def test_a_bad_media_range_does_not_hide_a_good_one(registry: CollectorRegistry, serve) -> None:
    """A range with a bad version is skipped; the next acceptable one (OpenMetrics 1.0.0) is served."""
    Counter("hostile_accept", "A counter.", registry=registry).inc(3)
    accept = "application/openmetrics-text; version=abc, application/openmetrics-text; version=1.0.0"
    async with serve(registry) as base:
        status, body = await _scrape(base, headers={"Accept": accept})
    assert status == 200
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["hostile_accept"].samples[0].value == 3.0
