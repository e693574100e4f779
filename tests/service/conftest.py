"""Fixtures for the service suite: the real `lathe controller` and `lathe worker` processes, driven
with the official `openai` SDK, on a local Postgres (user postgres: the suite's own server that
scripts/test.sh starts and names in LATHE_TEST_PG_PORT, else 127.0.0.1:5432) and Redis
(127.0.0.1:6379).

One controller and one worker serve the whole session, on a database `lathe_test_<hex>` that the
controller creates and the session drops at the end, and a Redis prefix of their own. Tests that
kill or stop the worker leave a live one behind (the `clean_slate` fixture makes sure), and every
test ends with no unfinished job, so the next one starts on an idle worker. On a failure the tails
of every process's log are added to the report; LATHE_TEST_KEEP=1 keeps the database and logs.

The binary is env LATHE_BIN, else target/release/lathe (built by scripts/setup.sh).
"""

from __future__ import annotations

import openai
import pytest

from lathe_service import (Service, cancel_unfinished_evaluations, cancel_unfinished_jobs, example_rows,
                           find_lathe_bin, make_client, require_postgres_and_redis, write_jsonl)

_RUNNING: list[Service] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "service: drives the real controller and workers on Postgres and Redis")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for service in _RUNNING:
            report.sections.append(("lathe process logs", service.log_tails()))
    return report


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    lathe_bin = find_lathe_bin()
    require_postgres_and_redis()
    svc = Service(lathe_bin, tmp_path_factory.mktemp("lathe-service"))
    _RUNNING.append(svc)
    try:
        svc.init_model()
        svc.start_controller()
        svc.start_worker()
        yield svc
    finally:
        svc.shutdown()
        _RUNNING.remove(svc)


@pytest.fixture(scope="session")
def api_key(service) -> str:
    return service.create_key("proj-a")


@pytest.fixture(scope="session")
def client(service, api_key) -> openai.OpenAI:
    return make_client(service, api_key)


@pytest.fixture(scope="session")
def api_key_b(service) -> str:
    return service.create_key("proj-b")


@pytest.fixture(scope="session")
def client_b(service, api_key_b) -> openai.OpenAI:
    return make_client(service, api_key_b)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory):
    """The first 24 rows of the CVE -> CWE sample (chat format): a few seconds of training."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", example_rows(24))


@pytest.fixture(scope="session")
def training_file_id(client, train_file) -> str:
    with open(train_file, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


@pytest.fixture(autouse=True)
def clean_slate(service, client, client_b, api_key, api_key_b):
    """Each test starts and ends with one live worker and no unfinished job or evaluation."""
    service.ensure_one_worker()
    yield
    cancel_unfinished_evaluations(service, [api_key, api_key_b])
    cancel_unfinished_jobs([client, client_b])
    service.ensure_one_worker()
