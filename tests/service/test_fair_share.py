"""Fair share between projects on one shared worker, as users of two teams see it: the second
team's jobs do not wait behind the first team's whole queue, an admin sets weights and quotas
with `lathe admin set-project`, and a job larger than its project's quota says so at once."""

from __future__ import annotations

import subprocess

import pytest

from lathe_service import create_job, make_client, wait_for_status

pytestmark = pytest.mark.service


def upload(client, train_file) -> str:
    with open(train_file, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def test_a_second_project_starts_before_the_first_projects_queue_is_done(service, train_file):
    # Fresh projects: no recent use of their own in the pool.
    team_a = make_client(service, service.create_key("fair-a"))
    team_b = make_client(service, service.create_key("fair-b"))
    file_a, file_b = upload(team_a, train_file), upload(team_b, train_file)
    a_jobs = [create_job(team_a, file_a, seed=70 + i) for i in range(4)]
    b_jobs = [create_job(team_b, file_b, seed=80 + i) for i in range(2)]
    for job in a_jobs:
        wait_for_status(team_a, job.id, "succeeded", timeout=300)
    for job in b_jobs:
        wait_for_status(team_b, job.id, "succeeded", timeout=300)
    started = sorted((service.attempts(j.id)[0]["started_at"], name)
                     for name, j in [*((f"A{i + 1}", j) for i, j in enumerate(a_jobs)),
                                     *((f"B{i + 1}", j) for i, j in enumerate(b_jobs))])
    order = [name for _, name in started]
    # Priority then FIFO would give A1 A2 A3 A4 B1 B2. With equal weights B's first job goes as
    # soon as A has used the worker, and B's second before A's last.
    assert order.index("B1") < order.index("A2"), order
    assert order.index("B2") < order.index("A4"), order


def test_set_project_names_what_is_wrong(service):
    service.create_key("fair-admin")

    def set_project(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(service.bin), "admin", "set-project", *args], env=service.env, cwd=service.workdir,
                              capture_output=True, text=True, timeout=60)

    unknown = set_project("no-such-team", "--weight", "2")
    assert unknown.returncode != 0 and "no project named \"no-such-team\"" in unknown.stderr, unknown.stderr
    zero = set_project("fair-admin", "--weight", "0")
    assert zero.returncode != 0 and "--weight must be a number above 0" in zero.stderr, zero.stderr
    negative = set_project("fair-admin", "--max-gpus=-1")
    assert negative.returncode != 0 and "--max-gpus must be a whole number of GPUs (0 or more) or none, got \"-1\"" in negative.stderr, \
        negative.stderr
    below_zero = set_project("fair-admin", "--weight=-2")
    assert below_zero.returncode != 0 and "--weight must be a number above 0" in below_zero.stderr, below_zero.stderr
    nothing = set_project("fair-admin")
    assert nothing.returncode != 0 and "nothing to set" in nothing.stderr, nothing.stderr
    ok = set_project("fair-admin", "--weight", "3", "--max-gpus", "4")
    assert ok.returncode == 0 and "every pool\tweight 3\tquota 4 GPUs" in ok.stdout, ok.stdout + ok.stderr
    pooled = set_project("fair-admin", "--pool", "gpu-a100", "--max-gpus", "none")
    assert pooled.returncode == 0 and "pool gpu-a100\tweight inherited\tquota none" in pooled.stdout, pooled.stdout


def test_the_admin_api_sets_shares_and_names_the_field_at_fault(service):
    service.create_key("fair-rest")
    path = "/v1/admin/projects/{}/shares"

    def post(project: str, body):
        return service.request("POST", path.format(project), key=service.admin_token, json_body=body)

    for project, body, param in [
        ("no-such-team", {"weight": 2}, "project"),
        ("fair-rest", {"weight": 0}, "weight"),
        ("fair-rest", {"weight": -2}, "weight"),
        ("fair-rest", {"weight": "lots"}, "weight"),
        ("fair-rest", {"max_gpus": -1}, "max_gpus"),
        ("fair-rest", {"max_gpus": 1.5}, "max_gpus"),
        ("fair-rest", {"weight": 1, "pool": "Not A Pool"}, "pool"),
        ("fair-rest", {"weight": 1, "share": 3}, "share"),
    ]:
        resp = post(project, body)
        assert resp.status == 400 and resp.json()["error"]["param"] == param, (body, resp.status, resp.body[:300])
    nothing = post("fair-rest", {})
    assert nothing.status == 400 and "nothing to set" in nothing.json()["error"]["message"], nothing.body[:300]
    # Only the admin token sets shares.
    assert service.request("POST", path.format("fair-rest"), key=service.create_key("fair-rest", "other"),
                           json_body={"weight": 9}).status == 401

    assert post("fair-rest", {"weight": 3, "max_gpus": 4}).status == 200
    shares = post("fair-rest", {"pool": "gpu-a100", "max_gpus": None}).json()
    assert shares == {"object": "list", "project": "fair-rest", "data": [
        {"pool": "*", "weight": 3.0, "max_gpus": 4}, {"pool": "gpu-a100", "weight": None, "max_gpus": None}]}, shares
    assert service.admin("projects/fair-rest/shares") == shares


def test_a_job_larger_than_its_projects_quota_warns_at_once(service, train_file):
    team = make_client(service, service.create_key("fair-quota"))
    service.lathe("admin", "set-project", "fair-quota", "--max-gpus", "1")
    job = create_job(team, upload(team, train_file), extra={"gpus": 2})
    events = [e for e in team.fine_tuning.jobs.list_events(job.id, limit=50) if e.level == "warn"]
    assert any("needs 2 GPUs but the project may hold at most 1 in pool \"default\"" in e.message for e in events), \
        [e.message for e in events]
    team.fine_tuning.jobs.cancel(job.id)
