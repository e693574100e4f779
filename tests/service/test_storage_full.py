"""A full data directory is the infrastructure's fault, not the tenant's: a checkpoint write that
hits ENOSPC sends the job back to the queue (no retry spent, a clear `storage_full` event, a
counter for operators) and it finishes once space is freed; an upload to a full disk is a 507
with a code, not a bare 500.

The data directory is a small tmpfs mounted for the test (root can mount here and in CI)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lathe_service import (LONG_EPOCHS, Service, create_job, find_lathe_bin, make_client, require_postgres_and_redis,
                           wait_for_status, wait_until)

pytestmark = pytest.mark.service

DISK_MB = 48


def fill(directory: Path) -> Path:
    """Writes zeros into `directory` until the disk refuses: the file holding them."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the data directory (the test needs root): {done.stderr}", pytrace=False)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_data_directory_requeues_the_job_and_answers_uploads_507(tmp_path, small_disk, train_file):
    require_postgres_and_redis()
    service = Service(find_lathe_bin(), tmp_path / "service")
    service.data_dir = small_disk
    service.models_root = tmp_path / "models"  # the model is not on the small disk
    try:
        service.init_model()
        service.start_controller(extra_args=("--rate-limit-per-minute", "100000", "--retry-backoff-seconds", "2"))
        service.start_worker()
        key = service.create_key("storage")
        client = make_client(service, key)
        with open(train_file, "rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id

        filler = fill(small_disk)
        upload = service.request("POST", "/v1/files", key=key,
                                 body=b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                                      b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n\r\n"
                                      + train_file.read_bytes() + b"\r\n--b--\r\n",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert upload.status == 507, upload.body[:300]
        error = upload.json()["error"]
        assert error["code"] == "storage_full" and str(small_disk) not in error["message"], error

        job = create_job(client, file_id, n_epochs=LONG_EPOCHS, seed=3)

        def faulted():
            events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
            return next((m for m in events if "storage_full" in m), None)

        message = wait_until(faulted, 180, lambda: f"no storage_full event; job {client.fine_tuning.jobs.retrieve(job.id)}")
        assert "no retry spent" in message, message
        assert service.job_column(job.id, "retries") == "0"
        assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
        metrics = service.request("GET", "/metrics").body.decode()
        assert 'lathe_infrastructure_faults_total{code="storage_full"}' in metrics, \
            [line for line in metrics.splitlines() if "infrastructure" in line]

        os.remove(filler)
        done = wait_for_status(client, job.id, "succeeded", timeout=300)
        assert done.fine_tuned_model
        outcomes = [a["outcome"] for a in service.attempts(job.id)]
        assert "faulted" in outcomes and outcomes[-1] == "succeeded", outcomes
        assert service.job_column(job.id, "retries") == "0", "a full disk must not spend the job's retries"
    finally:
        service.shutdown()
