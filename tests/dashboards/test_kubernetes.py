"""deploy/kubernetes: generated from the rule file and the dashboard, valid against the Kubernetes and
prometheus-operator schemas, and wired the way docs/kubernetes.md says."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import kubernetes, kubernetes_schema
from sqlalchemy_pool_exporter import __version__
from sqlalchemy_pool_exporter.service.settings import DEFAULT_PORT

from .conftest import REPO
from .test_deploy_lint import pinned

DEPLOY = kubernetes.DEPLOY
RULES = REPO / "dashboards" / "alerts.yml"
RULE_TESTS = REPO / "dashboards" / "tests" / "alerts_test.yml"
PROMTOOL = shutil.which("promtool") or "promtool"
RESOURCES = kubernetes_schema.resources()
BY_KIND = {r.doc["kind"]: r.doc for r in RESOURCES}
POD = BY_KIND["Deployment"]["spec"]["template"]
CONTAINERS = {c["name"]: c for c in POD["spec"]["containers"]}
APP, SIDECAR = CONTAINERS["app"], CONTAINERS["pool-exporter"]


# -- one source: generated, never hand-copied --------------------------------------------------------


def test_generated_files_are_checked_in() -> None:
    for path, text in kubernetes.files().items():
        assert path.read_text() == text, f"run `python -m dashboards.kubernetes` and commit {path.name}"
    assert kubernetes.main(["--check"]) == 0


def test_check_mode_detects_stale_files(tmp_path: Path) -> None:
    for path in kubernetes.files():
        shutil.copy(path, tmp_path / path.name)
    assert kubernetes.main(["--check", "--output", str(tmp_path)]) == 0
    stale = tmp_path / kubernetes.PROMETHEUS_RULE.name
    stale.write_text(stale.read_text().replace("for: 5m", "for: 6m", 1))
    assert kubernetes.main(["--check", "--output", str(tmp_path)]) == 1


def test_prometheus_rule_spec_is_the_rule_file() -> None:
    assert BY_KIND["PrometheusRule"]["spec"] == yaml.safe_load(RULES.read_text())


def test_dashboard_configmap_holds_the_dashboard_byte_for_byte() -> None:
    configmap = BY_KIND["ConfigMap"]
    assert configmap["data"] == {"sqlalchemy-pool.json": (REPO / "dashboards" / "sqlalchemy-pool.json").read_text()}
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    # `kubectl apply` (client-side) keeps the whole object in an annotation, and annotations are capped
    # at 256 KiB: past that only server-side apply would take it.
    assert len(json.dumps(configmap)) < 200 * 1024


def test_prometheus_rule_passes_promtool_like_the_rule_file(tmp_path: Path) -> None:
    # The extracted rules sit where alerts_test.yml looks for them (../alerts.yml), so the rule file's
    # own unit tests run unchanged against the PrometheusRule's rules.
    (tmp_path / "tests").mkdir()
    extracted = tmp_path / "alerts.yml"
    extracted.write_text(yaml.safe_dump(BY_KIND["PrometheusRule"]["spec"], sort_keys=False))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    count = sum(len(group["rules"]) for group in BY_KIND["PrometheusRule"]["spec"]["groups"])

    checked = subprocess.run([PROMTOOL, "check", "rules", str(extracted)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {count} rules found" in checked.stdout

    tested = subprocess.run(
        [PROMTOOL, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name)], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# -- schemas -----------------------------------------------------------------------------------------


def test_kubernetes_resources_match_every_release_strictly() -> None:
    lines, ok = kubernetes_schema.validate_kubernetes(RESOURCES)
    assert ok, "\n".join(lines)
    assert len(lines) == 3 and all("(strict)" in line for line in lines)
    assert "1.37" in kubernetes_schema.kubernetes_versions()


def test_operator_resources_validate() -> None:
    lines, ok = kubernetes_schema.validate_operator(RESOURCES)
    assert ok, "\n".join(lines)
    assert lines == [
        "podmonitor.yaml: PodMonitor/my-app-pool-exporter: valid",
        "prometheusrule.yaml: PrometheusRule/sqlalchemy-pool: valid",
    ]


def test_operator_resources_have_no_unknown_fields() -> None:
    lines, ok = kubernetes_schema.typecheck_operator(RESOURCES)
    assert ok, "\n".join(lines)


def test_cli_prints_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert kubernetes_schema.main([]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK\n") == 3 and "FAILED" not in out


def _kind(kind: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    return lambda docs: next(d for d in docs if d["kind"] == kind)


def _container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    pod = _kind("Deployment")(docs)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


# Each breaks one resource in one place; the check named must say so.
MUTATIONS: dict[str, tuple[str, Callable[[list[dict[str, Any]]], None]]] = {
    "misspelled container field": ("kubernetes", lambda d: _container(d, "app").update(imagee="x")),
    "probe port as a list": (
        "kubernetes",
        lambda d: _container(d, "pool-exporter")["livenessProbe"]["httpGet"].update(port=["metrics"]),
    ),
    "misspelled pod security field": (
        "kubernetes",
        lambda d: _kind("Deployment")(d)["spec"]["template"]["spec"]["securityContext"].update(fsgroup=1),
    ),
    "service port as text": ("kubernetes", lambda d: _kind("Service")(d)["spec"]["ports"][0].update(port="x")),
    "configmap value not a string": ("kubernetes", lambda d: _kind("ConfigMap")(d)["data"].update(n=1)),
    "podmonitor without selector": ("validate", lambda d: _kind("PodMonitor")(d)["spec"].pop("selector")),
    "rule duration not a duration": (
        "validate",
        lambda d: _kind("PrometheusRule")(d)["spec"]["groups"][0]["rules"][0].update({"for": "5 minutes"}),
    ),
    "misspelled podmonitor field": (
        "tsc",
        lambda d: _kind("PodMonitor")(d)["spec"].update(podMetricEndpoints=[{"port": "metrics"}]),
    ),
    "misspelled endpoint field": (
        "tsc",
        lambda d: _kind("PodMonitor")(d)["spec"]["podMetricsEndpoints"][0].update(prot="metrics"),
    ),
    "misspelled rule field": (
        "tsc",
        lambda d: _kind("PrometheusRule")(d)["spec"]["groups"][0]["rules"][0].update(annotation={}),
    ),
}
CHECKS = {
    "kubernetes": kubernetes_schema.validate_kubernetes,
    "validate": kubernetes_schema.validate_operator,
    "tsc": kubernetes_schema.typecheck_operator,
}
PASSED = {"kubernetes": ": valid for Kubernetes", "validate": ": valid", "tsc": ": no field outside"}


@pytest.fixture(scope="module")
def broken() -> dict[str, list[str]]:
    """Each check run once over every mutation meant for it, each mutated resource named after its mutation."""
    lines: dict[str, list[str]] = {}
    for check, run in CHECKS.items():
        items = []
        for name, (target, mutate) in MUTATIONS.items():
            if target == check:
                docs = copy.deepcopy([r.doc for r in RESOURCES])
                before = copy.deepcopy(docs)
                mutate(docs)
                items += [kubernetes_schema.Resource(name, d) for d, b in zip(docs, before, strict=True) if d != b]
        lines[check], _ = run(items)
    return lines


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_manifest_fails(broken: dict[str, list[str]], name: str) -> None:
    check = MUTATIONS[name][0]
    about = [line for line in broken[check] if line.startswith(f"{name}: ")]
    assert about and not any(PASSED[check] in line for line in about), f"{name}: {check} let it through: {about}"


# -- wiring ------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_app_and_sidecar_share_the_multiprocess_directory() -> None:
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    assert volumes["multiproc"]["emptyDir"]["sizeLimit"]
    assert "medium" not in volumes["multiproc"]["emptyDir"]  # tmpfs would count against a memory limit
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in CONTAINERS.values()}
    path = mounts["app"]["multiproc"]
    # The same path in both: the sidecar recognises a worker in /proc by the directory it maps.
    assert mounts["pool-exporter"]["multiproc"] == path
    assert {"name": "PROMETHEUS_MULTIPROC_DIR", "value": path} in APP["env"]
    assert SIDECAR["args"] == ["serve", "--multiproc-dir", path]


def test_pid_namespace_is_not_shared() -> None:
    # docs/kubernetes.md: liveness marks only, so no container reads another's environment through /proc.
    assert POD["spec"]["shareProcessNamespace"] is False
    assert APP["securityContext"]["runAsUser"] != SIDECAR["securityContext"]["runAsUser"]


def test_sidecar_probes_and_port() -> None:
    assert SIDECAR["ports"] == [{"name": "metrics", "containerPort": DEFAULT_PORT}]
    assert SIDECAR["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert SIDECAR["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # A merge gives up at 5 s with a 503: the probe must wait longer than that to see the answer.
    assert SIDECAR["readinessProbe"]["timeoutSeconds"] > 5


def test_non_root_read_only_and_bounded() -> None:
    pod_security = POD["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["fsGroup"] > 0
    for container in CONTAINERS.values():
        security = container["securityContext"]
        assert security["runAsUser"] > 0 and security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_images_are_marked_placeholders() -> None:
    text = (DEPLOY / "deployment.yaml").read_text()
    for container in CONTAINERS.values():
        assert container["image"].startswith("registry.example.com/") and pinned(container["image"])
    assert text.count("REPLACE") >= 2
    assert SIDECAR["image"] == f"registry.example.com/sqlalchemy-pool-exporter:{__version__}"


def test_database_url_comes_from_a_secret() -> None:
    env = {e["name"]: e for e in SIDECAR["env"]}
    assert env["POOL_EXPORTER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert not any("postgres" in arg for arg in SIDECAR["args"])


def test_service_and_podmonitor_select_the_pods_and_the_sidecar_port() -> None:
    labels = POD["metadata"]["labels"]
    service, monitor = BY_KIND["Service"], BY_KIND["PodMonitor"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Only the sidecar is scraped: it serves every worker merged, the app's numbers would count twice.
    ports = {p["name"] for c in CONTAINERS.values() for p in c.get("ports", [])}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"] and ports == {"metrics"}
