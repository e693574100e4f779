"""Resource exhaustion (issue 9): per-key rate limits, and connections that never send a request.
These run on a controller of their own (same database) with small limits, so the suite's main
controller keeps its generous ones."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from concurrent.futures import ThreadPoolExecutor

from lathe_service import PARKED_POOL, Service, create_job, example_rows, find_lathe_bin, peak_rss_bytes, stream_upload

pytestmark = pytest.mark.service

HEADER_TIMEOUT = 2
METRICS_TOKEN = "scrape-me"
UPLOAD_MB = 64


@pytest.fixture(scope="module")
def limited(service, tmp_path_factory):
    other = Service(find_lathe_bin(), tmp_path_factory.mktemp("limited"))
    other.env = dict(service.env)
    other.models_root = service.models_root
    # The suite's default of 100000/min comes first; clap keeps the last value given.
    other.start_controller(extra_args=("--rate-limit-per-minute", "60", "--max-connections", "256",
                                       "--auth-failures-per-minute", "60",
                                       "--header-read-timeout-seconds", str(HEADER_TIMEOUT),
                                       "--metrics-token", METRICS_TOKEN),
                           max_upload_bytes=UPLOAD_MB << 20)
    yield other
    other.controller.stop()


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(limited, api_key, api_key_b):
    statuses = [limited.request("GET", "/v1/models", key=api_key) for _ in range(14)]
    assert [r.status for r in statuses[:10]] == [200] * 10, [r.status for r in statuses]
    refused = statuses[-1]
    assert refused.status == 429, [r.status for r in statuses]
    assert int(refused.headers["retry-after"]) >= 1, refused.headers
    assert refused.json()["error"]["code"] == "rate_limit_exceeded", refused.body
    assert limited.request("GET", "/v1/models", key=api_key_b).status == 200
    assert limited.request("GET", "/healthz").status == 200, "probes without a key are not limited"


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lathe\r\nConnection: close\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return time.monotonic() - started


def test_silent_and_slow_connections_are_closed_after_the_header_timeout(limited):
    silent = socket.create_connection(("127.0.0.1", limited.http_port))
    slow = socket.create_connection(("127.0.0.1", limited.http_port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: lathe\r\n")  # never finishes its head
    for sock in (silent, slow):
        sock.settimeout(HEADER_TIMEOUT + 8)
        started = time.monotonic()
        data = sock.recv(4096)
        waited = time.monotonic() - started
        assert not data.strip() or data.startswith(b"HTTP/1.1 408"), data[:100]
        assert waited < HEADER_TIMEOUT + 6, f"closed only after {waited:.1f} s"
        sock.close()


FLOOD = r"""
import socket, sys, time
port, count, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(count):
    try:
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        pass
print(len(socks), flush=True)
time.sleep(hold)
"""


def test_20000_idle_connections_leave_healthz_answering(limited):
    # Four processes of 5,000 silent connections each (one process could not hold 20,000 under
    # this machine's limit of open files); the controller caps at 256 and evicts the oldest idle.
    floods = [subprocess.Popen([sys.executable, "-c", FLOOD, str(limited.http_port), "5000", "20"],
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        opened = sum(int(f.stdout.readline() or 0) for f in floods)
        assert opened >= 19_000, f"only {opened} connections opened"
        timings = [healthz_seconds(limited.http_port) for _ in range(10)]
        assert max(timings) < 5, f"/healthz under 20,000 idle connections took {max(timings):.2f} s"
        print(f"20,000 idle connections: /healthz answered in at most {max(timings) * 1000:.0f} ms")
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()
    assert limited.controller.alive()


def test_metrics_needs_the_scrape_token_when_one_is_set(limited):
    refused = limited.request("GET", "/metrics")
    assert refused.status == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.body[:200]
    scraped = limited.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status == 200 and b"lathe_" in scraped.body, scraped.body[:200]


def test_concurrent_large_uploads_are_streamed_not_held_in_memory(limited, client, api_key_b):
    """Four 60 MB uploads at once: the controller's memory grows by far less than one of them
    (it used to hold each whole, twice). scripts/bench_upload.sh runs the 4 x 500 MB version."""
    row = (example_rows(1)[0] + "\n").encode()
    rss_before, _ = peak_rss_bytes(limited.controller.pid)
    before = {f.id for f in client.files.list()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: stream_upload(limited.http_port, api_key_b, f"big-{i}.jsonl", row, 60 << 20),
                                range(4)))
    assert [status for status, _ in results] == [200] * 4, [body[:200] for _, body in results]
    _, peak = peak_rss_bytes(limited.controller.pid)
    grown = (peak - rss_before) / 2**20
    print(f"4 x 60 MB uploads at once: controller peak RSS {peak / 2**20:.0f} MB (grew by {grown:.0f} MB)")
    assert grown < 60, f"the controller grew by {grown:.0f} MB for 4 concurrent 60 MB uploads"
    assert peak < 300 * 2**20, f"the controller peaked at {peak / 2**20:.0f} MB resident"
    assert {f.id for f in client.files.list()} == before, "another project's uploads are visible"


def open_event_streams(port: int, key: str, job_id: str, count: int) -> list[tuple[socket.socket, bytes]]:
    """`count` SSE streams of a job's events, each left open; their sockets and response heads."""
    streams = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"GET /v1/fine_tuning/jobs/{job_id}/events/stream HTTP/1.1\r\nHost: lathe\r\n"
                     f"Authorization: Bearer {key}\r\n\r\n".encode())
        streams.append((sock, sock.recv(4096)))
    return streams


def test_one_key_cannot_take_every_connection_and_health_probes_always_get_in(service, client, api_key, training_file_id,
                                                                              tmp_path_factory):
    # A job no worker takes: its event stream stays open.
    job = create_job(client, training_file_id, pool=PARKED_POOL)
    capped = Service(find_lathe_bin(), tmp_path_factory.mktemp("capped"))
    capped.env = dict(service.env)
    capped.models_root = service.models_root
    capped.start_controller(extra_args=("--max-connections", "50", "--max-streams-per-key", "100",
                                        "--rate-limit-per-minute", "0"))
    try:
        # One tenant holds all 50 connections with streams: probes still get in (the reserve).
        streams = open_event_streams(capped.http_port, api_key, job.id, 50)
        assert all(head.startswith(b"HTTP/1.1 200") for _, head in streams), [h[:40] for _, h in streams]
        answered = [healthz_seconds(capped.http_port) for _ in range(20)]
        assert len(answered) == 20 and max(answered) < 5, answered
        # A probe connection serves probes only.
        busy = capped.request("GET", "/v1/models", key=api_key)
        assert busy.status == 503 and busy.json()["error"]["code"] == "overloaded", busy.body[:200]
        for sock, _ in streams:
            sock.close()
    finally:
        capped.controller.stop()

    # With the per-key stream cap (the default 32, here 4), the tenant never gets that far.
    capped.start_controller(extra_args=("--max-streams-per-key", "4", "--rate-limit-per-minute", "0"))
    try:
        streams = open_event_streams(capped.http_port, api_key, job.id, 5)
        heads = [head.split(b"\r\n")[0] for _, head in streams]
        assert heads[:4] == [b"HTTP/1.1 200 OK"] * 4, heads
        assert heads[4].startswith(b"HTTP/1.1 429"), heads
        assert b"too_many_streams" in streams[4][1], streams[4][1][:400]
        for sock, _ in streams:
            sock.close()
    finally:
        capped.controller.stop()
    client.fine_tuning.jobs.cancel(job.id)


def test_unknown_keys_from_one_address_get_429_before_any_lookup_while_a_key_in_use_keeps_working(limited, api_key):
    assert limited.request("GET", "/v1/models", key=api_key).status == 200
    statuses = [limited.request("GET", "/v1/models", key=f"lathe-sk-guess-{i}").status for i in range(40)]
    assert statuses[0] == 401, statuses
    assert statuses[-1] == 429, f"guessing keys was never slowed down: {statuses}"
    assert statuses.count(401) <= 31, statuses
    # The key this client just used is remembered: it is not caught by the address's limit.
    assert limited.request("GET", "/v1/models", key=api_key).status == 200
