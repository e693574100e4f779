"""The API's promises at its edges: idempotent creates under concurrency, projects that cannot see
each other, keys that stop working when revoked, and bad input refused with a clear error and
nothing stored."""

from __future__ import annotations

import json
import random
import re
import secrets
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lathe_service import (JOB_EXTENSIONS, MODEL, PARKED_POOL, UPLOAD_LIMIT_BYTES, create_job, error_body,
                           example_rows, list_all, make_client, post_large_upload, sql_literal, wait_until)

pytestmark = pytest.mark.service


def job_ids(client) -> set[str]:
    return {j.id for j in list_all(client.fine_tuning.jobs.list(limit=100))}


def file_ids(client) -> set[str]:
    return {f.id for f in list_all(client.files.list())}


def assert_error_envelope(resp, status: int) -> dict:
    assert resp.status == status, f"expected {status}, got {resp.status}: {resp.body[:300]!r}"
    error = resp.json().get("error")
    assert isinstance(error, dict), f"no error envelope: {resp.body[:300]!r}"
    assert {"message", "type", "param", "code"} <= set(error), f"error envelope lacks fields: {error}"
    assert isinstance(error["message"], str) and error["message"], error
    return error


# ---------------------------------------------------------------------------------------------
# idempotency under concurrency


def test_200_concurrent_creates_make_exactly_one_job_per_idempotency_key(service, client, training_file_id):
    run = secrets.token_hex(4)
    keys = [f"idem-{run}-{i:02d}" for i in range(50)]
    requests = keys * 4
    random.Random(0).shuffle(requests)

    def create(key: str):
        try:
            raw = client.fine_tuning.jobs.with_raw_response.create(
                model=MODEL, training_file=training_file_id, hyperparameters={"n_epochs": 1, "batch_size": 4},
                extra_body={**JOB_EXTENSIONS, "pool": PARKED_POOL}, extra_headers={"Idempotency-Key": key})
            return key, raw.status_code, raw.parse().id
        except openai.APIStatusError as e:
            return key, e.status_code, None

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(create, requests))

    statuses = Counter(status for _, status, _ in results)
    assert not [s for s in statuses if s >= 500], f"server errors under concurrent creates: {statuses}"
    assert set(statuses) <= {200, 201}, f"not every create succeeded: {statuses}"
    ids_by_key = defaultdict(set)
    for key, _, job_id in results:
        ids_by_key[key].add(job_id)
    split = {k: v for k, v in ids_by_key.items() if len(v) != 1}
    assert not split, f"one Idempotency-Key made several jobs: {split}"
    distinct = {next(iter(v)) for v in ids_by_key.values()}
    assert len(distinct) == 50, f"{len(distinct)} distinct jobs for 50 keys"
    stored = service.psql(f"SELECT count(*) FROM jobs WHERE idempotency_key LIKE {sql_literal(f'idem-{run}-%')}")
    assert stored == [["50"]], f"Postgres holds {stored} jobs for 50 keys"

    with ThreadPoolExecutor(max_workers=8) as pool:
        cancelled = list(pool.map(lambda job_id: client.fine_tuning.jobs.cancel(job_id).status, sorted(distinct)))
    assert set(cancelled) == {"cancelled"}


# ---------------------------------------------------------------------------------------------
# tenancy and keys


def test_project_b_cannot_read_list_cancel_or_download_project_a(service, client, client_b, api_key_b,
                                                                  training_file_id, train_file):
    a_job = create_job(client, training_file_id, pool=PARKED_POOL)
    b_job = create_job(client_b, client_b.files.create(file=("train.jsonl", train_file.read_bytes()), purpose="fine-tune").id,
                       pool=PARKED_POOL)

    foreign = {
        "retrieve job": lambda: client_b.fine_tuning.jobs.retrieve(a_job.id),
        "cancel job": lambda: client_b.fine_tuning.jobs.cancel(a_job.id),
        "pause job": lambda: client_b.fine_tuning.jobs.pause(a_job.id),
        "resume job": lambda: client_b.fine_tuning.jobs.resume(a_job.id),
        "list events": lambda: client_b.fine_tuning.jobs.list_events(a_job.id),
        "list checkpoints": lambda: client_b.fine_tuning.jobs.checkpoints.list(a_job.id),
        "retrieve file": lambda: client_b.files.retrieve(training_file_id),
        "download file": lambda: client_b.files.content(training_file_id).read(),
        "delete file": lambda: client_b.files.delete(training_file_id),
    }
    wrong = {}
    for what, call in foreign.items():
        try:
            call()
            wrong[what] = "answered 2xx"
        except openai.NotFoundError as e:
            if e.code != "not_found":
                wrong[what] = f"404 with code {e.code!r}"
        except openai.APIStatusError as e:
            wrong[what] = f"answered {e.status_code}"
    assert not wrong, f"project B reached project A's objects: {wrong}"
    metrics = service.request("GET", f"/v1/fine_tuning/jobs/{a_job.id}/metrics", key=api_key_b)
    assert metrics.status == 404, f"B read A's loss curve: {metrics.status}"

    with pytest.raises(openai.BadRequestError) as caught:
        create_job(client_b, training_file_id, pool=PARKED_POOL)
    assert caught.value.param == "training_file", "B trained on A's file, or the error does not name it"

    b_jobs, b_files = job_ids(client_b), file_ids(client_b)
    assert b_job.id in b_jobs and a_job.id not in b_jobs
    assert training_file_id not in b_files and b_job.training_file in b_files
    a_models = {m.id for m in client.models.list() if m.id.startswith("ft:")}
    assert not a_models & {m.id for m in client_b.models.list()}, "B lists A's fine-tuned models"

    assert client.fine_tuning.jobs.retrieve(a_job.id).status == "queued", "B's calls changed A's job"
    assert client.files.content(training_file_id).read() == train_file.read_bytes(), "B's calls changed A's file"


def test_revoked_key_is_refused(service, client):
    label = f"revoke-me-{secrets.token_hex(4)}"
    key = service.create_key("proj-a", name=label)
    doomed = make_client(service, key)
    doomed.files.list()  # works before revocation

    key_id = service.psql(f"SELECT id FROM api_keys WHERE name = {sql_literal(label)}")[0][0]
    assert key_id in service.lathe("admin", "list-keys", "--project", "proj-a"), "list-keys does not show the key"
    assert key not in service.lathe("admin", "list-keys", "--project", "proj-a"), "list-keys shows a secret"
    service.lathe("admin", "revoke-key", "--project", "proj-a", key_id)

    def refused():
        try:
            doomed.files.list()
            return False
        except openai.AuthenticationError as e:
            return e

    refusal = wait_until(refused, 5, "a revoked key still works")
    assert refusal.status_code == 401 and error_body(refusal).get("message")
    client.files.list()  # the project's other key is untouched


@pytest.mark.parametrize("authorization", [
    pytest.param("Bearer lathe-sk-" + "0" * 40, id="wrong-key"),
    pytest.param("Bearer ", id="empty-key"),
    pytest.param(None, id="no-header"),
])
def test_bad_credentials_get_401_with_the_error_envelope(service, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = service.request("GET", "/v1/fine_tuning/jobs", headers=headers)
    assert_error_envelope(resp, 401)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, nothing stored


def test_malformed_training_file_is_refused_naming_the_line(client, tmp_path):
    rows = example_rows(12)
    rows[2] = '{"messages": [{"role": "user", "content": "unterminated'
    before = file_ids(client)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("broken.jsonl", "".join(r + "\n" for r in rows).encode()), purpose="fine-tune")
    error = error_body(caught.value)
    assert re.search(r"\bline 3\b", error["message"]), f"the message does not name line 3: {error['message']!r}"
    assert (error.get("param"), error.get("code")) == ("file", "invalid_training_file"), error
    assert file_ids(client) == before, "a rejected file was stored"


def test_an_over_long_file_name_is_refused_and_nothing_is_stored(client):
    before = file_ids(client)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("n" * 300 + ".jsonl", "".join(r + "\n" for r in example_rows(12)).encode()), purpose="fine-tune")
    error = error_body(caught.value)
    assert error.get("param") == "file" and "at most 255" in error["message"], error
    assert file_ids(client) == before


def test_an_example_with_too_many_messages_is_refused_at_upload_naming_its_line(client):
    rows = example_rows(12)
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 2500
    rows[4] = json.dumps({"messages": turns})
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("chatty.jsonl", "".join(r + "\n" for r in rows).encode()), purpose="fine-tune")
    error = error_body(caught.value)
    assert re.search(r"\bline 5\b", error["message"]) and "at most 1024" in error["message"], error


def test_training_file_with_too_few_examples_is_refused(client):
    before = file_ids(client)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("five.jsonl", "".join(r + "\n" for r in example_rows(5)).encode()),
                            purpose="fine-tune")
    error = error_body(caught.value)
    assert re.search(r"\b10\b", error["message"]), f"the message does not say 10 are needed: {error['message']!r}"
    assert error.get("code") == "invalid_training_file", error
    assert file_ids(client) == before, "a rejected file was stored"


def test_oversized_upload_gets_413_and_stores_nothing(service, client, api_key):
    row = example_rows(1)[0] + "\n"
    content = (row * (3_000_000 // len(row) + 1)).encode()
    assert len(content) > UPLOAD_LIMIT_BYTES
    before = file_ids(client)
    assert post_large_upload(service, api_key, "huge.jsonl", content) == 413
    assert file_ids(client) == before, "part of an oversized upload was stored"


@pytest.mark.parametrize("override, param, code", [
    pytest.param({"model": "no-such-model"}, "model", "model_not_found", id="unknown-model"),
    pytest.param({"training_file": "file-" + "0" * 24}, "training_file", None, id="missing-file"),
    pytest.param({"hyperparameters": {"n_epochs": 0, "batch_size": 4}}, "n_epochs", None, id="zero-epochs"),
])
def test_bad_job_request_names_the_field_and_creates_nothing(client, training_file_id, override, param, code):
    request = {"model": MODEL, "training_file": training_file_id,
               "hyperparameters": {"n_epochs": 1, "batch_size": 4}, "extra_body": {**JOB_EXTENSIONS,
                                                                                   "pool": PARKED_POOL}}
    before = job_ids(client)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**{**request, **override})
    error = error_body(caught.value)
    assert param in (error.get("param") or ""), f"the error does not name {param}: {error}"
    if code is not None:
        assert error.get("code") == code, error
    assert job_ids(client) == before, "a rejected request created a job"


def test_malformed_json_body_gets_400_with_the_error_envelope(service, client, api_key):
    before = job_ids(client)
    resp = service.request("POST", "/v1/fine_tuning/jobs", key=api_key, body=b'{"model": "tiny-qwen3", "training_',
                           headers={"Content-Type": "application/json"})
    error = assert_error_envelope(resp, 400)
    assert error["type"] == "invalid_request_error", error
    assert job_ids(client) == before


# ---------------------------------------------------------------------------------------------
# edges found in review


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs/%00", "/v1/fine_tuning/jobs/ftjob-x%00y/events",
                                  "/v1/files/file-%00", "/v1/files/..%2F..%2Fetc%2Fpasswd/content"])
def test_malformed_ids_are_404_not_server_errors(service, api_key, path):
    error = assert_error_envelope(service.request("GET", path, key=api_key), 404)
    assert error["code"] == "not_found"


def test_a_malformed_cursor_is_400_naming_after(service, api_key):
    error = assert_error_envelope(service.request("GET", "/v1/fine_tuning/jobs?after=%00", key=api_key), 400)
    assert error["param"] == "after"


@pytest.mark.parametrize("query,param", [("model=tiny%00", "model"), ("fine_tuning_job=ftjob-x%00", "fine_tuning_job")])
def test_a_nul_in_an_evaluation_filter_is_400_naming_it(service, api_key, query, param):
    error = assert_error_envelope(service.request("GET", f"/v1/evaluations?{query}", key=api_key), 400)
    assert error["param"] == param and "NUL" in error["message"], error


def test_a_nul_in_metadata_is_400_and_a_tiny_learning_rate_is_400_and_the_job_list_still_answers(service, client, api_key,
                                                                                                 training_file_id):
    before = job_ids(client)
    for extra, param in [({"metadata": {"team": "red\u0000"}}, "metadata"), ({"learning_rate": 1e-310}, "learning_rate"),
                         ({"learning_rate": 5e-324}, "learning_rate")]:
        body = {"model": MODEL, "training_file": training_file_id, **extra}
        resp = service.request("POST", "/v1/fine_tuning/jobs", key=api_key, json_body=body)
        error = assert_error_envelope(resp, 400)
        assert error["param"] == param, error
    assert job_ids(client) == before
    assert service.request("GET", "/v1/fine_tuning/jobs?limit=100", key=api_key).status == 200


def test_error_envelopes_carry_the_request_id_of_the_x_request_id_header(service, api_key):
    resp = service.request("GET", "/v1/fine_tuning/jobs/ftjob-x", key=api_key, headers={"X-Request-Id": "trace-7"})
    error = assert_error_envelope(resp, 404)
    assert error["request_id"] == "trace-7" and resp.headers.get("x-request-id") == "trace-7", (error, resp.headers)
    fresh = service.request("GET", "/v1/fine_tuning/jobs/ftjob-x", key=api_key)
    assert fresh.headers.get("x-request-id", "").startswith("req_") and fresh.json()["error"]["request_id"] == fresh.headers["x-request-id"]


def test_one_file_can_be_both_training_and_validation_file(client, training_file_id):
    job = create_job(client, training_file_id, pool=PARKED_POOL, validation_file=training_file_id)
    assert job.validation_file == training_file_id == job.training_file
    client.fine_tuning.jobs.cancel(job.id)


def test_an_idempotent_retry_returns_the_job_even_after_its_file_is_deleted(client, train_file):
    with open(train_file, "rb") as f:
        doomed = client.files.create(file=f, purpose="fine-tune").id
    key = f"retry-{secrets.token_hex(4)}"
    first = create_job(client, doomed, pool=PARKED_POOL, extra_headers={"Idempotency-Key": key})
    client.files.delete(doomed)
    again = create_job(client, doomed, pool=PARKED_POOL, extra_headers={"Idempotency-Key": key})
    assert again.id == first.id
    client.fine_tuning.jobs.cancel(first.id)
