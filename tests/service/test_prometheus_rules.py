"""The alerting rules in deploy/prometheus/rules.yml, without a running Prometheus.

1. `promtool check rules` accepts them and `promtool check config` accepts the compose stack's
   prometheus.yml, which loads them (rule_files).
2. `promtool test rules` runs tests/deploy/prometheus-rules.test.yml: each alert fires on the
   series that mean trouble, after its `for:`, once for several controller replicas, and stays
   silent on a healthy system.
3. What promtool cannot see: every metric a rule reads is one Lathe registers (a misspelt name
   would make the alert silent forever), every scrape job a rule names is one that the scrape
   configurations define, and every alert has a severity, a summary, a description and a
   runbook_url whose anchor is a heading of docs/operations.md.

promtool comes from Debian's `prometheus` package; scripts/test.sh installs it
(scripts/lib/promtool.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from lathe_service import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "tests" / "deploy" / "prometheus-rules.test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S_SCRAPE = ROOT / "deploy" / "k8s" / "prometheus-scrape.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
TELEMETRY_SOURCES = [ROOT / "services" / "controller" / "src" / "telemetry.rs",
                     ROOT / "services" / "worker" / "src" / "telemetry.rs"]
SEVERITIES = {"critical", "warning"}
# What the text format appends to a family's name (counters: _total; histograms: the rest).
SAMPLE_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


@pytest.fixture(autouse=True)
def clean_slate():
    """Replaces the suite's fixture of this name: nothing here needs a controller."""
    yield


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("`promtool` is not installed: scripts/test.sh installs it (scripts/lib/promtool.sh), "
                    "or apt-get install prometheus", pytrace=False)
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def alerting_rules() -> list[dict]:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    alerts = [rule for rule in rules if "alert" in rule]
    assert alerts, f"no alerting rule in {RULES.relative_to(ROOT)}"
    return alerts


def registered_families() -> set[str]:
    """Metric families the controller and the worker register (`registry.register("name", …)`)."""
    names = set()
    for source in TELEMETRY_SOURCES:
        names |= set(re.findall(r'registry\.register\(\s*"(lathe_[a-z_]+)"', source.read_text()))
    assert {"lathe_jobs", "lathe_worker_busy"} <= names, f"the telemetry sources changed shape: {sorted(names)}"
    return names


def family_of(sample_name: str, families: set[str]) -> str | None:
    if sample_name in families:
        return sample_name
    for suffix in SAMPLE_SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return None


def scrape_job_names() -> set[str]:
    compose = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    (k8s_text,) = yaml.safe_load(K8S_SCRAPE.read_text())["data"].values()
    k8s = {job["job_name"] for job in yaml.safe_load(k8s_text)["scrape_configs"]}
    assert compose == k8s, f"compose and Kubernetes name their scrape jobs differently: {compose} vs {k8s}"
    return compose


def operations_anchors() -> set[str]:
    """GitHub-style anchors of the headings in docs/operations.md."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", OPERATIONS.read_text(), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_promtool_accepts_the_rules_and_the_config_that_loads_them():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerting_rules())} rules found" in checked.stdout, checked.stdout

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert RULES.name in config.get("rule_files", []), f"{PROMETHEUS_CONFIG.relative_to(ROOT)} does not load {RULES.name}"
    # check config also finds and checks every rule file the config names, relative to it.
    checked = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"Checking {RULES}" in checked.stdout, checked.stdout


def test_every_alert_fires_when_it_should_and_only_then():
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = set(re.findall(r"alertname:\s*(\w+)", RULE_TESTS.read_text()))
    missing = {rule["alert"] for rule in alerting_rules()} - covered
    assert not missing, f"alerts without a unit test in {RULE_TESTS.relative_to(ROOT)}: {sorted(missing)}"


def test_every_rule_reads_metrics_lathe_exports_and_jobs_that_are_scraped():
    families, jobs = registered_families(), scrape_job_names()
    problems = []
    for rule in alerting_rules():
        expr = rule["expr"]
        for name in set(re.findall(r"\blathe_[a-z_]+\b", expr)):
            if family_of(name, families) is None:
                problems.append(f"{rule['alert']}: {name} is not a metric Lathe registers")
        for job in set(re.findall(r'\bjob\s*=\s*"([^"]+)"', expr)):
            if job not in jobs:
                problems.append(f"{rule['alert']}: job {job!r} is not a scrape job of {sorted(jobs)}")
    assert not problems, "\n".join(problems)


def test_every_alert_has_a_severity_a_wait_and_a_runbook_in_the_docs():
    anchors, problems = operations_anchors(), []
    for rule in alerting_rules():
        name, annotations = rule["alert"], rule.get("annotations", {})
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity {rule.get('labels', {}).get('severity')!r} is not one of {sorted(SEVERITIES)}")
        if "for" not in rule:
            problems.append(f"{name}: no `for:` (one bad scrape would page)")
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                problems.append(f"{name}: no {key} annotation")
        path, _, anchor = annotations.get("runbook_url", "").partition("#")
        if path != "docs/operations.md" or anchor != name.lower() or anchor not in anchors:
            problems.append(f"{name}: runbook_url {annotations.get('runbook_url')!r} should be "
                            f"docs/operations.md#{name.lower()}, a heading `### {name}` there")
    assert not problems, "\n".join(problems)
