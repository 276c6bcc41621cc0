"""The Python half of ``celeriac -A <app> worker``.

celeriac's Rust worker calls these functions; nothing here is public API.

- :func:`load` runs once in the supervisor, before anything forks: it finds
  the app as ``celery -A`` does, imports its task modules, fires the
  worker-level signals Celery's main process fires, and reports the app's
  tasks and the worker settings its configuration gives.
- :func:`process_started` runs in each task process after the fork, as
  Celery's ``process_initializer`` does in a pool process.
- :func:`run` runs one task through Celery's own tracer
  (``celery.app.trace.build_tracer``), so signals, retries, result storage,
  canvas follow-ups and chords behave exactly as under ``celery worker``.
  The Rust side acknowledges the message and sends the task events.
"""

import datetime
import json
import logging
import multiprocessing
import multiprocessing.util
import numbers
import os
import signal
import sys
import traceback

# The per-task path's imports, at module level (this module is imported once,
# in the supervisor, only for `-A`).
from celery import states
from kombu.utils.json import loads

# Filled by load() in the supervisor, inherited by every forked process.
_app = None
_hostname = None
_worker = None


class LoadError(Exception):
    """Why the app cannot be loaded, as one line."""


class _WorkerStandIn:
    """What worker-level signal receivers get as ``sender``: the node's
    ``app``, ``hostname``, ``pid``, ``concurrency``, ``pool_cls`` (the
    prefork pool's class: Celery's Django fixup reads it to close database
    connections and pools around the fork) and the logging and recycling
    settings. celeriac's worker is not Celery's ``WorkController``; handlers
    that reach into ``pool`` or ``consumer`` internals find nothing there."""

    def __init__(self, app, hostname, options):
        from celery.concurrency.prefork import TaskPool

        self.app = app
        self.hostname = hostname
        self.pid = os.getpid()
        self.concurrency = options.get("concurrency")
        self.pool_cls = TaskPool
        self.loglevel = options.get("loglevel") or "WARNING"
        self.logfile = None
        self.pool = None
        self.consumer = None

    def __repr__(self):
        return f"<celeriac worker {self.hostname}>"


def _one_line(exc):
    """``Type: message`` plus where it was raised, on one line."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {last.filename}:{last.lineno})"
    return text


def _find_app(name):
    from celery.app.utils import find_app

    module = name.split(":", 1)[0]
    try:
        return find_app(name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name in (name, module) or module.startswith(exc.name + ".")):
            raise LoadError(f"cannot import {module}: the module {exc.name} was not found") from None
        raise LoadError(f"cannot import {module}: {_one_line(exc)}") from None
    except AttributeError as exc:
        raise LoadError(f"no Celery app in {name}: {exc}") from None
    except Exception as exc:  # anything the app's import raises
        raise LoadError(f"cannot import {module}: {_one_line(exc)}") from None


def _os_threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _threads_check(source, known):
    """Refuses, in one line naming ``source``, threads started in the
    supervisor (it forks task processes at any time, and a fork keeps only
    the forking thread). Returns the Python threads now alive."""
    import threading
    import time

    current = threading.main_thread()
    extra = _os_threads() - 1
    # A thread just joined (a connection pool closed before the fork) is
    # still listed by the kernel for a moment after join() returns: give
    # such threads up to a second to go.
    deadline = time.monotonic() + 1.0
    while extra > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
        extra = _os_threads() - 1
    alive = {t for t in threading.enumerate() if t is not current}
    if extra <= 0:
        return alive
    new = sorted(t.name for t in alive - known)
    named = f" ({', '.join(new)})" if new else ""
    raise LoadError(
        f"{source} started {extra} thread(s){named} in the worker's main process, which forks its task "
        "processes at any time; start them in a worker_process_init handler instead (a database "
        "connection pool: open it lazily, or close it before the fork as Django's pool is closed; "
        "for numpy/OpenBLAS set OPENBLAS_NUM_THREADS=1 or OMP_NUM_THREADS=1)"
    )


def _close_before_fork(app):
    """What Celery's Django fixup does in a prefork worker's main process,
    done before the first fork: close the database connections and Django's
    connection pools (their threads) that worker_init receivers opened;
    each task process opens its own."""
    for fixup in getattr(app, "_fixups", None) or ():
        worker_fixup = getattr(fixup, "worker_fixup", None)
        if worker_fixup is None or not hasattr(worker_fixup, "_close_database"):
            continue
        worker_fixup._close_database()
        worker_fixup.close_cache()


def _per_second(rate):
    """Celery's rate limit (``10/s``, ``5/m``, ``100/h``, a number) in tasks/s."""
    if rate is None or rate == "":
        return None
    from celery.utils.time import rate as celery_rate

    value = celery_rate(rate)
    return float(value) if value else None


def _seconds(value):
    return float(value) if value else None


def _task_options(task):
    max_retries = task.max_retries
    return {
        "acks_late": bool(task.acks_late),
        "reject_on_worker_lost": task.reject_on_worker_lost,
        "ignore_result": bool(task.ignore_result),
        "track_started": bool(task.track_started),
        "max_retries": max_retries if max_retries is None else int(max_retries),
        "default_retry_delay": float(task.default_retry_delay or 0),
        "time_limit": _seconds(task.time_limit),
        "soft_time_limit": _seconds(task.soft_time_limit),
        "rate_limit": _per_second(task.rate_limit),
    }


_EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")


def _plain(value):
    """A declaration argument as JSON (kombu sends ints, floats, strings,
    booleans, lists and dicts; bytes become text as AMQP long strings)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _exchange_spec(exchange, where):
    if exchange is None:
        return {"name": "", "type": "direct", "durable": True, "auto_delete": False, "arguments": {}, "no_declare": True}
    kind = exchange.type or "direct"
    if kind not in _EXCHANGE_TYPES:
        raise LoadError(
            f"{where}: its exchange {exchange.name!r} is of type {kind!r}; celeriac consumes through "
            + ", ".join(_EXCHANGE_TYPES[:-1])
            + f" and {_EXCHANGE_TYPES[-1]} exchanges"
        )
    name = exchange.name or ""
    return {
        "name": name,
        "type": kind,
        "durable": bool(exchange.durable),
        "auto_delete": bool(exchange.auto_delete),
        "arguments": _plain(dict(exchange.arguments or {})),
        # As kombu: the default exchange and amq.* are never declared.
        "no_declare": bool(exchange.no_declare) or not name or name.startswith("amq."),
    }


def _queue_spec(queue):
    """The queue as kombu declares it from the app's definition: its
    arguments (including those kombu derives from ``expires``,
    ``message_ttl``, ``max_length``…), flags, exchange, bindings and
    consumer arguments."""
    import copy

    from kombu.transport.base import to_rabbitmq_queue_arguments

    # The copy kombu's consumer binds and declares: a queue with bindings
    # loses the exchange Celery's queue table gave it.
    queue = copy.copy(queue)
    where = f"queue {queue.name!r}"
    args = to_rabbitmq_queue_arguments(
        dict(queue.queue_arguments or {}),
        expires=queue.expires,
        message_ttl=queue.message_ttl,
        max_length=queue.max_length,
        max_length_bytes=queue.max_length_bytes,
        max_priority=queue.max_priority,
    )
    args = _plain(args)
    # Only quorum changes what the worker does (native delayed delivery, as
    # Celery's detect_quorum_queues); any other type stays a plain argument.
    queue_type = args.pop("x-queue-type") if args.get("x-queue-type") == "quorum" else None
    priority = args.pop("x-max-priority", None)
    bindings = [
        {
            "exchange": _exchange_spec(b.exchange, where),
            "routing_key": b.routing_key or "",
            "arguments": _plain(dict(b.arguments or {})),
        }
        for b in (queue.bindings or ())
    ]
    return {
        "name": queue.name,
        "exchange": _exchange_spec(queue.exchange, where),
        "routing_key": queue.routing_key if queue.routing_key is not None else queue.name,
        "queue_type": queue_type,
        "max_priority": int(priority) if priority else None,
        "queue_arguments": args,
        "durable": bool(queue.durable),
        "auto_delete": bool(queue.auto_delete),
        "exclusive": bool(queue.exclusive),
        "no_declare": bool(queue.no_declare),
        "binding_arguments": _plain(dict(queue.binding_arguments or {})),
        "consumer_arguments": _plain(dict(queue.consumer_arguments or {})),
        "bindings": bindings,
    }


def _options(app, given):
    """The worker options the app's configuration gives, as command-line
    words; the command line and the environment win over them (Rust)."""
    conf = app.conf
    words = []

    def value(flag, key):
        v = conf.get(key)
        if v not in (None, "", 0):
            words.append(f"{flag}={v}")

    def flag(flag, key):
        if conf.get(key):
            words.append(flag)

    from celeriac import _settings

    if conf.broker_url:
        # With the heartbeat and connect timeout the settings give, in its query.
        words.append(f"--broker={_settings.broker_url(conf)}")
    backend = conf.result_backend
    if backend and str(backend).split(":", 1)[0].lower() in ("rpc", "redis", "rediss"):
        words.append(f"--result-backend={backend}")
    value("--concurrency", "worker_concurrency")
    if conf.get("worker_prefetch_multiplier") not in (None, ""):
        words.append(f"--prefetch-multiplier={conf.worker_prefetch_multiplier}")  # 0: no limit, as Celery
    value("--time-limit", "task_time_limit")
    value("--soft-time-limit", "task_soft_time_limit")
    value("--max-tasks-per-child", "worker_max_tasks_per_child")
    value("--max-memory-per-child", "worker_max_memory_per_child")
    value("--eta-limit", "worker_eta_task_limit")
    flag("--acks-late", "task_acks_late")
    flag("--track-started", "task_track_started")
    flag("--reject-on-worker-lost", "task_reject_on_worker_lost")
    flag("--task-events", "worker_send_task_events")
    words += _settings.words(conf)
    if not given["queues_given"]:
        names = list(app.amqp.queues.consume_from or app.amqp.queues)
        if names:
            words.append("--queues=" + ",".join(names))
    return words


def load(options_json):
    """Loads the app (in the supervisor). Returns the app's tasks and
    settings as JSON; raises :class:`LoadError` with one line."""
    global _app, _hostname, _worker
    options = json.loads(options_json)
    name = options["app"]
    # What `celery` does before it imports the app.
    for key, var in (
        ("broker", "CELERY_BROKER_URL"),
        ("result_backend", "CELERY_RESULT_BACKEND"),
        ("loader", "CELERY_LOADER"),
        ("config_module", "CELERY_CONFIG_MODULE"),
    ):
        if options.get(key):
            os.environ[var] = options[key]
    if options.get("skip_checks"):
        os.environ["CELERY_SKIP_CHECKS"] = "true"
    app = _find_app(name)
    from celery import Celery

    if not isinstance(app, Celery):
        raise LoadError(f"{name} is {type(app).__name__}, not a Celery app")
    from celery import signals
    from celery.app import trace

    hostname = options["hostname"]
    try:
        from celeriac._settings import refusal, task_refusal

        # Every setting celeriac does not serve, in one line (worker_pool and the serializers too).
        reason = refusal(app.conf, options, getattr(app, "namespace", None))
        if reason:
            raise LoadError(reason)
        signals.celeryd_init.send(sender=hostname, instance=None, conf=app.conf, options=options)
        app.loader.init_worker()
        includes = options.get("include") or []
        if includes:
            app.conf.include = tuple(set(app.conf.include or ()) | set(includes))
            for module in includes:
                app.loader.import_task_module(module)
        app.finalize(auto=True)
        # What `celery worker` writes into the settings (`inspect conf` and the bug report show
        # them): every task module in `include`, and the prefetch switch its command line has.
        app.conf.worker_disable_prefetch = app.conf.worker_disable_prefetch
        app.conf.include = tuple(set(app.conf.include or ()) | {type(t).__module__ for t in app.tasks.values()})
        reason = task_refusal(app, getattr(app, "namespace", None))
        if reason:
            raise LoadError(reason)
        trace.setup_worker_optimizations(app, hostname)
        queues = app.amqp.queues
        if options.get("queues"):
            queues.select(options["queues"])
        if options.get("exclude_queues"):
            for q in options["exclude_queues"]:
                queues.deselect(q)
        level = options.get("loglevel") or "WARNING"
        # As Celery's worker: print() and stray writes to stdout/stderr become
        # log records (worker_redirect_stdouts, at worker_redirect_stdouts_level).
        app.log.setup(
            logging.getLevelName(level.upper()),
            None,
            redirect_stdouts=bool(app.conf.worker_redirect_stdouts),
            redirect_level=app.conf.worker_redirect_stdouts_level or "WARNING",
            hostname=hostname,
        )
        if options.get("log_format") == "json":
            _json_logs(hostname)
        # celeriac reports each outcome itself; Celery's tracer lines would be duplicates.
        logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL + 1)
        # Warm up what every task process would otherwise build for itself
        # after the fork (private pages): the tracers, the backend object
        # and the modules the first task imports.
        from celery.app.trace import build_tracer
        from celery.worker import state as _state  # noqa: F401
        import billiard.exceptions  # noqa: F401
        import billiard.pool  # noqa: F401 (the soft limit's handler)

        app.amqp.router  # noqa: B018
        try:
            app.backend  # noqa: B018 (imports the backend's client library, opens nothing)
        except Exception as exc:
            raise LoadError(f"the result backend {app.conf.result_backend!r}: {_one_line(exc)}") from None
        for task_name, task in app.tasks.items():
            task.__trace__ = build_tracer(task_name, task, app.loader, hostname, app=app)
        _lean_paths(app, hostname)
        tasks = []
        for task_name, task in sorted(app.tasks.items()):
            tasks.append({"name": task_name, **_task_options(task)})
        result = {
            "options": _options(app, options),
            "queues": [_queue_spec(q) for q in queues.consume_from.values()] if queues.consume_from else [],
            "tasks": tasks,
            "description": f"{app.main or '__main__'}:{id(app):#x}",
            "control_commands": _control_commands(),
        }
        _app, _hostname = app, hostname
        _worker = _WorkerStandIn(app, hostname, options)
        started = _threads_check("importing the app", set())
        signals.worker_init.send(sender=_worker)
        signals.celeryd_after_setup.send(sender=hostname, instance=_worker, conf=app.conf)
        _close_before_fork(app)
        _threads_check("a worker_init or celeryd_after_setup receiver", started)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"loading the app failed: {_one_line(exc)}") from None
    # Objects alive now are shared by every forked process: keep the
    # collector from touching (and so copying) their pages.
    import gc

    gc.collect()
    gc.freeze()
    return json.dumps(result)


class _JsonFormatter(logging.Formatter):
    """The app's log records as celeriac's JSON lines (``--log-format json``)."""

    def __init__(self, hostname):
        super().__init__()
        self.hostname = hostname

    def format(self, record):
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {
            "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname,
            "process": record.processName,
            "hostname": self.hostname,
            "pid": record.process,
            "message": record.getMessage(),
            "logger": record.name,
        }
        for key in ("task_id", "task_name"):
            value = getattr(record, key, None)
            if value and value != "???":
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _json_logs(hostname):
    from celery._state import get_current_task

    class TaskFields(logging.Filter):
        def filter(self, record):
            task = get_current_task()
            if task is not None and task.request and task.request.id:
                record.task_id, record.task_name = task.request.id, task.name
            return True

    for logger in (logging.getLogger(), logging.getLogger("celery.task")):
        for handler in logger.handlers:
            handler.setFormatter(_JsonFormatter(hostname))
            handler.addFilter(TaskFields())


def process_started(index):
    """What Celery's ``process_initializer`` does in a pool process."""
    from celery import signals
    from celery._state import _set_task_join_will_block, set_default_app
    from celery.app import trace
    from celery.app.trace import build_tracer
    from celery.worker import state as worker_state

    app = _app
    multiprocessing.util._run_after_forkers()
    multiprocessing.current_process().name = f"ForkPoolWorker-{index + 1}"
    from billiard.pool import soft_timeout_sighandler

    # As billiard does in a pool process: SIGUSR1 raises SoftTimeLimitExceeded
    # (celeriac sends it to this, the main, thread only while a task runs).
    signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    _set_task_join_will_block(True)
    app.loader.init_worker()
    app.loader.init_worker_process()
    app.set_current()
    set_default_app(app)
    app.finalize()
    trace._tasks = app._tasks
    # The tracers were built before the fork (load); build only those of
    # tasks registered since (by worker_process_init handlers, say).
    for name, task in app.tasks.items():
        if getattr(task, "__trace__", None) is None:
            task.__trace__ = build_tracer(name, task, app.loader, _hostname, app=app)
            task.__lean__ = None
    _lean_paths(app, _hostname)
    worker_state.reset_state()
    signals.worker_process_init.send(sender=_hostname)


def process_ending(code):
    """Before a task process exits by itself (drained, recycled)."""
    from celery import signals

    try:
        signals.worker_process_shutdown.send(sender=_hostname, pid=os.getpid(), exitcode=code)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


# Remote-control commands that read the app: its settings, its tasks' attributes, a bug report.
_APP_READING_COMMANDS = ("conf", "dump_conf", "report", "registered", "dump_tasks")


def _control_commands():
    """The remote-control commands the app answers in the control process: those that read the
    app, and every handler registered with ``@control_command``/``@inspect_command`` outside
    Celery's own module (by the app or a library it imports)."""
    from celery.worker.control import Panel

    names = set(_APP_READING_COMMANDS)
    names.update(name for name, handler in Panel.data.items()
                 if getattr(handler, "__module__", None) != "celery.worker.control")
    return sorted(names)


class _NoConsumer:
    """``state.consumer`` in a remote-control handler: celeriac's worker has no Celery consumer."""

    def __getattr__(self, name):
        raise AttributeError(f"celeriac's worker has no Celery consumer: state.consumer.{name} "
                             "is not available to remote-control handlers")

    def __repr__(self):
        return "<celeriac: no Celery consumer>"


def control(method, arguments_json):
    """Runs the remote-control handler ``method`` (in the control process, which never forks) as
    Celery's worker does: ``handler(state, **arguments)``, an exception becoming ``{"error":
    repr(exc)}`` and a log line with its traceback. Returns the reply as JSON."""
    from celery.utils.collections import AttributeDict
    from celery.worker.control import Panel
    from kombu.utils.json import dumps

    try:
        handler = Panel.data[method]
        state = AttributeDict(app=_app, hostname=_hostname, consumer=_NoConsumer(), tset=set)
        reply = handler(state, **(json.loads(arguments_json) or {}))
        return dumps(reply)
    except Exception as exc:
        logging.getLogger("kombu.pidbox").error("pidbox command error: %r", exc, exc_info=True)
        return json.dumps({"error": repr(exc)})


def revoked_elsewhere(tasks_json):
    """Revoked tasks no task process runs (in the control process): as Celery's worker does, the
    result backend (the task's own when its name is known) records each REVOKED unless its state
    says it ended (a ready state) or another worker started it (any state but PENDING, RECEIVED,
    RETRY and REJECTED)."""
    waiting = (states.PENDING, states.RECEIVED, states.RETRY, states.REJECTED)
    logger = logging.getLogger("celery.worker.control")
    for task_id, name in json.loads(tasks_json):
        task = _app.tasks.get(name) if name else None
        backend = task.backend if task is not None else _app.backend
        try:
            state = backend.get_state(task_id)
            if state not in waiting:  # ended (a ready state), or started by another worker
                continue
            backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
        except Exception as exc:
            logger.warning("Failed to mark task %s as revoked in backend: %s", task_id, exc)


def worker_ready():
    from celery import signals

    signals.worker_ready.send(sender=_worker)


def worker_shutting_down():
    """A warm shutdown begins (SIGTERM or SIGINT to the worker), as Celery announces it."""
    from celery import signals

    signals.worker_shutting_down.send(sender=_hostname, sig="SIGTERM", how="Warm", exitcode=0)


def worker_stopped():
    from celery import signals

    signals.worker_shutdown.send(sender=_worker)


def _exception(exc, tb):
    from kombu.utils.encoding import safe_repr

    info = {"repr": safe_repr(exc), "traceback": tb or ""}
    try:
        prepared = _app.backend.prepare_exception(exc, "json")
        json.dumps(prepared["exc_message"])
        info.update(
            exc_type=prepared["exc_type"],
            exc_module=prepared["exc_module"],
            exc_message=prepared["exc_message"],
        )
    except Exception:
        info.update(
            exc_type=type(exc).__name__,
            exc_module=type(exc).__module__,
            exc_message=[safe_repr(exc)],
        )
    return info


def _countdown(when):
    if isinstance(when, numbers.Real):
        return float(when)
    if isinstance(when, datetime.datetime):
        now = datetime.datetime.now(when.tzinfo)
        return max((when - now).total_seconds(), 0.0)
    return None


def _request(req):
    """Celery's request dict from the worker's JSON (see run())."""
    args, kwargs, embed = req.pop("args"), req.pop("kwargs"), req.pop("embed")
    request = req["headers"]
    # Celery's message properties carry every header again.
    req["properties"]["application_headers"] = dict(request)
    request.update(
        properties=req["properties"],
        reply_to=req["properties"].get("reply_to"),
        correlation_id=req["properties"].get("correlation_id"),
        hostname=_hostname,
        delivery_info=req["delivery_info"],
    )
    request.update({"args": args, "kwargs": kwargs, "hostname": _hostname, "is_eager": False}, **(embed or {}))
    return request, args, kwargs


def _rebuilt(end):
    """The exception the worker reported, as its class (ints kept ints)."""
    import importlib

    args = [int(a) if isinstance(a, float) and a.is_integer() else a for a in end.get("exc_message") or []]
    try:
        cls = getattr(importlib.import_module(end["exc_module"]), end["exc_type"])
        return cls(*args)
    except Exception:
        from celery.utils.serialization import create_exception_cls

        return create_exception_cls(end["exc_type"], end["exc_module"])(*args)


def settle_elsewhere(name, task_id, payload):
    """What Celery's main process does for a task that ended outside its
    run: its process died or hit the hard limit (FAILURE, errbacks and the
    chord error path, ``task_failure``), or it was revoked (REVOKED,
    ``task_revoked``)."""
    from celery import signals
    from celery.app.task import Context

    task = _app.tasks.get(name)
    if task is None:
        return _unregistered(name, task_id, loads(payload))
    req = loads(payload)
    end, store = req.pop("end"), req.pop("store_result")
    request, args, kwargs = _request(req)
    context = Context(request)
    store = store or bool(task.store_errors_even_if_ignored)
    if end["kind"] == "failed":
        exc = _rebuilt(end)
        task.backend.mark_as_failure(task_id, exc, request=context, store_result=store)
        task.request_stack.push(context)
        try:
            signals.task_failure.send(
                sender=task, task_id=task_id, exception=exc, args=args, kwargs=kwargs, traceback=None, einfo=None
            )
        finally:
            task.request_stack.pop()
    else:
        task.backend.mark_as_revoked(task_id, end["reason"], request=context, store_result=store)
        signals.task_revoked.send(
            sender=task,
            request=context,
            terminated=end["reason"] == "terminated",
            signum=end["signum"],
            expired=end["reason"] == "expired",
        )
    return True


def _unregistered(name, task_id, req):
    """What Celery's consumer does with a task the app does not know: a
    FAILURE (``NotRegistered``) stored by the app's backend, with none of the
    message's errbacks or chord."""
    from celery.app.task import Context

    end = req.get("end") or {}
    if end.get("kind") != "failed":
        return False
    headers = req.get("headers") or {}
    properties = req.get("properties") or {}
    request = Context(
        id=task_id,
        task=name,
        name=name,
        chord=None,
        errbacks=None,
        root_id=headers.get("root_id"),
        correlation_id=properties.get("correlation_id") or task_id,
        reply_to=properties.get("reply_to"),
    )
    _app.backend.mark_as_failure(task_id, _rebuilt(end), request=request)
    return True


def run(name, task_id, payload):
    """Runs one task whose request holds kombu typed values (mappings keyed
    ``__type__``), given as JSON text: kombu's decoder turns them into the
    objects Celery's worker would hand the task. See :func:`run_request`."""
    return _run(name, task_id, _request(loads(payload)))


def run_request(name, task_id, req):
    """Runs one task through Celery's tracer, its request given as the
    objects JSON decoding would give (built by the Rust side from the
    decoded message). Returns ``(True, repr)`` when it succeeded (``repr`` of
    its value, ``None`` when Celery gives none), else ``(False, outcome as
    JSON)``."""
    return _run(name, task_id, _request(req))


def _lean_paths(app, hostname):
    """Gives each task without one its lean trace path (``celeriac._lean``), where it can
    have one (``CELERIAC_LEAN_TRACE=0`` in the environment: none); says at DEBUG, in one line,
    which tasks go through Celery's tracer unchanged and why."""
    from celeriac import _lean

    switched_off = os.environ.get("CELERIAC_LEAN_TRACE") == "0"
    built, refused = 0, []
    for name, task in sorted(app.tasks.items()):
        if getattr(task, "__lean__", None) is not None or getattr(task, "__trace__", None) is None:
            continue
        if switched_off:
            lean, why = None, "CELERIAC_LEAN_TRACE=0"
        else:
            lean, why = _lean.build(name, task, app, hostname, task.__trace__)
        task.__lean__ = False if lean is None else lean
        if lean is None:
            refused.append(f"{name} ({why})")
        else:
            built += 1
    if built or refused:
        logging.getLogger("celeriac.lean").debug(
            "the lean trace path for %d task(s); every call through Celery's tracer: %s",
            built, ", ".join(refused) or "none")


def _run(name, task_id, prepared):
    request, args, kwargs = prepared
    task = _app._tasks[name]
    try:
        R, I, T, Rstr = (getattr(task, "__lean__", None) or task.__trace__)(task_id, args, kwargs, request)
    except SystemExit as exc:
        # A task that exits its process ends it, as in a pool process; the
        # worker reports WorkerLostError with the exit code.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        _exit(code)
    except BaseException:
        traceback.print_exc()
        _exit(1)
    if I is None:
        return True, Rstr
    state, exc = I.state, I.retval
    tb = getattr(R, "traceback", "") or ""
    if state == states.RETRY:
        inner = getattr(exc, "exc", None)
        out = {"state": "RETRY", "countdown": _countdown(getattr(exc, "when", None))}
        out["exc"] = _exception(inner, tb)
        if inner is None:
            out["exc"]["repr"] = "None"
        return False, json.dumps(out)
    if state == states.REJECTED:
        requeue = bool(getattr(exc, "requeue", False))
        if not requeue:
            _rejected_for_good(task, task_id, request, exc, R)
        return False, json.dumps(
            {"state": "REJECTED", "requeue": requeue, "reason": str(getattr(exc, "reason", exc)), "traceback": tb}
        )
    if state == states.IGNORED:
        return False, json.dumps({"state": "IGNORED"})
    return False, json.dumps({"state": "FAILURE", "exc": _exception(exc, tb)})


def _rejected_for_good(task, task_id, request, exc, einfo):
    """What Celery's main process does for ``Reject(requeue=False)``:
    FAILURE stored and ``task_failure`` sent."""
    from celery import signals
    from celery.app.task import Context

    context = Context(request)
    store = not task.ignore_result or task.store_errors_even_if_ignored
    task.backend.mark_as_failure(task_id, exc, request=context, store_result=store)
    signals.task_failure.send(
        sender=task,
        task_id=task_id,
        exception=exc,
        args=request.get("args"),
        kwargs=request.get("kwargs"),
        traceback=getattr(einfo, "traceback", None),
        einfo=einfo,
    )


def _exit(code):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
