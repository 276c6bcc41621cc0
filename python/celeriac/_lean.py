"""The lean trace path: Celery's tracer without the steps a call provably does not need.

celeriac runs every Python task through the tracer Celery's worker builds for it
(``celery.app.trace.build_tracer``). For a plain task, much of what that tracer does per
call is bookkeeping whose outcome is known at load time or from the request: a task
without a custom ``before_start``, ``on_success`` or ``after_return``; a request without
link callbacks, a chain, a chord or a started state to store. For such calls
:func:`build` gives a tracer that does only the steps with an effect, in the order
Celery's tracer does them, with the values that tracer was built with (read from its
closure: the function it calls, its signal receiver lists, its loader hooks):

- the request's ``Context`` is built without copying the request a second time to find
  its custom headers (:func:`context` gives what ``Context(...)`` gives);
- ``task_prerun``, ``task_success`` and ``task_postrun`` are sent when they have
  receivers; the loader's and the backend's per-task hooks are called when they are not
  Celery's empty ones;
- the result is stored by the backend's ``mark_as_done``, as the tracer does; a result of
  ``None`` is shown as ``"None"`` without calling ``saferepr``.

Whatever else can happen is handed to a second tracer Celery builds for the task (the
*fallback*), so that Celery's own code handles it with the context the task saw:

- the task raised (a failure, ``Retry``, ``Reject``, ``Ignore``, a soft time limit): the
  fallback's function re-raises that exception, with the frames the task's code added,
  from native code, so the traceback stored and sent is the one ``celery worker`` gives
  (its tracer's frame, then the task's);
- storing the result failed (a value the serializer cannot encode, the backend down):
  the fallback's function returns the value, and the tracer stores it, fails the same
  way and handles it as Celery does.

The fallback sends no ``task_prerun`` (the lean path already has). An error outside the
task's body (a soft time limit that fires just after the task returned) is reported as
Celery's tracer reports it, an internal error and FAILURE, with one difference: the stored
traceback starts at the lean path's frame, not at ``trace_task``. Any call that does not
fit goes through Celery's tracer unchanged. ``tests/interop/test_lean_trace.py`` runs the
same requests through both and compares every outcome; the differential suites run the
lean path against ``celery worker``.
"""

from celery.app.task import Context
from celery.states import SUCCESS

from celeriac._native import Outcome

# What Celery's tracer reads from its closure; a Celery without one of these gets no lean path.
_TRACER_VARS = (
    "fun", "task", "eager", "on_error", "monotonic", "push_task", "pop_task", "push_request",
    "pop_request", "prerun_receivers", "postrun_receivers", "success_receivers", "loader_task_init",
    "loader_cleanup", "task_before_start", "task_on_success", "task_after_return",
    "deduplicate_successful_tasks", "_does_info", "resultrepr_maxsize",
)

# The keys Context._get_custom_headers drops: Context's own attributes and four message fields.
_CELERY_KEYS = frozenset({*Context.__dict__.keys(), "lang", "task", "argsrepr", "kwargsrepr", "compression"})


def context(request, args, kwargs):
    """``Context(request, args=args, called_directly=False, kwargs=kwargs)``, with its custom
    headers found in one pass over ``request`` instead of a copy and a pop per Celery key."""
    ctx = Context.__new__(Context)
    ctx.update(request, args=args, called_directly=False, kwargs=kwargs)
    if ctx.headers is None:
        ctx.headers = {k: v for k, v in request.items() if k not in _CELERY_KEYS} or None
    return ctx


def _closure(tracer):
    names = tracer.__code__.co_freevars
    return {name: cell for name, cell in zip(names, tracer.__closure__ or ())}


def _is_empty(method, base_method):
    return getattr(method, "__func__", None) is base_method


def build(name, task, app, hostname, full):
    """The lean tracer of ``task``, called as Celery's (``tracer(uuid, args, kwargs, request)``),
    and ``None``; or ``None`` and why every call of the task needs ``full``, the tracer Celery
    built for it. Never raises: the lean path is only ever a shortcut."""
    try:
        return _build(name, task, app, hostname, full)
    except Exception as exc:
        return None, f"building it failed: {exc!r}"


def _build(name, task, app, hostname, full):
    from celery import signals
    from celery.app import trace
    from celery.app.trace import build_tracer, get_actual_ignore_result, logger
    from celery.exceptions import Reject
    from celery.backends.base import BaseBackend
    from celery.loaders.base import BaseLoader
    from celery.utils.saferepr import saferepr

    report_internal_error = getattr(trace, "report_internal_error", None)
    signal_internal_error = getattr(trace, "_signal_internal_error", None)
    if report_internal_error is None or signal_internal_error is None:
        return None, "Celery's tracer has no report_internal_error or _signal_internal_error"
    cells = _closure(full)
    missing = [v for v in _TRACER_VARS if v not in cells]
    if missing:
        return None, "Celery's tracer has no " + ", ".join(missing)
    v = {k: cells[k].cell_contents for k in _TRACER_VARS}
    if v["task"] is not task or v["eager"]:
        return None, "not this task's worker tracer"
    for hook in ("task_before_start", "task_on_success", "task_after_return"):
        if v[hook] is not None:
            return None, "a custom " + hook.removeprefix("task_")
    if v["_does_info"]:
        return None, "Celery's tracer logs each success itself"
    if not _is_empty(v["loader_task_init"], BaseLoader.on_task_init):
        return None, "the loader's on_task_init"
    backend_type = type(task.backend)
    if backend_type.mark_as_done is not BaseBackend.mark_as_done:
        return None, "the result backend's own mark_as_done"

    # The fallback: Celery's tracer for this task, its function given by `outcome` and its
    # task_prerun left to the lean path (which sent it before the task ran).
    fallback = build_tracer(name, task, app.loader, hostname, app=app)
    fcells = _closure(fallback)  # the same names as `full`'s, checked above
    outcome = Outcome()
    fcells["fun"].cell_contents = outcome
    fcells["prerun_receivers"].cell_contents = []

    fun = v["fun"]
    on_error = v["on_error"]
    monotonic = v["monotonic"]
    push_task, pop_task = v["push_task"], v["pop_task"]
    push_request, pop_request = v["push_request"], v["pop_request"]
    prerun_receivers = v["prerun_receivers"]
    postrun_receivers = v["postrun_receivers"]
    success_receivers = v["success_receivers"]
    loader_cleanup = v["loader_cleanup"]
    cleanup_loader = not _is_empty(loader_cleanup, BaseLoader.on_process_cleanup)
    cleanup_backend = backend_type.process_cleanup is not BaseBackend.process_cleanup
    dedup = v["deduplicate_successful_tasks"]
    maxsize = v["resultrepr_maxsize"]
    track = bool(task.track_started)
    send_prerun = signals.task_prerun.send
    send_postrun = signals.task_postrun.send
    send_success = signals.task_success.send

    def cleanup():
        # As Celery's tracer, after every call (Celery's own hooks do nothing).
        try:
            if cleanup_backend:
                task.backend.process_cleanup()
            if cleanup_loader:
                loader_cleanup()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            logger.error("Process cleanup failed: %r", exc, exc_info=True)

    def lean(uuid, args, kwargs, request):
        time_start = monotonic()
        if type(kwargs) is not dict or not request:
            return full(uuid, args, kwargs, request)
        get = request.get
        if get("callbacks") or get("chain") or get("chord"):
            return full(uuid, args, kwargs, request)
        try:
            ctx = context(request, args, kwargs)
            ignore_result = get_actual_ignore_result(task, ctx)
        except Exception:
            # Celery's tracer reports what is wrong with the request.
            return full(uuid, args, kwargs, request)
        if track and not ignore_result:
            return full(uuid, args, kwargs, request)
        if dedup and ctx.delivery_info and ctx.delivery_info.get("redelivered", False):
            return full(uuid, args, kwargs, request)
        R = retval = state = Rstr = T = None
        caught = None
        try:
            push_task(task)
            push_request(ctx)
            try:
                if prerun_receivers:
                    send_prerun(sender=task, task_id=uuid, task=task, args=args, kwargs=kwargs)
                try:
                    R = retval = fun(*args, **kwargs)
                    state = SUCCESS
                except Exception as exc:
                    # For Celery's tracer to handle, from its own frame: without this one.
                    tb = exc.__traceback__
                    caught = exc.with_traceback(tb.tb_next if tb is not None else None)
                    del tb
                else:
                    try:
                        task.backend.mark_as_done(uuid, retval, ctx, not ignore_result)
                    except Exception:
                        # Celery's tracer stores it again, fails the same way and says so.
                        caught = _STORE_FAILED
                    else:
                        # saferepr(None) is "None" (held by the tests), at a tenth of the cost.
                        Rstr = "None" if R is None else saferepr(R, maxsize)
                        if success_receivers:
                            T = monotonic() - time_start
                            send_success(sender=task, result=retval, runtime=T)
            finally:
                if caught is None:
                    try:
                        if postrun_receivers:
                            send_postrun(sender=task, task_id=uuid, task=task, args=args, kwargs=kwargs,
                                         retval=retval, state=state)
                    finally:
                        pop_task()
                        pop_request()
                        cleanup()
                else:
                    pop_task()
                    pop_request()
        except (MemoryError, Reject):
            raise
        except Exception as exc:
            # As Celery's tracer, an error outside the task's body (a soft time limit that fires
            # just after the task returned): reported as an internal error, the task FAILURE. The
            # stored traceback starts at this frame rather than at Celery's trace_task.
            signal_internal_error(task, uuid, args, kwargs, request, exc)
            R = report_internal_error(task, exc)
            return R, on_error(ctx, exc)[0], T, Rstr
        if caught is None:
            return R, None, T, Rstr
        if caught is _STORE_FAILED:
            outcome.give(retval)
        else:
            outcome.throw(caught)
        del caught
        try:
            return fallback(uuid, args, kwargs, ctx.__dict__)
        finally:
            outcome.clear()

    return lean, None


_STORE_FAILED = object()
