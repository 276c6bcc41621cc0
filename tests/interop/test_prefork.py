"""The prefork supervisor: fork discipline, crash isolation, hard limits,
recycling and a SIGTERM drain that loses nothing. Every scenario ends with an
account kept in Redis by `celeriac.test.record`: each published token is
completed or still queued, and none runs twice unless acks-late redelivery
allows it."""

import os
import re
import signal
import threading
import time
import uuid

import pytest
from billiard.exceptions import TimeLimitExceeded, WorkerLostError

from conftest import (child_pids, consuming_pids, declare_with_dead_letters, node_of, process_gone,
                      queue_depth, task_pids, thread_count, wait_for_consuming, wait_until)

TEST = "--with-test-tasks"


def test_supervisor_is_single_threaded_at_every_fork(start_worker, rpc_app, account):
    w = start_worker(TEST, "-c", "2", "--max-tasks-per-child", "2", "-l", "DEBUG")
    # Two tasks per process: the two processes alive at the end have run at
    # most one task each, so ten tasks recycle at least four processes and
    # the worker forks at least six times.
    for _ in range(10):
        account.send()
    account.wait_all()
    w.wait_for_log("forking task process", count=6)
    forks = re.findall(r"forking task process.*threads=(\d+)", w.log())
    assert len(forks) >= 6 and set(forks) == {"1"}, forks
    assert thread_count(w.pid) == 1, "the supervisor never gains a thread"
    # The last replacement may have been forked a moment ago, before it
    # started its runtime (or the state file may still list the process it
    # replaces): wait for two consuming processes that have their runtime
    # threads. If the runtimes were not in the children, none would.
    def children_with_runtimes():
        kids = consuming_pids(w)
        return len(kids) == 2 and all(thread_count(k) > 1 for k in kids)

    wait_until(children_with_runtimes, 20, "two consuming task processes with runtime threads "
                                           "(runtimes live in the children)")
    assert thread_count(w.pid) == 1, "the supervisor never gains a thread"


def test_sigterm_under_steady_load_loses_nothing(start_worker, rpc_app, account, queue_name):
    stop = threading.Event()

    def produce():
        while not stop.is_set():
            account.send(0.02)
            time.sleep(0.005)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        for round_ in range(10):
            w = start_worker(TEST, "-c", "2")
            time.sleep(0.4 + 0.1 * (round_ % 4))
            assert w.stop() == 0, w.log()[-2000:]
    finally:
        stop.set()
        producer.join()
    start_worker(TEST, "-c", "2")
    account.wait_all(120)
    assert account.duplicates() == {}, "early-acked tasks ran once each"
    assert account.completed() == set(account.tokens)
    assert queue_depth(queue_name) == 0


@pytest.mark.parametrize("mode", ["early-ack", "acks-late", "acks-late+reject-on-worker-lost"])
def test_sigkill_of_a_child_mid_task(start_worker, rpc_app, account, mode):
    flags = {"early-ack": [], "acks-late": ["--acks-late"],
             "acks-late+reject-on-worker-lost": ["--acks-late", "--reject-on-worker-lost"]}[mode]
    w = start_worker(TEST, "-c", "1", "--result-backend", "rpc://", *flags)
    victim = account.send(3.0)
    w.wait_for_log(f"[{victim.id}] received")
    time.sleep(0.5)
    [child] = wait_for_consuming(w, 1)
    os.kill(child, signal.SIGKILL)
    after = account.send(0)
    if mode == "acks-late+reject-on-worker-lost":
        assert victim.get(timeout=30)["count"] == 1, "requeued and run again to completion"
    else:
        with pytest.raises(WorkerLostError, match="signal 9"):
            victim.get(timeout=30)
    assert after.get(timeout=30)["count"] == 1
    wait_until(lambda: len(task_pids(w)) == 1 and task_pids(w)[0] != child, what="replacement process")
    assert w.alive()
    assert account.duplicates() == {}


def test_sigkill_of_the_supervisor(start_worker, rpc_app, account, queue_name):
    w = start_worker(TEST, "-c", "2")
    for _ in range(40):
        account.send(0.05)
    time.sleep(0.5)
    # Both processes, known to be alive and consuming: an empty list would
    # make the wait below pass without checking anything.
    kids = wait_for_consuming(w, 2)
    os.kill(w.pid, signal.SIGKILL)
    # The children notice their parent died and drain (no process left behind).
    wait_until(lambda: not any(os.path.exists(f"/proc/{k}") for k in kids), 30, "children to exit")
    # The broker requeues the messages prefetched by the children's closed
    # connections on its own time: wait for the count to settle. A lost task
    # keeps the sum short, so this still fails if one is lost.
    wait_until(lambda: len(account.completed()) + queue_depth(queue_name) == len(account.tokens), 10,
               "published = completed + queued")
    start_worker(TEST, "-c", "2")
    account.wait_all()
    assert account.duplicates() == {}


def test_a_task_process_that_misses_the_supervisors_death_still_drains(start_worker, rpc_app):
    # celeriac.test.deaf clears its process's parent-death signal, as when
    # the signal comes before the process has its handlers: the process must
    # notice the supervisor is gone by itself, not consume on as an orphan.
    w = start_worker(TEST, "-c", "1", "--result-backend", "rpc://")
    pid = rpc_app.send_task("celeriac.test.deaf").get(timeout=15)
    assert pid in task_pids(w)
    os.kill(w.pid, signal.SIGKILL)

    try:
        wait_until(lambda: process_gone(pid), 15, "the deaf task process to exit")
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_task_outliving_the_shutdown_timeout_is_finished_by_the_next_worker(start_worker, rpc_app, account):
    w = start_worker(TEST, "-c", "2", "--shutdown-timeout", "1")
    early = account.send(4.0)
    w.wait_for_log(f"[{early.id}] received")
    time.sleep(0.3)
    assert w.stop() == 0
    assert f"[{early.id}] did not finish before the deadline; re-published" in w.log()
    assert account.completed() == set()
    w2 = start_worker(TEST, "-c", "2", "--acks-late", "--shutdown-timeout", "1")
    account.wait_all()
    late = account.send(4.0)
    w2.wait_for_log(f"[{late.id}] received")
    time.sleep(0.3)
    assert w2.stop() == 0
    assert f"[{late.id}] did not finish before the deadline; requeued" in w2.log()
    start_worker(TEST, "-c", "2")
    account.wait_all()
    assert account.duplicates() == {}


@pytest.mark.parametrize("acks", ["early", "late"])
def test_a_task_handed_back_at_a_pool_shrink_runs_again_on_a_sibling(start_worker, rpc_app, account, acks):
    """pool_shrink stops one process; the task it still runs at --shutdown-timeout is handed back
    (re-published, or requeued with acks_late). The sibling that receives it runs it: the
    supervisor does not take the stopped process's task for lost (it would have failed the copy
    with WorkerLostError)."""
    extra = ["--acks-late"] if acks == "late" else []
    w = start_worker(TEST, "-c", "2", "--prefetch-multiplier", "1", "--shutdown-timeout", "1", *extra)
    wait_for_consuming(w, 2)
    first, second = account.send(3.0), account.send(3.0)
    w.wait_for_log(f"[{first.id}] received")
    w.wait_for_log(f"[{second.id}] received")
    time.sleep(0.3)
    rpc_app.control.broadcast("pool_shrink", arguments={"n": 1}, destination=[node_of(w)], reply=True, timeout=5)
    wait_until(lambda: len(task_pids(w)) == 1, 20, "one task process")
    handed = "re-published" if acks == "early" else "requeued"
    assert f"did not finish before the deadline; {handed}" in w.log(), w.log()[-3000:]
    account.wait_all(timeout=30)
    time.sleep(1)
    assert account.duplicates() == {}
    assert " lost: task process" not in w.log(), w.log()[-3000:]
    assert "WorkerLostError" not in w.log(), w.log()[-3000:]


def test_hard_time_limit_kills_only_the_spinning_process(start_worker, rpc_app, account):
    w = start_worker(TEST, "-c", "2", "--result-backend", "rpc://")
    spinner = rpc_app.send_task("celeriac.test.spin", (120,), time_limit=1)
    w.wait_for_log(f"[{spinner.id}] received")
    served = [account.send(0) for _ in range(10)]
    assert all(r.get(timeout=30)["count"] == 1 for r in served), "the other process kept serving"
    with pytest.raises(TimeLimitExceeded):
        spinner.get(timeout=30)
    assert f"Hard time limit (1s) exceeded for celeriac.test.spin[{spinner.id}]" in w.log()
    wait_until(lambda: len(task_pids(w)) == 2, what="replacement process")


def test_poison_message_is_quarantined(start_worker, rpc_app, queue_name):
    declare_with_dead_letters(queue_name)
    from kombu import Exchange, Queue
    rpc_app.conf.task_queues = [Queue(queue_name, Exchange(queue_name), routing_key=queue_name,
                                      queue_arguments={"x-dead-letter-exchange": queue_name + ".dlx"})]
    w = start_worker(TEST, "-c", "2", "--acks-late", "--reject-on-worker-lost", "--max-task-deaths", "3",
                     "--result-backend", "rpc://")
    poison = rpc_app.send_task("celeriac.test.crash")
    with pytest.raises(WorkerLostError):
        poison.get(timeout=60)
    w.wait_for_log(f"[{poison.id}] killed its task process 3 times")
    wait_until(lambda: queue_depth(queue_name + ".dlq") == 1, what="poison message dead-lettered")
    assert w.log().count(f"Task celeriac.test.crash[{poison.id}] lost") == 3
    assert rpc_app.send_task("celeriac.add", (1, 2)).get(timeout=15) == 3


def test_max_tasks_per_child_recycles_without_loss(start_worker, rpc_app, account):
    w = start_worker(TEST, "-c", "1", "--max-tasks-per-child", "3", "--result-backend", "rpc://")
    results = [account.send(0) for _ in range(12)]
    pids = [r.get(timeout=30)["pid"] for r in results]
    assert len(set(pids)) >= 4, pids
    assert all(pids.count(p) <= 3 for p in set(pids)), pids
    assert account.completed() == set(account.tokens) and account.duplicates() == {}


def test_max_memory_per_child_recycles_after_the_task(start_worker, rpc_app):
    start_worker(TEST, "-c", "1", "--max-memory-per-child", "30000", "--result-backend", "rpc://")
    first = rpc_app.send_task("celeriac.test.hog", (64,)).get(timeout=30)
    second = rpc_app.send_task("celeriac.test.hog", (1,)).get(timeout=30)
    third = rpc_app.send_task("celeriac.test.hog", (1,)).get(timeout=30)
    assert first != second, "the process above the limit was replaced after its task"
    assert second == third, "a process under the limit is kept"


def test_orphans_are_reaped(start_worker, rpc_app):
    w = start_worker(TEST, "-c", "1", "--result-backend", "rpc://")
    orphan = rpc_app.send_task("celeriac.test.orphan").get(timeout=15)

    def parent_of(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return None

    wait_until(lambda: parent_of(orphan) in (w.pid, None), what="orphan re-parented to the supervisor")
    # Once it exits, the supervisor reaps it: no zombie is left.
    wait_until(lambda: not os.path.exists(f"/proc/{orphan}"), 10, "orphan reaped")
    assert w.alive()


def test_wedged_idle_process_is_replaced(start_worker, rpc_app):
    w = start_worker("-c", "1", "--child-heartbeat-timeout", "2", "--result-backend", "rpc://")
    [child] = wait_for_consuming(w, 1)
    os.kill(child, signal.SIGSTOP)
    w.wait_for_log(f"task process {child} sent no heartbeat for 2s while idle; killing it", timeout=20)
    wait_until(lambda: task_pids(w) not in ([], [child]), what="replacement process")
    assert rpc_app.send_task("celeriac.add", (2, 2)).get(timeout=15) == 4


def test_ctrl_c_reaches_only_the_supervisor(start_worker, rpc_app):
    # A terminal's Ctrl-C signals the whole foreground process group. If the
    # task processes were in it, they would see SIGINT and then the
    # supervisor's SIGTERM — a second signal, which stops running tasks.
    w = start_worker("-c", "1", "--result-backend", "rpc://")
    running = rpc_app.send_task("celeriac.sleep", (1.5,))
    w.wait_for_log(f"[{running.id}] received")
    time.sleep(0.3)
    os.killpg(w.pid, signal.SIGINT)
    assert w.proc.wait(30) == 0
    assert running.get(timeout=5) == 1.5
    assert "did not finish before the deadline" not in w.log()
    assert "second shutdown signal" not in w.log()


def voluntary_switches(pid):
    """Times the threads of `pid` went to sleep (voluntary context switches):
    each is a wake-up later."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt_switches"))
        except (OSError, StopIteration):
            continue
    return total


def main_thread_sleeps(pid):
    """Times the main thread of `pid` went to sleep."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt_switches"))


def events_published(metrics_url):
    import urllib.request
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return float(re.search(r"^celeriac_events_published_total (\S+)$", text, re.M).group(1))


def test_a_worker_heartbeat_wakes_the_control_process_once(start_worker):
    """The control process hands each worker-heartbeat to the connection
    without waiting to hear it was written: its main thread sleeps about once
    per heartbeat (its timer), where waiting cost two or three (the I/O
    thread's "written" wake-up, and the lock the two threads then contend
    for). Every heartbeat is still counted as published."""
    w = start_worker("-c", "1", "-E", "--heartbeat-interval", "0.5", "--metrics-bind", "127.0.0.1:0")
    tasks = wait_for_consuming(w, 1)
    control = [p for p in child_pids(w.pid) if p not in tasks]
    assert len(control) == 1, (control, tasks)
    url = re.search(r"metrics on (http://\S+)", w.log()).group(1)
    time.sleep(1.0)  # past worker-online and the first heartbeats
    published = events_published(url)  # the scrape wakes the control process: before the count
    time.sleep(0.2)
    before = main_thread_sleeps(control[0])
    time.sleep(10.0)
    sleeps = main_thread_sleeps(control[0]) - before
    heartbeats = events_published(url) - published
    assert heartbeats >= 10, f"{heartbeats} events published in 10 s at one heartbeat per 0.5 s"
    assert sleeps <= 1.5 * heartbeats, f"{sleeps} sleeps of the control process for {heartbeats} heartbeats"


def test_an_idle_worker_sleeps(start_worker):
    """Idle, nothing wakes on a short timer: the supervisor sleeps until a
    signal, the doorbell or its next deadline (the state file, every 2 s), a
    task process until the broker, a signal, the doorbell or its heartbeat
    (every 5 s, a timerfd: one wake-up, where tokio's timer wheel takes three),
    the control process likewise (plus worker-heartbeat events every 2 s).
    Counted as voluntary context switches, not time, so a
    loaded machine does not make it fail: a 100 ms supervisor tick was 10 a
    second, a task process's 250 ms consumer rotation 4 to 8."""
    w = start_worker("-c", "2")
    tasks = wait_for_consuming(w, 2)
    control = [p for p in child_pids(w.pid) if p not in tasks]
    assert len(control) == 1, (control, tasks)
    time.sleep(1.0)  # past the start: first beats, first worker-heartbeat
    procs = [w.pid, *tasks, *control]
    before, start = {p: voluntary_switches(p) for p in procs}, time.monotonic()
    time.sleep(11.0)  # two task-process heartbeats at least
    after, took = {p: voluntary_switches(p) for p in procs}, time.monotonic() - start
    rate = {p: (after[p] - before[p]) / took for p in procs}
    assert task_pids(w) == tasks, "the processes measured lived throughout"
    assert rate[w.pid] < 4, f"supervisor: {rate[w.pid]:.1f} wake-ups/s"
    for p in tasks:
        assert rate[p] < 2.5, f"task process {p}: {rate[p]:.1f} wake-ups/s"
    assert rate[control[0]] < 6, f"control process: {rate[control[0]]:.1f} wake-ups/s"
