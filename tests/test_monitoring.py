"""deploy/monitoring/ and deploy/kubernetes/, checked with their ecosystems' own tools.

- `promtool check rules` and `promtool test rules` (Debian's `prometheus` package);
- every metric the dashboard and the alert rules name exists in a real relay's /metrics;
- every Kubernetes manifest validates offline against a pinned Kubernetes version
  (kubernetes-validate); the Prometheus Operator's CRDs, which it has no schema for, are
  checked structurally against the objects they select.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "monitoring"
KUBERNETES = REPO / "deploy" / "kubernetes"
RULES = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
MONITORS = MONITORING / "servicemonitor.yaml"
# The oldest Kubernetes the manifests promise to work on: native sidecars (an init container
# with restartPolicy: Always, sidecar.yaml) are on by default from 1.29.
KUBERNETES_VERSION = "1.30.0"
METRIC = re.compile(r"\brelay_[a-z0-9_]+\b")
ALERTS = ("InfobipRelayUpstreamDown", "InfobipRelayUpstreamAuthFailing",
          "InfobipRelayOldestMessageStuck", "InfobipRelayFailedMessages",
          "InfobipRelaySpoolNotWritable", "InfobipRelayRestartingOften",
          "InfobipRelayQueueGrowing", "InfobipRelayUpstreamThrottled",
          "InfobipRelayReportsPullFailing", "InfobipRelayUpstreamProcessCrashed")


# --------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True,
                            timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_check_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", RULES.name)
    assert "SUCCESS" in output


def test_promtool_test_rules(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", RULE_TESTS.name)
    assert "SUCCESS" in output


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"]
              if "alert" in rule]
    assert sorted(alerts) == sorted(ALERTS)
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired == set(ALERTS)
    assert silent == set(ALERTS)
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# --------------------------------------------------------------------------- metric names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [target["expr"] for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    queries += [item["expr"] for item in dashboard["annotations"]["list"] if "expr" in item]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]
                if "definition" in variable]
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exposed_names(text: str) -> set[str]:
    """Every series name /metrics can carry, including families that have no child yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count",
                                                              "created")}
        names |= {sample.name for sample in family.samples}
    return names


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def test_dashboard_and_rules_use_only_metrics_the_relay_exports(start_relay, fake_upstream
                                                                ) -> None:
    relay = start_relay(fake_upstream)
    exposed = exposed_names(fetch(f"http://127.0.0.1:{relay.server.metrics_port}/metrics"))
    used = {name for query in dashboard_queries() + rule_queries()
            for name in METRIC.findall(query)}
    assert len(used) > 20, used
    missing = sorted(used - exposed)
    assert not missing, f"queries name metrics that /metrics does not have: {missing}"
    # The names the alerts depend on, explicitly.
    for name in ("relay_upstream_up", "relay_upstream_auth_ok", "relay_spool_writable",
                 "relay_start_time_seconds", "relay_queue_oldest_age_seconds",
                 "relay_delivery_attempts_total", "relay_queue_messages"):
        assert name in used and name in exposed


def test_spool_writable_and_ready_follow_the_readiness_check(start_relay, fake_upstream) -> None:
    """relay_spool_writable is read from the readiness reason: the two must stay in step."""
    relay = start_relay(fake_upstream)
    url = f"http://127.0.0.1:{relay.server.metrics_port}/metrics"

    def value(name: str) -> float:
        for family in text_string_to_metric_families(fetch(url)):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        raise AssertionError(f"{name} not in /metrics")

    assert value("relay_spool_writable") == 1
    assert value("relay_build_info") == 1
    assert value("relay_start_time_seconds") > 1.7e9
    spool = relay.server.spool

    async def refuse() -> bool:
        return False

    spool.check_writable = refuse
    assert value("relay_spool_writable") == 0
    assert value("relay_ready") == 0


def test_dashboard_panels_cover_the_operator_questions() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for topic in ("acceptance rate", "250 / 4xx / 5xx", "delivery outcomes", "queue depth",
                  "oldest", "send latency", "upstream health and auth", "connections",
                  "rule matches", "bytes in and out"):
        assert topic in titles, topic
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


# --------------------------------------------------------------------------- Kubernetes


def documents(path: Path) -> Iterator[dict[str, Any]]:
    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if document:
            yield document


MANIFESTS = [(path, doc) for path in [*sorted(KUBERNETES.glob("*.yaml")), MONITORS]
             for doc in documents(path)]


@pytest.mark.parametrize(
    ("path", "document"),
    [pytest.param(p, d, id=f"{p.name}:{d['kind']}/{d['metadata']['name']}") for p, d in MANIFESTS
     if not d["apiVersion"].startswith("monitoring.coreos.com/")])
def test_manifest_validates_against_kubernetes_schema(path: Path, document: dict[str, Any]
                                                      ) -> None:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.name}: {document['kind']}/{document['metadata']['name']}: "
                    f"{exc.message} at {'.'.join(map(str, exc.path))}")


def test_every_kubernetes_manifest_is_checked() -> None:
    kinds = {(p.name, d["kind"]) for p, d in MANIFESTS}
    assert {("gateway.yaml", "StatefulSet"), ("gateway.yaml", "Service"),
            ("sidecar.yaml", "Deployment"), ("servicemonitor.yaml", "ServiceMonitor"),
            ("servicemonitor.yaml", "PodMonitor")} <= kinds


def _selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def _container_ports(pod_spec: dict[str, Any]) -> set[str]:
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    return {port["name"] for c in containers for port in c.get("ports", []) if "name" in port}


def test_service_monitor_selects_the_gateway_metrics_port() -> None:
    monitor = next(d for d in documents(MONITORS) if d["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    services = [d for d in documents(KUBERNETES / "gateway.yaml") if d["kind"] == "Service"
                and _selected(monitor["spec"]["selector"], d["metadata"].get("labels", {}))]
    assert services, "the ServiceMonitor selects no Service of gateway.yaml"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        scraped = [s for s in services
                   if endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]}]
        assert scraped, f"no selected Service has a port named {endpoint['port']}"
    # ...and that port reaches the relay's metrics container port.
    statefulset = next(d for d in documents(KUBERNETES / "gateway.yaml")
                       if d["kind"] == "StatefulSet")
    assert "metrics" in _container_ports(statefulset["spec"]["template"]["spec"])


def test_pod_monitor_selects_the_sidecar_pods() -> None:
    monitor = next(d for d in documents(MONITORS) if d["kind"] == "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    deployment = next(d for d in documents(KUBERNETES / "sidecar.yaml")
                      if d["kind"] == "Deployment")
    template = deployment["spec"]["template"]
    assert _selected(monitor["spec"]["selector"], template["metadata"]["labels"])
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in _container_ports(template["spec"])
        assert endpoint["path"] == "/metrics"
