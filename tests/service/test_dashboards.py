"""The Grafana dashboard (deploy/grafana/dashboards/lathe.json) against `lathe up` running a job
(issue 10): every metric name a Prometheus panel queries is in the /metrics text `lathe up`
serves (its workers' included), and every Postgres panel's SQL and every annotation's returns
rows for that job, run as the read-only role Grafana signs in as
(deploy/grafana/postgres-readonly.sql), which cannot read keys or token hashes.

Without a service: the dashboard names no datasource by a fixed uid (each panel, query and
annotation uses the DS_PROMETHEUS or DS_POSTGRES variable, declared in `__inputs` for import),
`$pool` and `$worker` filter every panel whose metric carries those labels, rate() and
increase() take `$__rate_interval`, and every PromQL query parses (promtool).

`lathe up` runs here on a database and Redis prefix of its own; the job has a validation file,
so validation loss is reported live too, and an evaluation runs so the evaluations panels have
data. Metric names are collected over the job's life (some exist only while it runs, the
attempt counter only once it ended)."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from lathe_service import (CTIBENCH, LONG_EPOCHS, MODEL, PG_HOST, PG_PORT, PG_USER, Process, Service,
                           example_rows, preference_rows, find_lathe_bin, make_client, require_postgres_and_redis,
                           wait_for_status, wait_until, write_jsonl)

pytestmark = pytest.mark.service

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "lathe.json"
GRAFANA_ROLE_SQL = DASHBOARD.parents[1] / "postgres-readonly.sql"
DATASOURCE_VARIABLES = {"DS_PROMETHEUS": "prometheus", "DS_POSTGRES": "grafana-postgresql-datasource"}
# Grafana's own annotation source, the one uid a dashboard may name.
BUILT_IN_DATASOURCE = "-- Grafana --"
# Labels the panel variables filter on, and the metrics that carry them.
LABEL_VARIABLES = {
    "pool": {"lathe_queue_depth", "lathe_pool_demand", "lathe_pool_workers", "lathe_pool_gpu_memory_asked_gb"},
    "worker": {"lathe_worker_busy", "lathe_worker_memory_bytes", "lathe_worker_attempts_total", "lathe_worker_step",
               "lathe_worker_train_loss", "lathe_worker_validation_loss", "lathe_worker_tokens_per_second"},
}


@pytest.fixture(autouse=True)
def clean_slate():
    """Overrides the suite's fixture: this module runs `lathe up`, not the session's service."""
    yield


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    require_postgres_and_redis()
    svc = Service(find_lathe_bin(), tmp_path_factory.mktemp("lathe-up"))
    try:
        svc.init_model()
        svc.controller = Process("lathe-up", [
            str(svc.bin), "up", "--http-listen", f"127.0.0.1:{svc.http_port}", "--grpc-listen", f"127.0.0.1:{svc.grpc_port}",
            "--data-dir", str(svc.data_dir), "--models-root", str(svc.models_root), "--eval-data-dir", str(CTIBENCH),
            "--workers", "1", "--device", "cpu", "--threads", "1", "--checkpoint-every", "2",
            "--reconcile-seconds", "1", "--heartbeat-seconds", "1", "--admin-token", svc.admin_token,
        ], svc.env, svc.workdir, svc.log_dir)
        wait_until(lambda: svc.controller.alive() and _ready(svc), 90, lambda: f"lathe up never got ready\n{svc.controller.tail()}")
        yield svc
    finally:
        svc.shutdown()


def _ready(svc) -> bool:
    try:
        return svc.request("GET", "/readyz", timeout=2).status == 200
    except OSError:
        return False


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p.get("type") != "row"]


def annotation_queries() -> list[tuple[str, str]]:
    """(name, SQL) of the dashboard's Postgres annotations."""
    return [(a["name"], a["target"]["rawSql"]) for a in dashboard()["annotations"]["list"]
            if a.get("target", {}).get("rawSql")]


def all_datasource_refs(node, where: str = "") -> list[tuple[str, object]]:
    """Every `datasource` value anywhere in the dashboard, with where it is."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append((where, value))
            found += all_datasource_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            title = item.get("title") or item.get("name") if isinstance(item, dict) else None
            found += all_datasource_refs(item, f"{where}[{title or i}]")
    return found


def prometheus_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard_panels()
            for target in panel.get("targets", []) if target.get("expr")]


def test_every_datasource_is_a_variable_and_none_a_fixed_uid():
    board = dashboard()
    problems = []
    for where, ref in all_datasource_refs(board):
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        if uid == BUILT_IN_DATASOURCE:
            continue
        variable = re.fullmatch(r"\$\{(\w+)\}", str(uid))
        if not variable or variable.group(1) not in DATASOURCE_VARIABLES:
            problems.append(f"{where}: datasource {ref!r} is not one of ${{DS_PROMETHEUS}}, ${{DS_POSTGRES}}")
        elif isinstance(ref, dict) and ref.get("type") != DATASOURCE_VARIABLES[variable.group(1)]:
            problems.append(f"{where}: type {ref.get('type')!r} with ${{{variable.group(1)}}}")
    for panel in dashboard_panels():
        if not isinstance(panel.get("datasource"), dict):
            problems.append(f"panel {panel['title']!r} has no datasource of its own")
    assert not problems, "\n".join(problems)

    variables = {v["name"]: v for v in board["templating"]["list"]}
    inputs = {i["name"]: i for i in board.get("__inputs", [])}
    for name, plugin in DATASOURCE_VARIABLES.items():
        assert variables.get(name, {}).get("type") == "datasource" and variables[name]["query"] == plugin, \
            f"no datasource variable {name} of type {plugin}"
        assert not variables[name].get("current"), f"{name} pins a datasource in `current`"
        assert inputs.get(name, {}).get("pluginId") == plugin, f"__inputs lacks {name} ({plugin}) for import"
    # Only the variables resolve datasources; the provisioned uids must not leak back in.
    assert not re.search(r"lathe-(prometheus|postgres)", DASHBOARD.read_text())


def test_pool_and_worker_variables_filter_every_panel_whose_metric_has_the_label():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    problems = []
    for label, metrics in LABEL_VARIABLES.items():
        variable = variables.get(label)
        assert variable and variable["type"] == "query" and variable.get("includeAll") and variable.get("multi"), \
            f"no multi-value ${label} variable with All"
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
        definition = variable.get("definition", "")
        assert re.fullmatch(rf"label_values\((lathe_\w+), {label}\)", definition) and \
            definition.split("(")[1].split(",")[0] in metrics, f"${label} is filled from {definition!r}"
        for title, expr in prometheus_queries():
            for metric in set(re.findall(r"\b(lathe_[a-z_]+)\b(\{[^}]*\})?", expr)):
                name, selector = metric
                if name in metrics and f'{label}=~"${label}"' not in selector:
                    problems.append(f"panel {title!r}: {name} is not filtered by {label}=~\"${label}\": {expr}")
    assert not problems, "\n".join(problems)


def test_rates_use_the_rate_interval_and_every_query_parses(tmp_path):
    fixed = [(title, expr) for title, expr in prometheus_queries()
             if re.search(r"\b(rate|irate|increase)\([^\[]*\[(?!\$__rate_interval\])", expr)]
    assert not fixed, f"rate()/increase() over a fixed window (use $__rate_interval): {fixed}"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("`promtool` is not installed: scripts/test.sh installs it (scripts/lib/promtool.sh)", pytrace=False)
    # promtool parses PromQL when it checks rules: each query as a recording rule, with the
    # dashboard's variables replaced by what Grafana would send.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"panel_{i}", "expr": expr.replace("$__rate_interval", "1m").replace("$pool", ".*").replace("$worker", ".*")}
        for i, (_, expr) in enumerate(prometheus_queries())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(prometheus_queries())} rules found" in checked.stdout, checked.stdout


def prometheus_metric_names() -> set[str]:
    names = set()
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            names |= set(re.findall(r"\blathe_[a-z_]+\b", target.get("expr") or ""))
    return names


def sampled_names(text: str) -> set[str]:
    """Names with at least one sample line (not NaN) in an OpenMetrics text."""
    return {m.group(1) for m in re.finditer(r"^(lathe_[a-z_]+)(?:\{[^}]*\})? (\S+)", text, re.M) if m.group(2) != "NaN"}


def test_every_dashboard_query_has_data_against_lathe_up_running_a_job(up, tmp_path):
    key = up.create_key("dashboards")
    client = make_client(up, key)
    # A DPO job: it feeds every panel a supervised job feeds, and the reward margin panel too.
    with open(write_jsonl(tmp_path / "train.jsonl", preference_rows(example_rows(24))), "rb") as f:
        training = client.files.create(file=f, purpose="fine-tune").id
    with open(write_jsonl(tmp_path / "valid.jsonl", preference_rows(example_rows(34)[24:])), "rb") as f:
        validation = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=training, validation_file=validation, seed=0,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": LONG_EPOCHS, "batch_size": 4}}},
        extra_body={"learning_rate": 5e-3, "max_seq_length": 256})
    evaluation = up.request("POST", "/v1/evaluations", key=key,
                            json_body={"model": MODEL, "benchmark": "cti-mcq", "limit": 2, "max_new_tokens": 4})
    assert evaluation.status == 200, evaluation.body[:500]

    wanted = prometheus_metric_names()
    assert {"lathe_pool_demand", "lathe_job_validation_loss", "lathe_worker_busy", "lathe_job_reward_margin"} <= wanted, wanted
    seen: set[str] = set()

    def scraped_everything():
        seen.update(sampled_names(up.request("GET", "/metrics").body.decode()))
        status = client.fine_tuning.jobs.retrieve(job.id).status
        assert status not in {"failed", "cancelled"}, status
        return status == "succeeded" and wanted <= seen

    wait_until(scraped_everything, 300, lambda: f"never scraped: {sorted(wanted - seen)}", interval=0.3)

    # Everything below runs as the role Grafana signs in as, made by the file operators run.
    role = f"lathe_grafana_test_{secrets.token_hex(4)}"
    made = subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", up.db_name,
                           "-v", "ON_ERROR_STOP=1", "-v", f"grafana_role={role}", "-f", str(GRAFANA_ROLE_SQL)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    try:
        def as_grafana(sql: str) -> list:
            return up.psql(f"SET ROLE {role}; {sql}")

        for panel in dashboard_panels():
            for target in panel.get("targets", []):
                sql = target.get("rawSql")
                if sql:
                    rows = as_grafana(sql.replace("$job_id", job.id))
                    assert rows, f"panel {panel['title']!r}: its SQL returned no row for job {job.id}"
        (variable,) = [v["query"] for v in dashboard()["templating"]["list"] if v["name"] == "job_id"]
        assert [job.id] in as_grafana(variable)

        # Annotations: Grafana expands $__timeFilter(column) to the range shown; the last hour here.
        marked = set()
        for name, sql in annotation_queries():
            rows = as_grafana(re.sub(r"\$__timeFilter\(([\w.]+)\)", r"\1 > now() - interval '1 hour'", sql))
            if any(job.id in " ".join(map(str, row)) for row in rows):
                marked.add(name)
        assert {"Job started", "Job succeeded"} <= marked, f"annotations that show job {job.id}: {sorted(marked)}"

        # What the role must not see or do, whatever SQL a viewer sends.
        for forbidden in ("SELECT key_hash FROM api_keys", "SELECT token_hash FROM workers", "SELECT id FROM files",
                          f"UPDATE jobs SET suffix = 'x' WHERE id = '{job.id}'"):
            refused = subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", up.db_name,
                                      "-v", "ON_ERROR_STOP=1", "-c", f"SET ROLE {role}; {forbidden}"],
                                     capture_output=True, text=True, timeout=60)
            assert refused.returncode != 0 and "permission denied" in refused.stderr, \
                f"the Grafana role may run {forbidden!r}: {refused.stdout}{refused.stderr}"
    finally:
        up.psql(f"DROP OWNED BY {role}; DROP ROLE {role}")
