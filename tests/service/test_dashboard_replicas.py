"""The dashboard's system-wide panels read the same with three controller replicas as with one.

Every replica exports the gauges that mirror Postgres and Redis (jobs and evaluations by status,
workers by state, queue depth, demand and live workers per pool), so a panel that sums over
replicas reads three times too much. Three controllers run on the session's database with jobs
queued in a pool no worker serves; each one's /metrics is scraped once the three agree, and
promtool evaluates every panel query over the three scrapes (as Prometheus would, each replica
its own `instance`) against what the same query answers over one replica's scrape.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict

import pytest
import yaml

from lathe_service import ROOT, Service, create_job, find_lathe_bin, make_client, wait_for_status, wait_until

pytestmark = pytest.mark.service

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lathe.json"
POOL = "dashboard-replicas"
QUEUED = 3
# The gauges every replica exports alike.
SYSTEM_GAUGES = {"lathe_jobs", "lathe_evaluations", "lathe_workers", "lathe_queue_depth", "lathe_pool_demand",
                 "lathe_pool_workers"}
SAMPLE = re.compile(r"^(lathe_[a-z_]+)(?:\{([^}]*)\})? (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# `agg by (labels) (metric{matchers})`: the shape of every system-wide panel query.
AGGREGATION = re.compile(r"^(sum|max|min|avg) by \(([\w, ]+)\) \((lathe_[a-z_]+)(?:\{([^}]*)\})?\)$")


def system_samples(text: str) -> dict[tuple, float]:
    """(metric, sorted labels) -> value, for the system-wide gauges of one /metrics text."""
    found = {}
    for name, labels, value in SAMPLE.findall(text):
        if name in SYSTEM_GAUGES:
            found[(name, tuple(sorted(LABEL.findall(labels or ""))))] = float(value)
    return found


def panel_queries() -> list[tuple[str, str]]:
    """(title, expr) of the panels that read the system-wide gauges, with $pool as All."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target.get("expr") or ""
            if set(re.findall(r"\blathe_[a-z_]+\b", expr)) & SYSTEM_GAUGES:
                queries.append((panel["title"], expr.replace("$pool", ".*")))
    return queries


def one_replica_answer(expr: str, samples: dict[tuple, float]) -> dict[tuple, float]:
    """What `expr` answers over a single replica's samples (each series once)."""
    match = AGGREGATION.match(expr)
    assert match, f"{expr!r} is not `agg by (labels) (metric{{…}})`; this test reads no other shape"
    agg, by, metric, matchers = match.groups()
    by = [label.strip() for label in by.split(",")]
    for key, pattern in re.findall(r'(\w+)=~"([^"]*)"', matchers or ""):
        assert pattern == ".*", f"{expr!r}: only matchers that select everything are evaluated here"
    groups = defaultdict(list)
    for (name, labels), value in samples.items():
        if name == metric:
            groups[tuple((k, v) for k, v in labels if k in by)].append(value)
    reduce = {"sum": sum, "max": max, "min": min, "avg": lambda v: sum(v) / len(v)}[agg]
    return {labels: reduce(values) for labels, values in groups.items()}


def replica(service: Service, tmp_path_factory, name: str) -> Service:
    """Another controller on the session's database, Redis prefix and data directory."""
    other = Service(find_lathe_bin(), tmp_path_factory.mktemp(name))
    other.env = dict(service.env)
    other.data_dir, other.models_root = service.data_dir, service.models_root
    other.start_controller()
    return other


def test_system_panels_read_the_same_with_three_replicas_as_with_one(service, api_key, training_file_id,
                                                                        tmp_path_factory, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("`promtool` is not installed: scripts/test.sh installs it (scripts/lib/promtool.sh)", pytrace=False)
    replicas = [replica(service, tmp_path_factory, f"dashboard-replica-{i}") for i in (1, 2)]
    controllers = [service, *replicas]
    client = make_client(service, api_key)
    jobs = [create_job(client, training_file_id, pool=POOL, suffix=f"replicas-{i}") for i in range(QUEUED)]
    try:
        scrapes: list[dict] = []

        def agreed() -> bool:
            scrapes[:] = [system_samples(c.request("GET", "/metrics").body.decode()) for c in controllers]
            demand = scrapes[0].get(("lathe_pool_demand", (("pool", POOL),)))
            # A replica keeps exporting, at 0, every pool it has seen since it started (so a
            # scaler sees the fall); a younger replica has not seen them. Zeros read the same
            # under max, so only the series with a value must agree.
            counted = [{key: value for key, value in s.items() if value != 0} for s in scrapes]
            return demand == QUEUED and all(c == counted[0] for c in counted)

        wait_until(agreed, 30, lambda: f"the replicas' gauges never agreed on {QUEUED} queued in {POOL}: {scrapes}")

        series = []
        for i, samples in enumerate(scrapes):
            for (name, labels), value in sorted(samples.items()):
                text = ", ".join([f'instance="replica-{i}"', 'job="lathe-controller"',
                                  *(f'{k}="{v}"' for k, v in labels)])
                series.append({"series": f"{name}{{{text}}}", "values": f"{value:g}x5"})
        tests = []
        for title, expr in panel_queries():
            expected = one_replica_answer(expr, scrapes[0])
            tests.append({"expr": expr, "eval_time": "2m", "exp_samples": [
                {"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}", "value": value}
                for labels, value in sorted(expected.items())]})
        assert len(tests) >= 5, f"only {len(tests)} system-wide panels found: {panel_queries()}"
        assert any(t["exp_samples"] for t in tests)
        spec = tmp_path / "replicas.test.yml"
        spec.write_text(yaml.safe_dump({"evaluation_interval": "1m", "tests": [
            {"interval": "1m", "input_series": series, "promql_expr_test": tests}]}, sort_keys=False))
        result = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, \
            f"a panel reads otherwise with three replicas than with one:\n{result.stdout}{result.stderr}\n" \
            f"{json.dumps([t['expr'] for t in tests], indent=1)}"
    finally:
        for job in jobs:
            client.fine_tuning.jobs.cancel(job.id)
        for job in jobs:
            wait_for_status(client, job.id, "cancelled", timeout=30)
        for other in replicas:
            other.controller.stop()
