"""amqps:// with a private CA, for real: a CA and a server certificate made
here, a RabbitMQ node of the test's own with a TLS listener on loopback, and
the worker trusting that CA through SSL_CERT_FILE, the variable the chart's
workers.brokerCA sets (rustls-native-certs reads it in place of the system
store). Without the CA the worker must refuse the broker's certificate with
one clear line and stop within --boot-timeout."""

import os
import shutil
import ssl
import subprocess
import time

import pytest
import yaml

from conftest import ROOT, celery_app, wait_until

BOOT_TIMEOUT = 3


def openssl(*args, cwd):
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificates (apt-get install openssl)")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory, name):
    """A self-signed CA: (certificate path, key path)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return directory / "ca.pem", directory / "ca.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A test CA, a server certificate it signed for localhost and
    127.0.0.1, and an unrelated CA."""
    base = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(base / "ca", "celeriac test CA")
    other, _ = make_ca(base / "other", "celeriac unrelated CA")
    server = base / "server"
    server.mkdir()
    (server / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr", cwd=server)
    openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem", cwd=server)
    # RabbitMQ runs as this user and must read the key.
    return {"ca": ca, "other_ca": other, "cert": server / "server.pem", "key": server / "server.key"}


@pytest.fixture
def tls_broker(private_rabbit, pki):
    """A private node with a TLS listener (server certificate signed by the
    test CA) beside its plain one."""
    return private_rabbit("tls", tls={"cacertfile": pki["ca"], "certfile": pki["cert"], "keyfile": pki["key"]})


def helm():
    path = os.environ.get("HELM") or str(ROOT / "target" / "tools" / "bin" / "helm")
    if not os.path.exists(path):
        pytest.fail("helm not found: run tests/setup/helm.sh or set HELM")
    return path


def chart_ca_file(tmp_path, ca):
    """What the chart renders for workers.brokerCA.secretName: SSL_CERT_FILE
    and the mount it points into. The Secret's key is written where the
    mount would put it, under tmp_path instead of the mount path."""
    out = subprocess.run([helm(), "template", "workers", str(ROOT / "chart"),
                          "--set", "workers.brokerCA.secretName=rabbitmq-ca"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    [deployment] = [d for d in yaml.safe_load_all(out) if d and d.get("kind") == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [worker] = [c for c in pod["containers"] if c["name"] == "worker"]
    [mount] = [m for m in worker["volumeMounts"] if m["name"] == "broker-ca"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "broker-ca"]
    [item] = volume["secret"]["items"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    local_mount = tmp_path / "broker-ca"
    local_mount.mkdir()
    shutil.copy(ca, local_mount / item["path"])
    assert env["SSL_CERT_FILE"].startswith(mount["mountPath"] + "/")
    return env["SSL_CERT_FILE"].replace(mount["mountPath"], str(local_mount), 1)


def tls_connections(node):
    """(server port, ssl) of every client connection of the node."""
    out = node.ctl("list_connections", "port", "ssl", "--no-table-headers", "--quiet")
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return [(int(port), flag == "true") for port, flag in rows]


def test_worker_trusts_the_private_ca_the_chart_mounts(tls_broker, pki, start_worker, queue_name, tmp_path):
    ca_file = chart_ca_file(tmp_path, pki["ca"])
    w = start_worker("-c", "1", "--result-backend", "rpc://", broker=tls_broker.tls_url,
                     env={"SSL_CERT_FILE": ca_file})
    assert f"amqps://guest:********@localhost:{tls_broker.tls_port}//" in w.log()
    # The worker's connections (task process and control process) are TLS ones on the TLS port.
    wait_until(lambda: sum(1 for port, tls in tls_connections(tls_broker) if port == tls_broker.tls_port) >= 2,
               20, "the worker's TLS connections")
    assert all(tls for port, tls in tls_connections(tls_broker) if port == tls_broker.tls_port)
    # A Python Celery client over TLS too, checking the server with the same CA.
    app = celery_app(queue_name, "rpc://", broker=tls_broker.tls_url)
    app.conf.broker_use_ssl = {"ca_certs": str(pki["ca"]), "cert_reqs": ssl.CERT_REQUIRED}
    try:
        assert app.send_task("celeriac.add", (2, 3)).get(timeout=30) == 5
    finally:
        app.close()
    # And one over the node's plain port: same vhost, same queue.
    app = celery_app(queue_name, "rpc://", broker=tls_broker.url)
    try:
        assert app.send_task("celeriac.add", (20, 22)).get(timeout=30) == 42
    finally:
        app.close()
    assert w.stop() == 0


@pytest.mark.parametrize("trust", ["system-store", "unrelated-ca"])
def test_untrusted_broker_certificate_stops_the_worker_with_one_clear_line(tls_broker, pki, start_worker, trust):
    env = {"SSL_CERT_FILE": str(pki["other_ca"])} if trust == "unrelated-ca" else {}
    began = time.monotonic()
    w = start_worker("-c", "1", "--boot-timeout", str(BOOT_TIMEOUT), broker=tls_broker.tls_url, env=env,
                     ready=False)
    code = w.proc.wait(timeout=60)
    elapsed = time.monotonic() - began
    log = w.log()
    assert code != 0, log
    # Stopped once --boot-timeout ran out (plus a retry interval and the process exits).
    assert elapsed < BOOT_TIMEOUT + 15, (elapsed, log)
    fatal = [line for line in log.splitlines() if "ERROR/MainProcess" in line]
    assert len(fatal) == 1, log
    assert f"still failing after {BOOT_TIMEOUT}s" in fatal[0], fatal[0]
    assert "invalid peer certificate: UnknownIssuer" in fatal[0], fatal[0]
    assert f"amqps://guest:********@localhost:{tls_broker.tls_port}//" in fatal[0], fatal[0]
    after = log[log.index(fatal[0]) + len(fatal[0]):]
    assert "WARNING/" not in after and "ERROR/" not in after, "the reason is the worker's last complaint"
    assert "guest:guest@" not in log
