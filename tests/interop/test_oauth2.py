"""Passwordless RabbitMQ with OAuth 2 tokens (issue 14), for real and on
loopback only: a private RabbitMQ node with rabbitmq_auth_backend_oauth2
trusting an RSA key this module makes, and a small token endpoint standing
in for Entra ID (`Entra` below) that checks the client assertion against
the federated token file's content and issues short-lived (20 s) RS256 JWTs
signed with that key. The worker runs with `--broker-auth
azure-workload-identity` and the Workload Identity webhook's variables
pointing at it (or with `--broker-auth oauth2-token-file`).

Tokens are signed with the openssl command (RSASSA-PKCS1-v1_5 with SHA-256
is RS256), so no Python crypto package is needed."""

import base64
import json
import os
import pathlib
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import celery_app, probe, wait_until
from test_broker_tls import openssl

LIFETIME = 20  # seconds: every token the stand-in issues
RESOURCE = "rabbitmq"  # auth_oauth2.resource_server_id = the tokens' aud
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0e2b1c84-celeriac-workload"
SCOPE = f"api://{RESOURCE}/.default"
# Entra app roles with RabbitMQ's three-part scopes (topic exchanges such as celeryev need them).
ROLES = [f"{RESOURCE}.read:*/*/*", f"{RESOURCE}.write:*/*/*", f"{RESOURCE}.configure:*/*"]


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key, claims, kid="celeriac-test"):
    """An RS256 JWT with `claims`, signed by the PEM private key `key`."""
    head = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    signed = f"{head}.{body}"
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)], input=signed.encode(),
                         capture_output=True, check=True, timeout=30).stdout
    return f"{signed}.{b64(sig)}"


def claims(lifetime=LIFETIME, **extra):
    now = int(time.time())
    c = {"aud": [RESOURCE], "iss": f"https://login.example.test/{TENANT}/v2.0", "sub": CLIENT_ID,
         "client_id": CLIENT_ID, "roles": ROLES, "iat": now, "nbf": now, "exp": now + lifetime}
    c.update(extra)
    return c


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """The broker's signing key pair, and an unrelated private key."""
    base = tmp_path_factory.mktemp("oauth2-keys")
    openssl("genrsa", "-out", "key.pem", "2048", cwd=base)
    openssl("rsa", "-in", "key.pem", "-pubout", "-out", "pub.pem", cwd=base)
    openssl("genrsa", "-out", "other.pem", "2048", cwd=base)
    return {"key": base / "key.pem", "pub": base / "pub.pem", "other": base / "other.pem"}


@pytest.fixture
def oauth_broker(private_rabbit, keys, queue_name):
    """A private node taking tokens signed by keys["key"] (aud "rabbitmq",
    permissions from the `roles` claim), and guest through the internal
    backend for the test's own Celery client."""
    config = "\n".join([
        "auth_backends.1 = rabbit_auth_backend_oauth2",
        "auth_backends.2 = internal",
        f"auth_oauth2.resource_server_id = {RESOURCE}",
        "auth_oauth2.additional_scopes_key = roles",
        "auth_oauth2.default_key = celeriac-test",
        f"auth_oauth2.signing_keys.celeriac-test = {keys['pub']}",
    ])
    node = private_rabbit("oauth2", plugins=("rabbitmq_auth_backend_oauth2",), config=config)
    yield node
    if node.running:
        from conftest import delete_test_queue
        delete_test_queue(node, queue_name)


class Entra:
    """A token endpoint that behaves like Entra ID's v2 endpoint for the
    client-credentials grant with a federated client assertion."""

    def __init__(self, key, assertion_file):
        self.key, self.assertion_file = key, assertion_file
        self.lifetime = LIFETIME
        self.fail = None  # (status, error JSON) to answer with instead of a token
        self.sign_with = key
        self.issued = []  # (time, token)
        self.assertions = []  # the assertion of every accepted request
        self.refusals = []  # why requests were refused
        self.lock = threading.Lock()
        entra = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                form = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
                status, body = entra.answer(self.path, self.headers.get("Content-Type", ""), form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def authority(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def refuse(self, why, code=700024, error="invalid_client", status=400):
        with self.lock:
            self.refusals.append(why)
        return status, {"error": error, "error_description": f"AADSTS{code}: {why} Trace ID: 00000000-0000 "
                        f"Correlation ID: 11111111 Timestamp: 2026-01-01 00:00:00Z", "error_codes": [code]}

    def answer(self, path, content_type, form):
        if path != f"/{TENANT}/oauth2/v2.0/token":
            return 404, {"error": "not_found"}
        if not content_type.startswith("application/x-www-form-urlencoded"):
            return self.refuse(f"content type {content_type}", 900144, "invalid_request")
        expected = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "scope": SCOPE,
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
        for k, v in expected.items():
            if form.get(k) != v:
                return self.refuse(f"{k} is {form.get(k)!r}", 900144, "invalid_request")
        current = self.assertion_file.read_text().strip()
        if form.get("client_assertion") != current:
            return self.refuse("Client assertion is not the current federated token.", 700027)
        if self.fail:
            return self.fail
        token = sign(self.sign_with, claims(self.lifetime))
        with self.lock:
            self.assertions.append(current)
            self.issued.append((time.time(), token))
        return 200, {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime,
                     "access_token": token}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FederatedToken(type(pathlib.Path())):
    """The projected service-account token file, as kubelet writes it
    (replaced whole); rotate() writes a new one."""

    def rotate(self):
        new = self.with_name(self.name + ".new")
        new.write_text(f"sa-token.{uuid.uuid4().hex}.sig\n")
        new.replace(self)
        return self.read_text().strip()


@pytest.fixture
def federated(tmp_path):
    path = FederatedToken(tmp_path / "azure-identity-token")
    path.rotate()
    return path


@pytest.fixture
def entra(keys, federated):
    e = Entra(keys["key"], federated)
    yield e
    e.close()


def wi_env(entra, federated, **extra):
    env = {"AZURE_CLIENT_ID": CLIENT_ID, "AZURE_TENANT_ID": TENANT, "AZURE_FEDERATED_TOKEN_FILE": str(federated),
           "AZURE_AUTHORITY_HOST": entra.authority, "CELERIAC_BROKER_AUTH": "azure-workload-identity",
           "CELERIAC_BROKER_OAUTH_SCOPE": SCOPE}
    env.update(extra)
    return env


def token_url(node):
    """The node's URL without a password: the token is the password."""
    return f"amqp://127.0.0.1:{node.port}//"


def metrics_url(w):
    w.wait_for_log("metrics on http://")
    return re.search(r"metrics on (http://\S+)", w.log()).group(1)


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def sample(text, name):
    m = re.search("^" + re.escape(name) + r"(?:\{\})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def connections(node, worker_node):
    """(connection name, user) of this worker's connections on `node` (each
    process names its connection after its pid; the user is the token's)."""
    out = node.ctl("list_connections", "client_properties", "user", "--silent")
    mark = re.compile(r'"connection_name","(celeriac ' + re.escape(worker_node) + r' [^"]*)"')
    return sorted((m.group(1), line.rsplit("\t", 1)[1]) for line in out.splitlines() if (m := mark.search(line)))


def secret_updates(node):
    """The broker's log lines of successful update-secret calls."""
    return [line for line in node.broker_log().splitlines() if "updated secret" in line]


class Checker:
    """Readiness probes in a thread, every half second, for the whole run."""

    def __init__(self, state_dir):
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(state_dir,), daemon=True)
        self.thread.start()

    def run(self, state_dir):
        while not self.stop.wait(0.5):
            try:
                self.results.append(probe("worker-readiness", state_dir))
            except Exception as e:  # counted as a failed probe
                self.results.append((-1, repr(e)))

    def finish(self):
        self.stop.set()
        self.thread.join(10)
        return self.results


def start_oauth_worker(start_worker, node, env, *args):
    w = start_worker("-c", "2", "--result-backend", "rpc://", "--metrics-bind", "127.0.0.1:0", *args,
                     broker=token_url(node), env=env)
    return w


def test_tokens_are_refreshed_on_open_connections_over_several_lifetimes(start_worker, oauth_broker, entra,
                                                                         federated, queue_name):
    """The worker runs tasks for over four token lifetimes while its tokens
    expire every 20 s and the federated token file is rotated: every
    connection gets each new token with update-secret (the broker logs it),
    nothing reconnects, no task is lost or run twice, readiness stays true,
    and no token or assertion reaches the log."""
    w = start_oauth_worker(start_worker, oauth_broker, wi_env(entra, federated))
    url = metrics_url(w)
    worker_node = f"w0-{queue_name}@" + os.uname().nodename
    first = wait_until(lambda: (c := connections(oauth_broker, worker_node)) and len(c) == 3 and c, 30,
                       "two task processes and the control process connected")
    checker = Checker(w.state_dir)
    app = celery_app(queue_name, "rpc://", broker=oauth_broker.url)
    began = time.monotonic()
    results, sent = [], 0
    rotations = 0
    try:
        while time.monotonic() - began < 4.5 * LIFETIME:
            batch = [app.send_task("celeriac.echo", (f"{sent + i}",)) for i in range(5)]
            sent += len(batch)
            results += [r.get(timeout=30) for r in batch]
            if time.monotonic() - began > (rotations + 1) * 25:
                federated.rotate()  # kubelet's rotation: the next exchange must send the new one
                rotations += 1
            time.sleep(0.5)
        # A countdown task makes the process replace its consumer (basic.consume), which the
        # broker refuses on an expired token.
        assert app.send_task("celeriac.echo", ("late",), countdown=1).get(timeout=30) == "late"
        text = scrape(url)
    finally:
        readiness = checker.finish()
        app.close()
    elapsed = time.monotonic() - began
    assert results == [f"{i}" for i in range(sent)], "a task was lost, repeated or out of order"
    assert connections(oauth_broker, worker_node) == first, "a connection was replaced"
    assert {user for _, user in first} == {CLIENT_ID}, first
    assert sample(text, "celeriac_broker_reconnects_total") == 0
    assert "Reconnected" not in w.log() and "connection lost" not in w.log()
    assert readiness and all(code == 0 for code, _ in readiness), [r for r in readiness if r[0] != 0][:3]
    lifetimes = elapsed / LIFETIME
    assert lifetimes > 4
    # Every process refreshes at about 2/3 of each lifetime: at least 5 pushes per connection here.
    updates = sample(text, "celeriac_broker_token_updates_total")
    assert updates >= 3 * 5, text
    logged = secret_updates(oauth_broker)
    assert len(logged) >= 3 * 5, logged[-3:]
    assert all("celeriac: token refreshed" in line for line in logged)
    assert 0 < sample(text, "celeriac_broker_token_expiry_seconds") <= LIFETIME
    assert sample(text, "celeriac_broker_token_refresh_failures_total") == 0
    # The stand-in only issued tokens for the current federated token, which changed.
    assert entra.refusals == [] and len(set(entra.assertions)) == rotations + 1 and rotations >= 3
    log = w.log()
    for _, token in entra.issued:
        assert token not in log and token.split(".")[2] not in log
    for assertion in set(entra.assertions):
        assert assertion not in log
    print(f"{lifetimes:.1f} token lifetimes, {len(entra.issued)} tokens issued, {updates:.0f} update-secret "
          f"pushes, {len(logged)} logged by the broker, {sent + 1} tasks, {len(readiness)} readiness probes, "
          f"0 reconnects")


def test_a_token_file_is_pushed_when_it_changes(start_worker, oauth_broker, keys, tmp_path, queue_name):
    """--broker-auth oauth2-token-file: whoever keeps the file rewrites it
    with a fresh token every 10 s; the worker pushes each to its three
    connections and never reconnects, for three token lifetimes."""
    path = tmp_path / "token"

    def write():
        new = tmp_path / "token.new"
        new.write_text(sign(keys["key"], claims()))
        new.replace(path)

    write()
    env = {"CELERIAC_BROKER_AUTH": "oauth2-token-file", "CELERIAC_BROKER_OAUTH_TOKEN_FILE": str(path)}
    w = start_oauth_worker(start_worker, oauth_broker, env)
    url = metrics_url(w)
    checker = Checker(w.state_dir)
    app = celery_app(queue_name, "rpc://", broker=oauth_broker.url)
    began, writes, n = time.monotonic(), 0, 0
    try:
        while time.monotonic() - began < 3 * LIFETIME:
            assert app.send_task("celeriac.add", (n, 1)).get(timeout=30) == n + 1
            n += 1
            if time.monotonic() - began > (writes + 1) * 10:
                write()
                writes += 1
            time.sleep(0.5)
        wait_until(lambda: sample(scrape(url), "celeriac_broker_token_updates_total") >= 3 * writes, 10,
                   "every write pushed to every connection")
        text = scrape(url)
    finally:
        readiness = checker.finish()
        app.close()
    assert sample(text, "celeriac_broker_reconnects_total") == 0
    assert all(code == 0 for code, _ in readiness)
    assert writes >= 5 and len(secret_updates(oauth_broker)) >= 3 * writes
    assert path.read_text() not in w.log()


def test_a_failing_token_endpoint_is_retried_while_the_token_is_valid(start_worker, oauth_broker, entra,
                                                                      federated, queue_name):
    """The token endpoint fails (503) from the first refresh on for 10 s:
    the worker logs it once per process, counts the failures, keeps
    consuming on the current token, and pushes the token it gets once the
    endpoint answers again."""
    w = start_oauth_worker(start_worker, oauth_broker, wi_env(entra, federated))
    url = metrics_url(w)
    entra.fail = (503, {"error": "temporarily_unavailable", "error_description": "AADSTS50196: busy"})
    app = celery_app(queue_name, "rpc://", broker=oauth_broker.url)
    try:
        wait_until(lambda: sample(scrape(url), "celeriac_broker_token_refresh_failures_total") >= 3, LIFETIME,
                   "refreshes failing in every process")
        assert app.send_task("celeriac.add", (1, 2)).get(timeout=15) == 3
        time.sleep(5)
        entra.fail = None
        w.wait_for_log("broker token refreshed after", count=3, timeout=40)
        assert app.send_task("celeriac.add", (2, 2)).get(timeout=15) == 4
    finally:
        app.close()
    log = w.log()
    warned = [line for line in log.splitlines() if "cannot refresh the broker token" in line]
    assert len(warned) == 3, warned  # once per process, not per attempt
    assert "temporarily_unavailable: AADSTS50196: busy" in warned[0]
    assert sample(scrape(url), "celeriac_broker_reconnects_total") == 0


# Bad input: one line naming the cause, within --boot-timeout.

def run_worker(env, *args, timeout=60):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "BROKER", "CELERIAC", "AZURE_"))}
    full.update(env)
    from conftest import worker_binary
    began = time.monotonic()
    p = subprocess.run([worker_binary(), "worker", "-c", "1", "--metrics-bind", "none", "-Q",
                        f"oauth2-bad-{uuid.uuid4().hex[:6]}", *args],
                       env=full, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - began


@pytest.mark.parametrize("case", ["missing-file", "unset-variable", "password-in-url", "http-authority"])
def test_bad_settings_exit_64_with_one_line(oauth_broker, entra, federated, tmp_path, case):
    env = wi_env(entra, federated, CELERY_BROKER_URL=token_url(oauth_broker))
    expect = {"missing-file": "AZURE_FEDERATED_TOKEN_FILE: cannot read the token file",
              "unset-variable": "AZURE_TENANT_ID: not set",
              "password-in-url": "CELERY_BROKER_URL: carries a password",
              "http-authority": "AZURE_AUTHORITY_HOST: \"http://login.example.com/\" is not https://"}[case]
    if case == "missing-file":
        env["AZURE_FEDERATED_TOKEN_FILE"] = str(tmp_path / "nowhere")
    elif case == "unset-variable":
        del env["AZURE_TENANT_ID"]
    elif case == "password-in-url":
        env["CELERY_BROKER_URL"] = oauth_broker.url
    else:
        env["AZURE_AUTHORITY_HOST"] = "http://login.example.com/"
    p, _ = run_worker(env)
    assert p.returncode == 64, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], p.stderr


def boot_failure(p):
    """The worker's line saying why it stopped."""
    lines = [line for line in p.stderr.splitlines() if "cannot start task processes" in line and "ERROR" in line]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_a_rejected_assertion_stops_the_worker_naming_entras_error(oauth_broker, entra, federated):
    entra.fail = entra.refuse("Client assertion is not within its valid time range.", 700024)
    env = wi_env(entra, federated, CELERY_BROKER_URL=token_url(oauth_broker))
    p, took = run_worker(env, "--boot-timeout", "10")
    assert p.returncode != 0 and took < 25, (took, p.stderr)
    line = boot_failure(p)
    assert ("refused the request (HTTP 400): invalid_client: AADSTS700024: Client assertion is not within "
            "its valid time range.") in line, line
    assert "Trace ID" not in line
    assert federated.read_text().strip() not in p.stderr + p.stdout


def test_an_unreachable_authority_stops_the_worker_after_the_boot_timeout(oauth_broker, federated):
    from private_broker import free_port
    env = {"AZURE_CLIENT_ID": CLIENT_ID, "AZURE_TENANT_ID": TENANT, "AZURE_FEDERATED_TOKEN_FILE": str(federated),
           "AZURE_AUTHORITY_HOST": f"http://127.0.0.1:{free_port()}/", "CELERIAC_BROKER_AUTH":
           "azure-workload-identity", "CELERIAC_BROKER_OAUTH_SCOPE": SCOPE,
           "CELERY_BROKER_URL": token_url(oauth_broker)}
    p, took = run_worker(env, "--boot-timeout", "4")
    assert p.returncode != 0 and took < 20, (took, p.stderr)
    line = boot_failure(p)
    assert "still failing after 4s" in line and "cannot reach the token endpoint" in line, line


def test_a_token_the_broker_refuses_stops_the_worker(oauth_broker, entra, federated, keys):
    entra.sign_with = keys["other"]  # a key the broker does not know
    env = wi_env(entra, federated, CELERY_BROKER_URL=token_url(oauth_broker))
    p, took = run_worker(env, "--boot-timeout", "10")
    assert p.returncode != 0 and took < 25, (took, p.stderr)
    line = boot_failure(p)
    assert "ACCESS_REFUSED" in line, line
    for _, token in entra.issued:
        assert token not in p.stderr


def test_an_expired_token_in_the_file_stops_the_worker(oauth_broker, keys, tmp_path):
    path = tmp_path / "token"
    path.write_text(sign(keys["key"], claims(lifetime=-30)))
    env = {"CELERIAC_BROKER_AUTH": "oauth2-token-file", "CELERIAC_BROKER_OAUTH_TOKEN_FILE": str(path),
           "CELERY_BROKER_URL": token_url(oauth_broker)}
    p, took = run_worker(env, "--boot-timeout", "10")
    assert p.returncode != 0 and took < 25, (took, p.stderr)
    line = boot_failure(p)
    assert f"the token file {path} holds no usable token: its token expired" in line, line


def test_an_expired_token_is_replaced_and_refused_channels_reopened(start_worker, oauth_broker, entra, federated,
                                                                     queue_name):
    """The token endpoint is down until the tokens have expired and the
    broker refuses publishes (403 ACCESS_REFUSED closes the channel; the
    broker caches permissions for up to 60 s). Meanwhile the worker goes on
    consuming and stays ready; once the endpoint answers, each process gets
    a fresh token, pushes it and reopens its refused channels, without
    reconnecting, and results flow again."""
    w = start_oauth_worker(start_worker, oauth_broker, wi_env(entra, federated), "-c", "1")
    url = metrics_url(w)
    entra.fail = (503, {"error": "temporarily_unavailable", "error_description": "AADSTS50196: down"})
    checker = Checker(w.state_dir)
    app = celery_app(queue_name, "rpc://", broker=oauth_broker.url)
    try:
        # The control process's worker-heartbeats (every 2 s) are refused once the token expired.
        w.wait_for_log("the broker closed a publishing channel", timeout=LIFETIME + 60 + 20)
        # The task process still consumes on the expired token (results are refused).
        for i in range(5):
            app.send_task("celeriac.noop", ignore_result=True)
        wait_until(lambda: oauth_broker_queue_depth(oauth_broker, queue_name) == 0, 20, "tasks consumed")
        app.send_task("celeriac.add", (0, 0))  # its result is refused: the task process's channel closes
        w.wait_for_log("the broker closed a publishing channel", count=2, timeout=30)
        entra.fail = None
        w.wait_for_log("reopened the control channels the broker had closed", timeout=60)
        w.wait_for_log("publishing channel(s) the broker had closed", timeout=60)
        assert [app.send_task("celeriac.add", (i, 1)).get(timeout=30) for i in range(5)] == [1, 2, 3, 4, 5]
        text = scrape(url)
    finally:
        readiness = checker.finish()
        app.close()
    assert sample(text, "celeriac_broker_reconnects_total") == 0
    assert "Reconnected" not in w.log() and "connection re-established" not in w.log()
    assert readiness and all(code == 0 for code, _ in readiness)
    assert sample(text, "celeriac_broker_token_expiry_seconds") > 0
    assert sample(text, "celeriac_broker_token_refresh_failures_total") >= 2


def oauth_broker_queue_depth(node, queue):
    from conftest import queue_depth
    return queue_depth(queue, node.url)
