"""Offline checks of the Docker deployment: hadolint, the compose-spec schema, Prometheus and Grafana config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO

BIN = Path(sys.executable).parent
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _tool(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name) or name


def test_hadolint_clean() -> None:
    result = subprocess.run([_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    final_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(line.startswith("HEALTHCHECK") for line in final_stage)
    assert "/healthz" in (REPO / "Dockerfile").read_text()


def test_compose_matches_compose_spec() -> None:
    result = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_and_mounted_files_exist() -> None:
    services = COMPOSE["services"]
    assert {"postgres", "demo", "exporter", "prometheus", "grafana"} <= set(services)
    assert services["exporter"]["command"][0] == "serve"
    demo = services["demo"]["command"]
    assert demo[0] == "demo" and int(demo[demo.index("--workers") + 1]) > 1
    # The workers and the sidecar share one multiprocess volume.
    shared = {v.split(":")[0] for v in services["demo"]["volumes"]} & {
        v.split(":")[0] for v in services["exporter"]["volumes"]
    }
    assert shared
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{source} is mounted but missing"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} would listen on every interface"


# registry/namespace/name:tag, the tag an exact version (a digest pins further): podman refuses short names
# without a search registry, and a floating tag (`16-alpine`, `latest`) changes under a rebuild.
PINNED_IMAGE = re.compile(
    r"^(?P<registry>[a-z0-9.-]+\.[a-z]+(:\d+)?)/(?P<path>[a-z0-9._-]+(/[a-z0-9._-]+)*)"
    r"(:(?P<tag>v?\d+\.\d+(\.\d+)?[A-Za-z0-9._-]*))(@sha256:[0-9a-f]{64})?$"
)


def pinned(reference: str) -> bool:
    """Fully qualified and pinned; on Docker Hub with its namespace too (`docker.io/library/postgres`)."""
    m = PINNED_IMAGE.match(reference)
    return m is not None and (m["registry"] != "docker.io" or "/" in m["path"])


@pytest.mark.parametrize(
    "reference",
    [
        "postgres:16-alpine",
        "docker.io/library/postgres:16-alpine",
        "docker.io/library/postgres:latest",
        "prom/prometheus:v2.53.4",
        "grafana/grafana:11.6.0",
        "docker.io/postgres:16.9",
    ],
)
def test_pinned_image_pattern_rejects_short_or_floating(reference: str) -> None:
    assert not pinned(reference)


def test_pulled_images_fully_qualified_and_pinned() -> None:
    pulled = {name: s["image"] for name, s in COMPOSE["services"].items() if "build" not in s and "image" in s}
    assert set(pulled) == {"postgres", "prometheus", "grafana"}
    for name, image in pulled.items():
        assert pinned(image), f"{name}: {image} is not registry/namespace/name:exact-version"
    # Services built here are tagged locally, never pulled.
    built = [s for s in COMPOSE["services"].values() if "build" in s]
    assert built and all(s["image"].endswith(":local") for s in built)


def test_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "config", str(REPO / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    mounted = [v for v in COMPOSE["services"]["prometheus"]["volumes"] if "alerts.yml" in v]
    assert mounted and mounted[0].split(":")[1].startswith("/etc/prometheus/rules/")
    assert config["rule_files"] == ["rules/*.yml"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "exporter:9717" in targets


def test_grafana_provisioning() -> None:
    root = REPO / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((root / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["type"] == "prometheus" and datasources[0]["isDefault"] is True
    providers = yaml.safe_load((root / "dashboards" / "sqlalchemy-pool.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    assert any(v.split(":")[1].startswith(path + "/") and v.startswith("./dashboards/") for v in mounts)
