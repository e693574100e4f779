"""docker-compose.yml, without starting it (no Docker daemon is needed):

1. what a site admin checks first: published ports listen on 127.0.0.1 unless LATHE_BIND_ADDRESS
   says otherwise; no secret has a default that works (each is `${VAR:?…}`); the worker gets
   neither the database URL nor the admin token; every service has a healthcheck; Prometheus
   keeps its data in a named volume and loads the alerting rules; every pulled image has an
   exact version tag;
2. `docker compose config` (or docker-compose v1) renders it, refuses it while a secret is
   missing, and binds the ports where LATHE_BIND_ADDRESS says. Skipped when neither tool is
   installed; the checks of 1. still run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from lathe_service import ROOT

COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SECRETS = {"LATHE_FLEET_SECRET", "LATHE_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
BIND = "${LATHE_BIND_ADDRESS:-127.0.0.1}"
# Settings that let a process act on the whole service: a worker must not hold them.
NOT_FOR_WORKERS = {"LATHE_DATABASE_URL", "LATHE_ADMIN_TOKEN", "LATHE_FLEET_SECRET"}
EXACT_TAG = re.compile(r":v?\d+\.\d+\.\d+$|@sha256:[0-9a-f]{64}$")
# Projects whose releases have two numbers (PostgreSQL 10 and later: 16.6 is one release).
TWO_PART_VERSIONS = {"postgres": re.compile(r":\d+\.\d+$")}


@pytest.fixture(autouse=True)
def clean_slate():
    """Replaces the suite's fixture of this name: nothing here needs a controller."""
    yield


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    found = compose()["services"]
    assert {"controller", "worker", "postgres", "redis", "prometheus", "grafana"} <= set(found), sorted(found)
    return found


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_published_ports_listen_on_localhost_unless_the_operator_says_otherwise():
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            published += 1
            assert isinstance(port, str) and port.startswith(f"{BIND}:"), \
                f"{name}: port {port!r} is published on every interface; write {BIND}:HOST:CONTAINER"
    assert published >= 4, "the controller, Prometheus and Grafana publish ports"


def test_no_secret_has_a_default_that_works():
    text = COMPOSE.read_text()
    assert "change-me" not in text.lower(), "a change-me default would work if nobody changed it"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert SECRETS <= required, f"secrets without ${{VAR:?…}}: {sorted(SECRETS - required)}"
    for var in SECRETS:
        assert not re.search(rf"\$\{{{var}:?-", text), f"{var} has a default"
    grafana = environment(services()["grafana"])
    assert grafana.get("GF_SECURITY_ADMIN_PASSWORD", "").startswith("${GRAFANA_ADMIN_PASSWORD:?"), \
        "Grafana keeps its admin/admin default"


def test_the_worker_enrols_with_the_fleet_secret_and_holds_nothing_more():
    worker, controller = environment(services()["worker"]), environment(services()["controller"])
    assert not NOT_FOR_WORKERS & set(worker), f"the worker gets {sorted(NOT_FOR_WORKERS & set(worker))}"
    assert worker["LATHE_WORKER_TOKEN"] == controller["LATHE_FLEET_SECRET"], \
        "the worker's token is not the controller's fleet secret"
    assert "LATHE_DATABASE_URL" in controller and "LATHE_ADMIN_TOKEN" in controller


def one_shot(name: str) -> bool:
    """A service that runs to completion, which others wait for (service_completed_successfully)."""
    return services()[name].get("restart") == "no" and any(
        (s.get("depends_on") or {}).get(name, {}).get("condition") == "service_completed_successfully"
        for s in services().values() if isinstance(s.get("depends_on"), dict))


def test_every_service_has_a_healthcheck_and_prometheus_a_volume_and_the_rules():
    for name, service in services().items():
        if one_shot(name):
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test != ["NONE"], f"{name} has no healthcheck"
    prometheus = services()["prometheus"]
    mounts = {}
    for volume in prometheus.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert mounts.get("/prometheus") in compose().get("volumes", {}), \
        "Prometheus' storage (/prometheus) is not a named volume: its series vanish with the container"
    config_dir = PurePosixPath("/etc/prometheus")
    assert mounts.get(str(config_dir / "prometheus.yml")) == "./deploy/prometheus/prometheus.yml"
    for rule_file in yaml.safe_load(PROMETHEUS_CONFIG.read_text()).get("rule_files", []):
        target = str(config_dir / rule_file)
        assert target in mounts, f"prometheus.yml loads {rule_file}, which is not mounted at {target}"
        assert (ROOT / mounts[target]).is_file(), mounts[target]


def test_every_pulled_image_has_an_exact_version():
    for name, service in services().items():
        if "build" in service:
            continue
        image = service["image"]
        two_part = TWO_PART_VERSIONS.get(image.split(":")[0])
        assert EXACT_TAG.search(image) or (two_part and two_part.search(image)), \
            f"{name}: image {image!r} floats; pin an exact version (name:X.Y.Z)"


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env_file = tmp_path / "empty.env"  # never the operator's .env
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "LATHE_BIND_ADDRESS"}
    return subprocess.run([*command, "--env-file", str(env_file), "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**clean, **env})


def test_docker_compose_renders_it_only_with_the_secrets_and_binds_where_told(tmp_path):
    secrets = {name: f"{name.lower()}-from-the-test" for name in SECRETS}
    missing = render(tmp_path, **{k: v for k, v in secrets.items() if k != "LATHE_ADMIN_TOKEN"})
    assert missing.returncode != 0 and "LATHE_ADMIN_TOKEN" in missing.stderr, missing.stdout + missing.stderr

    rendered = render(tmp_path, **secrets)
    assert rendered.returncode == 0, rendered.stderr
    config = yaml.safe_load(rendered.stdout)
    ports = [str(p) for s in config["services"].values() for p in s.get("ports", [])]
    assert ports and all("127.0.0.1" in p or p.startswith("{") for p in ports), ports
    assert environment(config["services"]["worker"])["LATHE_WORKER_TOKEN"] == secrets["LATHE_FLEET_SECRET"]

    opened = yaml.safe_load(render(tmp_path, LATHE_BIND_ADDRESS="0.0.0.0", **secrets).stdout)
    ports = [p for s in opened["services"].values() for p in s.get("ports", [])]
    assert all("127.0.0.1" not in str(p) for p in ports), ports
