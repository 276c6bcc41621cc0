"""What an operator sees when the worker cannot start: one line per change
of state, the reason last, the deadline kept, and none of the AMQP client
library's own error lines for a condition the worker reports itself."""

import subprocess
import time

from conftest import worker_binary

LIBRARY_NOISE = ("Connection closed", "Exponential backoff", "Connection error")


def start(tmp_path, *args, timeout=60):
    began = time.monotonic()
    p = subprocess.run(
        [worker_binary(), "worker", "-c", "2", "-Q", "startup-test", "--metrics-bind", "none",
         "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True, text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin"},
    )
    return p, time.monotonic() - began


def test_a_refused_login_is_two_lines_with_the_reason_last(tmp_path):
    p, took = start(tmp_path, "-b", "amqp://guest:wrong-password@127.0.0.1:5672//")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p
    assert len(lines) == 2, lines
    assert "WARNING/MainProcess" in lines[0] and "ERROR/MainProcess" in lines[1], lines
    assert "cannot start task processes" in lines[-1] and "ACCESS_REFUSED" in lines[-1], lines[-1]
    assert not any(n in p.stderr for n in LIBRARY_NOISE), p.stderr
    assert "wrong-password" not in p.stderr + p.stdout, "the password never shows"
    assert took < 15, took


def test_an_unreachable_broker_gives_up_at_the_boot_timeout(tmp_path):
    p, took = start(tmp_path, "-b", "amqp://guest:guest@127.0.0.1:1//", "--boot-timeout", "4")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p
    assert len(lines) == 2, lines
    assert "still failing after 4s" in lines[-1] and "Connection refused" in lines[-1], lines[-1]
    # The bound tells the flag from the default (30 s), not how fast the machine is.
    assert 4 <= took < 20, f"gave up after {took:.1f}s for --boot-timeout 4"


def test_the_client_library_speaks_at_debug(tmp_path):
    p, _ = start(tmp_path, "-b", "amqp://guest:wrong-password@127.0.0.1:5672//", "-l", "DEBUG")
    assert p.returncode == 1
    assert any(n in p.stderr for n in LIBRARY_NOISE), "at DEBUG the AMQP client's own lines are kept"
