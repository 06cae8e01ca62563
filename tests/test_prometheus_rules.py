"""deploy/prometheus-rules.yaml: valid for the real `promtool`, each alert proven by `promtool test rules` cases
(tests/prometheus/rules_test.yaml) to fire where it should and stay quiet where it should not, and every metric it
names exported by a real daemon's /metrics."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import DaemonProcess, wait_for, write_config
from tests.support.etcd_server import EtcdServer
from tests.support.ports import free_port
from tests.support.tools import required_tool

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus-rules.yaml"
RULES_TEST = REPO / "tests" / "prometheus" / "rules_test.yaml"

# Made by Prometheus itself, not by the daemon.
PROMETHEUS_MADE = {"up"}


def promtool() -> Path:
    return required_tool(
        "promtool",
        override_env="FORK_SIDECAR_PROMTOOL",
        require_env="FORK_SIDECAR_REQUIRE_PROMTOOL",
        install_hint="install Prometheus' promtool (`apt-get install prometheus` on Debian/Ubuntu)",
    )


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_rule_tests_pass() -> None:
    result = _promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    # The cases are only worth something if a wrong rule fails them: drop the clause that keeps the per-node alert
    # quiet while no node reaches etcd, and the "no node reaches etcd" case must fail.
    broken = RULES.read_text().replace(
        'unless on (job) (max by (job) (fork_sidecar_coordination_up{backend="etcd"}) == 0)', ""
    )
    assert broken != RULES.read_text()
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "prometheus-rules.yaml").write_text(broken)
    (tmp_path / "tests" / "prometheus").mkdir(parents=True)
    cases = tmp_path / "tests" / "prometheus" / "rules_test.yaml"
    cases.write_text(RULES_TEST.read_text())
    result = _promtool("test", "rules", cases)
    assert result.returncode != 0
    assert "ForkSidecarNodeLostCoordination" in result.stdout + result.stderr


def test_every_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    fired = {check["alertname"] for check in checks if check.get("exp_alerts")}
    quiet = {check["alertname"] for check in checks if not check.get("exp_alerts")}
    assert alerts - fired == set(), "alerts no case expects to fire"
    assert alerts - quiet == set(), "alerts no case expects to stay quiet"
    records = {rule["record"] for rule in _rules() if "record" in rule}
    tested = {expr["expr"] for case in cases for expr in case.get("promql_expr_test", [])}
    assert records <= tested, "recording rules no case evaluates"


def _referenced_metrics() -> set[str]:
    # The daemon's names all start with fork_sidecar_ (recording rules with "fork_sidecar:"); `up` is Prometheus'.
    names: set[str] = set()
    for rule in _rules():
        names |= set(re.findall(r"\bfork_sidecar_[a-z0-9_]+", rule["expr"]))
        names |= set(re.findall(r"\bup(?=\{)", rule["expr"]))
    return names


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


# The series names each metric type yields; a labelled metric none of whose label values occurred yet is exported as
# its HELP/TYPE lines only, so names come from the families, not only from the samples present.
_SERIES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def _exported_names(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in _SERIES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def test_exported_names_include_labelled_metrics_without_samples() -> None:
    exposition = (
        "# HELP fork_sidecar_x_total X.\n# TYPE fork_sidecar_x_total counter\n"
        "# HELP fork_sidecar_h H.\n# TYPE fork_sidecar_h histogram\n"
    )
    assert _exported_names(exposition) == {
        "fork_sidecar_x_total",
        "fork_sidecar_h_bucket",
        "fork_sidecar_h_sum",
        "fork_sidecar_h_count",
    }


def _label_matchers() -> set[tuple[str, str, str]]:
    """(metric, label, value) for every `fork_sidecar_...{label="value"}` the rules select on."""
    found: set[tuple[str, str, str]] = set()
    for rule in _rules():
        for name, matchers in re.findall(r"\b(fork_sidecar_[a-z0-9_]+)\{([^}]*)\}", rule["expr"]):
            found |= {(name, label, value) for label, value in re.findall(r'(\w+)="([^"]*)"', matchers)}
    return found


@pytest.mark.timeout(120)
def test_every_metric_the_rules_name_is_one_the_daemon_exports(tmp_path: Path, etcd_server: EtcdServer) -> None:
    # A daemon with the etcd backend, so the label values the coordination rules select on exist too.
    referenced = _referenced_metrics()
    assert {"fork_sidecar_forks_total", "fork_sidecar_coordination_up", "up"} <= referenced  # the parser finds names
    (tmp_path / "art").mkdir()
    port = free_port()
    config = write_config(
        tmp_path / "config.yaml",
        [tmp_path / "art"],
        tmp_path / "state",
        tmp_path / "run",
        metrics={"listen": f"127.0.0.1:{port}"},
        node={"name": "rules-check"},
        coordination={"backend": "etcd", "etcd": {"endpoints": etcd_server.endpoints}},
    )
    with DaemonProcess(config, tmp_path / "daemon.log"):
        text = wait_for(
            lambda: (t := _scrape(port)) and 'fork_sidecar_coordination_up{backend="etcd"} 1.0' in t and t,
            30,
            "the daemon's /metrics with etcd up",
        )
    exported = _exported_names(text)
    samples = {
        (sample.name, label, value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for label, value in sample.labels.items()
    }

    assert referenced - exported - PROMETHEUS_MADE == set(), "rules name metrics the daemon does not export"
    assert _label_matchers() - samples == set(), "rules select label values the daemon does not export"
