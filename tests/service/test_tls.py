"""TLS everywhere (issue 9), with certificates this test makes: the controller reaches a Postgres
that refuses plaintext (`sslmode=verify-full` against the test CA) and a Redis that only speaks
TLS (`rediss://`); workers reach the controller's gRPC over TLS with client certificates (mutual
TLS). A job runs end to end through all three; a client without a certificate is refused.
The REST port is served plain and documented behind a TLS-terminating proxy (README)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lathe_service import (Service, create_job, find_lathe_bin, free_port, make_client, wait_for_status, wait_until,
                           write_jsonl, example_rows)

pytestmark = pytest.mark.service


def openssl(directory: Path, *args: str):
    proc = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 / localhost, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=Lathe test CA")
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def as_postgres(*cmd: str):
    proc = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def tls_postgres(pki):
    """A Postgres of our own (initdb, pg_ctl) that takes TLS connections only."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)", pytrace=False)
    bin_dir = bins[-1].parent
    base = Path(tempfile.mkdtemp(prefix="lathe-pg-tls-", dir="/tmp"))  # /tmp: postgres can reach it
    shutil.chown(base, "postgres")
    for name in ("server.pem", "server.key"):
        shutil.copy(pki / name, base / name)
        shutil.chown(base / name, "postgres")
    os.chmod(base / "server.key", 0o600)
    data = base / "data"
    as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    port = free_port()
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{base}'\n"
                   f"ssl = on\nssl_cert_file = '{base}/server.pem'\nssl_key_file = '{base}/server.key'\n")
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
                                      "hostnossl all all 127.0.0.1/32 reject\n")
    as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start")
    try:
        yield port
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_redis(pki):
    """A Redis that speaks TLS only (no plaintext port)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki / "server.pem"),
                             "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.pem"),
                             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def listening():
        if proc.poll() is not None:
            pytest.fail(f"redis-server with TLS exited: {proc.stdout.read()}", pytrace=False)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, 20, "redis-server never listened on its TLS port")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_service(pki, tls_postgres, tls_redis, tmp_path_factory):
    svc = Service(find_lathe_bin(), tmp_path_factory.mktemp("tls-service"))
    svc.env.update(
        LATHE_DATABASE_URL=f"postgres://postgres@127.0.0.1:{tls_postgres}/lathe_tls?sslmode=verify-full&sslrootcert={pki / 'ca.pem'}",
        LATHE_REDIS_URL=f"rediss://127.0.0.1:{tls_redis}",
        SSL_CERT_FILE=str(pki / "ca.pem"),  # the Redis client verifies against the system roots plus this CA
    )
    svc.init_model()
    svc.start_controller(extra_args=("--rate-limit-per-minute", "100000", "--grpc-tls-cert", str(pki / "server.pem"),
                                     "--grpc-tls-key", str(pki / "server.key"), "--grpc-client-ca", str(pki / "ca.pem")))
    svc.start_worker(scheme="https", extra_args=("--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
                                                  "--tls-key", str(pki / "client.key")))
    try:
        yield svc
    finally:
        for process in svc.processes():
            process.stop()


def test_a_job_runs_end_to_end_over_tls_to_postgres_redis_and_the_workers(tls_service, tls_postgres, pki, tmp_path):
    key = tls_service.create_key("tls")
    client = make_client(tls_service, key)
    with open(write_jsonl(tmp_path / "train.jsonl", example_rows(12)), "rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = create_job(client, file_id)
    done = wait_for_status(client, job.id, "succeeded", timeout=180)
    assert done.fine_tuned_model

    # Every connection the controller holds to that Postgres is encrypted (plaintext is refused
    # by its pg_hba.conf, so it could not be otherwise).
    query = ("SELECT bool_and(s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
             "WHERE a.datname = 'lathe_tls'")
    out = subprocess.run(["psql", f"host=127.0.0.1 port={tls_postgres} user=postgres dbname=postgres sslmode=require",
                          "-Atc", query], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("t|"), out
    plain = subprocess.run(["psql", f"host=127.0.0.1 port={tls_postgres} user=postgres dbname=postgres sslmode=disable",
                            "-Atc", "SELECT 1"], capture_output=True, text=True)
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain


def test_the_grpc_port_refuses_a_client_without_a_certificate(tls_service, pki):
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", tls_service.grpc_port), timeout=10) as raw:
        refused = False
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                refused = tls.recv(1024) == b""
        except (ssl.SSLError, ConnectionResetError):
            refused = True
    assert refused, "the gRPC port talked to a client that showed no certificate"
    # Plaintext to the TLS port gets nowhere either.
    with socket.create_connection(("127.0.0.1", tls_service.grpc_port), timeout=10) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        raw.settimeout(10)
        try:
            answer = raw.recv(1024)
        except (ConnectionResetError, socket.timeout):
            answer = b""
        assert not answer.startswith(b"\x00\x00"), "an HTTP/2 frame came back over plaintext"
