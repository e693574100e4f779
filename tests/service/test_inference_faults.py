"""Inference when a worker misbehaves: a frozen worker (SIGSTOP, as a partitioned host that sends
no reset) is found by the gRPC keepalive, its requests end and new ones go to the live worker; a
completion that outlives its deadline is cancelled and answered 504; a worker's own failure
reaches the client as an opaque 500 with a request id, never the worker's folders.

Each test runs a controller of its own (same Postgres and Redis, its own database) with the
timeouts it needs, and its own inference workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

from lathe_service import MODEL, Service, find_lathe_bin, wait_until

pytestmark = pytest.mark.service

MESSAGES = [{"role": "user", "content": "CVE-2021-44228: JNDI lookups in log messages allow remote code execution."}]


def serving_controller(service, workdir, extra_args: tuple[str, ...], servers: int, models_root=None) -> Service:
    own = Service(find_lathe_bin(), workdir)
    own.env = dict(service.env)
    own.models_root = models_root or service.models_root
    own.start_controller(extra_args=("--rate-limit-per-minute", "100000", *extra_args))
    for _ in range(servers):
        own.start_worker(extra_args=("--serve", "--dtype", "fp32", "--serve-max-batch", "4"))
    wait_until(lambda: own.request("GET", "/readyz").json()["inference"]["workers"] == servers, 60,
               lambda: f"{servers} inference workers never connected\n{own.log_tails()}")
    return own


def chat(service: Service, key: str, **body) -> tuple[int, dict]:
    resp = service.request("POST", "/v1/chat/completions", key=key, timeout=60,
                           json_body={"model": MODEL, "messages": MESSAGES, **body})
    return resp.status, resp.json()


class Stream(threading.Thread):
    """A long streamed completion read in the background: what it received and how it ended."""

    def __init__(self, service: Service, key: str):
        super().__init__(daemon=True)
        self.service, self.key = service, key
        self.chunks: list[dict] = []
        self.ended: str | None = None

    def run(self):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.service.http_port, timeout=120)
        # No max_tokens: it may run to the end of the context, far longer than the test.
        body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True, "temperature": 1.0, "seed": 1})
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                self.ended = "done"
                return
            chunk = json.loads(data)
            if "error" in chunk:
                self.ended = chunk["error"]["code"]
                return
            self.chunks.append(chunk)
        self.ended = "closed"


def test_a_frozen_inference_worker_is_dropped_by_keepalive_and_its_requests_end(service, api_key, tmp_path):
    own = serving_controller(service, tmp_path, ("--grpc-keepalive-seconds", "2"), servers=1)
    first = own.workers[0]
    frozen = None
    try:
        # A long stream on the first server; then a second server joins.
        stream = Stream(own, api_key)
        stream.start()
        wait_until(lambda: stream.chunks, 60, "the stream to start")
        second = own.start_worker(extra_args=("--serve", "--dtype", "fp32", "--serve-max-batch", "4"))
        wait_until(lambda: own.request("GET", "/readyz").json()["inference"]["workers"] == 2, 60, "the second server")
        os.kill(first.pid, signal.SIGSTOP)
        frozen = first
        stopped_at = time.monotonic()
        # The frozen server's stream ends (its connection missed the pings), within seconds.
        wait_until(lambda: stream.ended, 30, "the stream on the frozen worker to end")
        assert stream.ended == "worker_unavailable", stream.ended
        took = time.monotonic() - stopped_at
        assert took < 20, f"the frozen worker held its request {took:.1f} s"
        # It left routing, and new requests go to the live server.
        wait_until(lambda: own.request("GET", "/readyz").json()["inference"]["workers"] == 1, 20, "the frozen worker to leave routing")
        answers = [chat(own, api_key, max_tokens=4, temperature=0) for _ in range(5)]
        assert [status for status, _ in answers] == [200] * 5, answers
        assert second.alive()
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        own.shutdown()


def test_a_completion_past_its_deadline_is_cancelled_and_answered_504(service, api_key, tmp_path):
    # Keepalive far longer than the deadline: only the deadline can end the request.
    own = serving_controller(service, tmp_path, ("--grpc-keepalive-seconds", "120", "--completion-timeout-seconds", "3"), servers=1)
    worker = own.workers[0]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = chat(own, api_key, max_tokens=8)
        took = time.monotonic() - started
        assert status == 504 and body["error"]["code"] == "timeout", body
        assert 2.5 < took < 15, f"answered after {took:.1f} s with a 3 s deadline"
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        own.shutdown()


def test_a_worker_failure_is_an_opaque_500_with_a_request_id_and_no_server_paths(service, api_key, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(service.models_root / MODEL, models / MODEL)
    broken = models / "broken"
    shutil.copytree(service.models_root / MODEL, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    own = serving_controller(service, tmp_path / "svc", (), servers=1, models_root=models)
    try:
        resp = own.request("POST", "/v1/chat/completions", key=api_key, timeout=60,
                           json_body={"model": "broken", "messages": MESSAGES, "max_tokens": 4})
        assert resp.status == 500, resp.body[:300]
        error = resp.json()["error"]
        assert error["code"] == "inference_failed" and error["type"] == "server_error", error
        assert error["request_id"] and error["request_id"] == resp.headers.get("x-request-id"), (error, resp.headers)
        text = resp.body.decode()
        for secret in (str(models), str(tmp_path), "/tmp", "safetensors", "Error {"):
            assert secret not in text, f"{secret!r} leaked to the client: {text}"
        # The details are in the controller's log, for the operator.
        log = own.controller.stderr_log.read_text() + own.controller.stdout_log.read_text()
        assert "the inference worker failed a request" in log
        # The worker still serves the good model.
        assert own.request("POST", "/v1/chat/completions", key=api_key, timeout=60,
                           json_body={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}).status == 200
    finally:
        own.shutdown()
