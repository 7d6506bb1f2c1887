"""The web config file against hostile values and hostile clients, through a real `serve` process:
huge or endless numbers, user names that collide or can never log in, a certificate that is not PEM,
a flood of wrong passwords and a flood of unauthenticated requests against the rate limit."""

from __future__ import annotations

import asyncio
import base64
import itertools
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import trustme

from .cli_process import assert_exit_2_one_line, run_cli, serving

pytestmark = pytest.mark.reliability

SERVE = ["serve", "--host", "127.0.0.1", "--port", "0"]
HUGE = "1" + "0" * 400


def hashed(password: str, cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def status(base: str, path: str, authorization: str = "") -> int:
    request = urllib.request.Request(base + path, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


BAD_RATE_LIMITS = [
    f"rate_limit:\n  interval: {HUGE}\n  burst: 1\n",  # nanoseconds: was an OverflowError traceback
    f"rate_limit:\n  interval: 1s\n  burst: {HUGE}\n",  # was a 500 on every route, /healthz included
    f"rate_limit:\n  interval: {'9' * 400}h\n  burst: 1\n",  # was infinity, accepted
    "rate_limit:\n  interval: 1e400s\n  burst: 1\n",
    "rate_limit:\n  interval: 300000000h\n  burst: 1\n",  # beyond Go's time.Duration (292 years)
]


@pytest.mark.parametrize("text", BAD_RATE_LIMITS)
def test_huge_rate_limit_values_exit_2_with_one_line(tmp_path: Path, text: str) -> None:
    config = tmp_path / "web.yml"
    config.write_text(text)
    result = run_cli([*SERVE, "--multiproc-dir", str(tmp_path), "--web-config-file", str(config)])
    assert_exit_2_one_line(result, "web_config_file")
    assert "rate_limit." in result.stderr


def test_huge_rate_limit_values_swapped_in_fail_closed_with_healthz_up(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    good = "rate_limit:\n  interval: 1ms\n  burst: 1000\n"
    config.write_text(good)
    with serving(tmp_path, "--web-config-file", str(config)) as server:
        assert status(server.base, "/metrics") == 200
        for text in BAD_RATE_LIMITS:
            config.write_text(text)
            assert (status(server.base, "/metrics"), status(server.base, "/healthz")) == (500, 200), text
        config.write_text(good)
        assert status(server.base, "/metrics") == 200
    assert "Traceback" not in server.text()


@pytest.mark.parametrize(
    ("users", "problem"),
    [
        # Both are user "1" in Go's map[string]string: the second silently won.
        ('  1: {h}\n  "1": {h}\n', "given twice"),
        ("  '2': {h}\n  2: {h}\n", "given twice"),
        # Basic auth splits at the first ':': this user could never log in.
        ('  "pr:om": {h}\n', "':'"),
    ],
)
def test_user_names_that_collide_or_cannot_log_in_exit_2(tmp_path: Path, users: str, problem: str) -> None:
    config = tmp_path / "web.yml"
    config.write_text("basic_auth_users:\n" + users.format(h=hashed("s3cret")))
    result = run_cli([*SERVE, "--multiproc-dir", str(tmp_path), "--web-config-file", str(config)])
    assert_exit_2_one_line(result, "web_config_file")
    assert problem in result.stderr and ("basic_auth_users" in result.stderr or "line 3" in result.stderr)


def test_a_certificate_that_is_not_pem_has_a_reason(tmp_path: Path) -> None:
    """Fault: the error for a certificate file that is not PEM ended in `: None`."""
    key = trustme.CA().issue_cert("127.0.0.1").private_key_pem
    key.write_to_path(str(tmp_path / "server.key"))
    (tmp_path / "server.crt").write_text("this is not a certificate\n")
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    for flags, setting in (
        (["--web-config-file", str(config)], "web_config_file"),
        (["--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key")], "tls_cert"),
    ):
        result = run_cli([*SERVE, "--multiproc-dir", str(tmp_path), *flags])
        assert_exit_2_one_line(result, setting)
        assert not result.stderr.rstrip().endswith("None"), result.stderr
        assert "PEM" in result.stderr, result.stderr


# -- floods: bounded in count, stopped as soon as the check is done --------------------------------


async def _get(port: int, authorization: str, path: str = "/metrics", source: str = "127.0.0.1") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        auth = f"Authorization: {authorization}\r\n" if authorization else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1])


async def test_a_new_credential_is_checked_during_a_flood_of_wrong_passwords(tmp_path: Path) -> None:
    """Fault: 50 clients sending distinct wrong passwords kept the 4 check slots full, and Prometheus
    with a correct credential never checked before (after a restart or a password change) got 429 on
    every try. Now each user that exists in the file, from each client address, waits in a queue of
    its own, served in turn with the others: the new credential is checked within a few hashes.

    The flood comes from 127.0.0.2 (wrong passwords for the real user and for unknown ones),
    Prometheus from 127.0.0.1; the flood is at most 4,000 requests and stops once Prometheus is done.
    """
    config = tmp_path / "web.yml"
    # Cost 10, as htpasswd -B writes: each hash holds its slot long enough for the flood to refill it.
    config.write_text(f"basic_auth_users:\n  prom: {hashed('s3cret', 10)}\n")
    done = asyncio.Event()
    counter = itertools.count()
    flood: dict[int, int] = {}
    with serving(tmp_path, "--web-config-file", str(config)) as server:

        async def attacker() -> None:
            while not done.is_set() and (n := next(counter)) < 4000:
                user = "prom" if n % 2 else f"nobody{n}"
                code = await _get(server.port, basic(user, f"guess-{n}"), source="127.0.0.2")
                flood[code] = flood.get(code, 0) + 1

        attackers = [asyncio.create_task(attacker()) for _ in range(50)]
        try:
            # The slots are full once the flood itself gets 429s.
            while not flood.get(429) and not all(t.done() for t in attackers):
                await asyncio.sleep(0.05)
            assert flood.get(429), flood
            tries = []
            for _ in range(10):
                tries.append(await _get(server.port, basic("prom", "s3cret")))
                if tries[-1] == 200 or all(t.done() for t in attackers):
                    break
                await asyncio.sleep(0.3)
        finally:
            done.set()
            await asyncio.gather(*attackers)
        assert tries[-1] == 200, (tries, flood)
        assert set(tries) <= {200, 429}
        assert set(flood) <= {401, 429}, flood
        # Cached now: the flood no longer matters to it.
        assert await _get(server.port, basic("prom", "s3cret")) == 200
    assert "s3cret" not in server.text() and "Traceback" not in server.text()


async def test_rate_limit_does_not_starve_cached_credentials_or_healthz(tmp_path: Path) -> None:
    """Fault: unauthenticated 404s from 8 clients spent the one rate-limit bucket, and all 14 of
    Prometheus's authenticated scrapes got 429. Now a request with a credential already checked (and
    cached) is not charged: it costs no bcrypt. Everything else, a new credential included, still is."""
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prom: {hashed('s3cret')}\nrate_limit:\n  interval: 1h\n  burst: 3\n")
    good = basic("prom", "s3cret")
    with serving(tmp_path, "--web-config-file", str(config)) as server:
        assert await _get(server.port, good) == 200  # checked once: one token
        seen: list[int] = []

        async def client(i: int) -> None:
            for n in range(10):  # bounded: the bucket holds 2 more tokens
                seen.append(await _get(server.port, "", f"/nowhere/{i}/{n}", source="127.0.0.2"))

        await asyncio.gather(*(client(i) for i in range(8)))
        assert seen.count(429) == 78 and seen.count(401) == 2, seen
        scrapes = [await _get(server.port, good) for _ in range(14)]
        assert scrapes == [200] * 14
        assert await _get(server.port, "", "/healthz") == 200
        # A credential not checked yet, a wrong password for the same user: charged, and refused.
        assert await _get(server.port, basic("prom", "other")) == 429
        assert await _get(server.port, basic("ops", "s3cret")) == 429
