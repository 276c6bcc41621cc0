//! The Python app host: [`celeriac::host::TaskHost`] over the interpreter
//! this extension module lives in. The Python half is
//! `celeriac/_worker.py`; this file moves calls and data across.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use celeriac::broker::{Binding, Declared, ExchangeType, QueueSpec};
use celeriac::config::WorkerConfig;
use celeriac::host::{HostedTask, LoadedApp, TaskHost};
use celeriac::protocol::{ExceptionInfo, Shown, TaskMessage};
use celeriac::task::{
    main_thread, Context, DeliveryInfo, Elsewhere, End, Registry, TaskError, TaskFuture,
    TaskHandler, TaskOptions,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::borrow::Cow;

use crate::fork::ForkGuard;
use crate::objects;

/// The hosted app, as the supervisor loaded it (inherited by every fork).
#[derive(Default)]
pub struct PythonHost {
    fork: Mutex<Option<ForkGuard>>,
    /// The remote-control commands the app answers (set by `load`).
    control_commands: OnceLock<Vec<String>>,
}

#[derive(Deserialize)]
struct Loaded {
    options: Vec<String>,
    queues: Vec<QueueJson>,
    tasks: Vec<TaskJson>,
    description: String,
    control_commands: Vec<String>,
}

/// A queue as kombu would declare it (`_worker._queue_spec`).
#[derive(Deserialize)]
struct QueueJson {
    name: String,
    exchange: ExchangeJson,
    routing_key: String,
    queue_type: Option<String>,
    max_priority: Option<u8>,
    queue_arguments: Map<String, Value>,
    durable: bool,
    auto_delete: bool,
    exclusive: bool,
    no_declare: bool,
    binding_arguments: Map<String, Value>,
    consumer_arguments: Map<String, Value>,
    bindings: Vec<BindingJson>,
}

#[derive(Deserialize)]
struct ExchangeJson {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    durable: bool,
    auto_delete: bool,
    arguments: Map<String, Value>,
    no_declare: bool,
}

#[derive(Deserialize)]
struct BindingJson {
    exchange: ExchangeJson,
    routing_key: String,
    arguments: Map<String, Value>,
}

fn exchange_type(name: &str) -> ExchangeType {
    // _worker._queue_spec refuses any other type at load.
    ExchangeType::parse(name).unwrap_or_default()
}

#[derive(Deserialize)]
struct TaskJson {
    name: String,
    acks_late: bool,
    reject_on_worker_lost: Option<bool>,
    ignore_result: bool,
    track_started: bool,
    max_retries: Option<u32>,
    default_retry_delay: f64,
    time_limit: Option<f64>,
    soft_time_limit: Option<f64>,
    rate_limit: Option<f64>,
}

/// The one line a Python exception becomes.
fn line(py: Python<'_>, e: &PyErr) -> String {
    let text = e.value(py).to_string();
    let kind = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    if kind == "LoadError" {
        text
    } else {
        format!("{kind}: {text}")
    }
}

/// `celeriac._worker`, imported once (in the supervisor, before the forks).
fn bridge(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    static BRIDGE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    BRIDGE
        .get_or_try_init(py, || py.import("celeriac._worker").map(Bound::unbind))
        .map(|m| m.bind(py).clone())
}

impl TaskHost for PythonHost {
    fn load(&self, config: &WorkerConfig) -> Result<LoadedApp, String> {
        let Some(app) = &config.app else {
            return Err("no app given".into());
        };
        let options = json!({
            "app": app.name,
            "include": app.include,
            "loader": app.loader,
            "config_module": app.config_module,
            "broker": app.broker,
            "result_backend": app.result_backend,
            "skip_checks": app.skip_checks,
            "loglevel": app.loglevel,
            "queues_given": app.queues_given,
            "queues": if app.queues_given {
                config.queues.iter().map(|q| q.name.clone()).collect::<Vec<_>>()
            } else {
                Vec::new()
            },
            "exclude_queues": app.exclude_queues,
            "hostname": config.hostname,
            "concurrency": config.concurrency,
            "log_format": match config.log_format {
                celeriac::config::LogFormat::Json => "json",
                celeriac::config::LogFormat::Text => "text",
            },
        });
        let text = Python::attach(|py| -> Result<String, String> {
            bridge(py)
                .and_then(|m| m.call_method1("load", (options.to_string(),)))
                .and_then(|r| r.extract::<String>())
                .map_err(|e| line(py, &e))
        })?;
        let loaded: Loaded =
            serde_json::from_str(&text).map_err(|e| format!("the app's description: {e}"))?;
        let _ = self.control_commands.set(loaded.control_commands);
        let queues = loaded
            .queues
            .into_iter()
            .map(|q| QueueSpec {
                exchange_kind: exchange_type(&q.exchange.kind),
                declared: Declared {
                    queue_arguments: q.queue_arguments,
                    durable: q.durable,
                    auto_delete: q.auto_delete,
                    exclusive: q.exclusive,
                    no_declare: q.no_declare,
                    exchange_durable: q.exchange.durable,
                    exchange_auto_delete: q.exchange.auto_delete,
                    exchange_arguments: q.exchange.arguments,
                    exchange_no_declare: q.exchange.no_declare,
                    binding_arguments: q.binding_arguments,
                    bindings: q
                        .bindings
                        .into_iter()
                        .map(|b| Binding {
                            exchange_kind: exchange_type(&b.exchange.kind),
                            exchange: b.exchange.name,
                            exchange_durable: b.exchange.durable,
                            exchange_auto_delete: b.exchange.auto_delete,
                            exchange_arguments: b.exchange.arguments,
                            exchange_no_declare: b.exchange.no_declare,
                            routing_key: b.routing_key,
                            arguments: b.arguments,
                        })
                        .collect(),
                    consumer_arguments: q.consumer_arguments,
                },
                name: q.name,
                exchange: q.exchange.name,
                routing_key: q.routing_key,
                queue_type: q.queue_type,
                max_priority: q.max_priority,
            })
            .collect();
        let tasks = loaded
            .tasks
            .into_iter()
            .map(|t| {
                let mut options = TaskOptions::default();
                options
                    .acks_late(t.acks_late)
                    .ignore_result(t.ignore_result)
                    .track_started(t.track_started)
                    .max_retries(t.max_retries)
                    .default_retry_delay(t.default_retry_delay)
                    .time_limits(t.time_limit, t.soft_time_limit);
                if let Some(on) = t.reject_on_worker_lost {
                    options.reject_on_worker_lost(on);
                }
                HostedTask {
                    name: t.name,
                    options,
                    rate_limit: t.rate_limit,
                }
            })
            .collect();
        Ok(LoadedApp {
            options: loaded.options,
            queues,
            tasks,
            description: loaded.description,
        })
    }

    fn register(&self, loaded: &LoadedApp, registry: &mut Registry) {
        let handler: Arc<dyn TaskHandler> = Arc::new(PythonTask);
        for task in &loaded.tasks {
            registry.insert_hosted(&task.name, Arc::clone(&handler), task.options.clone());
        }
    }

    fn before_fork(&self) {
        *self.fork.lock().unwrap_or_else(|e| e.into_inner()) = Some(ForkGuard::before());
    }

    fn after_fork_in_parent(&self) {
        if let Some(guard) = self.fork.lock().unwrap_or_else(|e| e.into_inner()).take() {
            guard.in_parent();
        }
    }

    fn after_fork_in_child(&self) {
        if let Some(guard) = self.fork.lock().unwrap_or_else(|e| e.into_inner()).take() {
            guard.in_child();
        }
    }

    fn task_process_started(&self, index: usize) -> Result<(), String> {
        Python::attach(|py| {
            bridge(py)
                .and_then(|m| m.call_method1("process_started", (index,)))
                .map(|_| ())
                .map_err(|e| format!("worker_process_init: {}", line(py, &e)))
        })
    }

    fn task_process_ending(&self, code: i32) {
        Python::attach(|py| {
            if let Err(e) = bridge(py).and_then(|m| m.call_method1("process_ending", (code,))) {
                tracing::warn!("worker_process_shutdown: {}", line(py, &e));
            }
        });
    }

    fn worker_ready(&self) {
        Python::attach(|py| {
            if let Err(e) = bridge(py).and_then(|m| m.call_method0("worker_ready")) {
                tracing::warn!("worker_ready: {}", line(py, &e));
            }
        });
    }

    fn worker_shutting_down(&self) {
        Python::attach(|py| {
            if let Err(e) = bridge(py).and_then(|m| m.call_method0("worker_shutting_down")) {
                tracing::warn!("worker_shutting_down: {}", line(py, &e));
            }
        });
    }

    fn worker_stopped(&self) {
        Python::attach(|py| {
            if let Err(e) = bridge(py).and_then(|m| m.call_method0("worker_stopped")) {
                tracing::warn!("worker_shutdown: {}", line(py, &e));
            }
        });
    }

    fn serves_control(&self, method: &str) -> bool {
        self.control_commands
            .get()
            .is_some_and(|names| names.iter().any(|n| n == method))
    }

    fn control(&self, method: &str, arguments: &Map<String, Value>) -> Value {
        let arguments = Value::Object(arguments.clone()).to_string();
        let reply = Python::attach(|py| {
            bridge(py)
                .and_then(|m| m.call_method1("control", (method, arguments)))
                .and_then(|r| r.extract::<String>())
                .map_err(|e| line(py, &e))
        });
        match reply.map(|text| serde_json::from_str::<Value>(&text)) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => json!({"error": format!("the reply of {method} is not JSON: {e}")}),
            Err(e) => json!({"error": e}),
        }
    }

    fn revoked_elsewhere(&self, tasks: &[(String, Option<String>)]) {
        let tasks = serde_json::to_string(tasks).unwrap_or_default();
        Python::attach(|py| {
            if let Err(e) = bridge(py).and_then(|m| m.call_method1("revoked_elsewhere", (tasks,))) {
                tracing::warn!(
                    "recording revoked tasks in the result backend: {}",
                    line(py, &e)
                );
            }
        });
    }
}

/// Every task of the app: run through Celery's tracer on the process's
/// main thread.
struct PythonTask;

impl TaskHandler for PythonTask {
    fn call(&self, ctx: Context, args: Vec<Value>, kwargs: Map<String, Value>) -> TaskFuture {
        Box::pin(async move {
            let outcome = main_thread::run(move || {
                Python::attach(|py| {
                    run_request(py, &ctx, &args, &kwargs)
                        .and_then(|r| r.extract::<(bool, Option<String>)>())
                        .map_err(|e| line(py, &e))
                })
            })
            .await;
            match outcome {
                // Succeeded: the repr of its value.
                Some(Ok((true, repr))) => Ok(Value::String(repr.unwrap_or_else(|| "None".into()))),
                Some(Ok((false, text))) => outcome_of(text.as_deref().unwrap_or("")),
                Some(Err(e)) => Err(TaskError::Exception(ExceptionInfo::builtin(
                    "RuntimeError",
                    format!("celeriac could not run the task: {e}"),
                ))),
                None => Err(TaskError::runtime_error(
                    "celeriac could not run the task on the main thread",
                )),
            }
        })
    }

    fn interrupt(&self, _ctx: &Context) {
        main_thread::interrupt();
    }

    fn settle_elsewhere(&self, ended: Elsewhere) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        Box::pin(async move {
            let msg = &ended.msg;
            let end = match &ended.end {
                End::Failed(exc) => json!({
                    "kind": "failed",
                    "exc_type": exc.exc_type,
                    "exc_module": exc.exc_module,
                    "exc_message": exc.exc_message,
                }),
                End::Revoked { reason, signal } => json!({
                    "kind": "revoked",
                    "reason": reason,
                    "signum": signal,
                }),
            };
            let payload = serde_json::to_string(&Ended {
                request: Request::new(msg, &ended.delivery, &msg.args, &msg.kwargs),
                store_result: ended.store_result,
                end,
            })
            .unwrap_or_default();
            let call = (msg.task.clone(), msg.id.clone(), payload);
            let done = on_main_thread("settle_elsewhere", call, |r| r.extract::<bool>()).await;
            match done {
                Some(Ok(settled)) => settled,
                Some(Err(e)) => {
                    tracing::warn!(task_id = %msg.id, "the app could not record how task {}[{}] ended ({e}); storing it without the app", msg.task, msg.id);
                    false
                }
                None => false,
            }
        })
    }
}

/// Calls `celeriac._worker.<method>(name, id, payload)` on the process's
/// main thread and converts what it returns with `extract`; `None` if the
/// main thread could not run it, `Err` with the Python error's one line.
async fn on_main_thread<T: Send + 'static>(
    method: &'static str,
    args: (String, String, String),
    extract: fn(&Bound<'_, PyAny>) -> PyResult<T>,
) -> Option<Result<T, String>> {
    main_thread::run(move || {
        Python::attach(|py| {
            bridge(py)
                .and_then(|m| m.call_method1(method, args))
                .and_then(|r| extract(&r))
                .map_err(|e| line(py, &e))
        })
    })
    .await
}

/// Runs one task through `celeriac._worker`: the request as Python objects
/// built straight from the decoded message (`run_request`), or, when it
/// holds a kombu typed value (a mapping keyed `__type__`, which kombu's JSON
/// decoder turns into a `datetime`, `Decimal`, `UUID`, ...), as JSON text
/// decoded by kombu (`run`).
fn run_request<'py>(
    py: Python<'py>,
    ctx: &Context,
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> PyResult<Bound<'py, PyAny>> {
    let msg = ctx.message();
    let request = Request::new(msg, ctx.delivery_info(), args, kwargs);
    let bridge = bridge(py)?;
    if request.has_typed_value() {
        let payload = serde_json::to_string(&request).unwrap_or_default();
        return bridge.call_method1("run", (&msg.task, &msg.id, payload));
    }
    let request = request.to_python(py)?;
    bridge.call_method1(
        pyo3::intern!(py, "run_request"),
        (&msg.task, &msg.id, request),
    )
}

/// Whether `value` holds a mapping keyed `__type__` (kombu's typed values).
fn typed(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("__type__") || map.values().any(typed),
        Value::Array(list) => list.iter().any(typed),
        _ => false,
    }
}

/// What Celery's `Request` hands the tracer, serialized for the bridge
/// straight from the decoded message (nothing is copied on the way).
#[derive(Serialize)]
struct Request<'a> {
    headers: Cow<'a, Map<String, Value>>,
    properties: Properties<'a>,
    delivery_info: Delivered<'a>,
    args: &'a [Value],
    kwargs: &'a Map<String, Value>,
    embed: Embedded<'a>,
}

/// The AMQP properties Celery's request carries (`application_headers`
/// is added by the bridge from the headers): those decoded on their own,
/// then the message's others as py-amqp names them (`app_id`,
/// `delivery_mode`, `message_id`, ...).
#[derive(Serialize)]
struct Properties<'a> {
    content_type: &'static str,
    content_encoding: &'static str,
    // py-amqp names only the properties a message has.
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(flatten)]
    other: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct Delivered<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    priority: Option<u8>,
    redelivered: bool,
}

/// The body's third element; an empty list is `None`, as Celery sends it.
#[derive(Serialize)]
struct Embedded<'a> {
    callbacks: Option<&'a [Value]>,
    errbacks: Option<&'a [Value]>,
    chain: Option<&'a [Value]>,
    chord: Option<&'a Value>,
}

impl<'a> Request<'a> {
    fn new(
        msg: &'a TaskMessage,
        d: &'a DeliveryInfo,
        args: &'a [Value],
        kwargs: &'a Map<String, Value>,
    ) -> Self {
        let nonempty = |list: &'a [Value]| (!list.is_empty()).then_some(list);
        Self {
            headers: headers(msg),
            properties: Properties {
                content_type: "application/json",
                content_encoding: "utf-8",
                correlation_id: msg.correlation_id.as_deref(),
                reply_to: msg.reply_to.as_deref(),
                priority: msg.priority,
                other: &msg.properties,
            },
            delivery_info: Delivered {
                exchange: &d.exchange,
                routing_key: &d.routing_key,
                priority: msg.priority,
                redelivered: d.redelivered,
            },
            args,
            kwargs,
            embed: Embedded {
                callbacks: nonempty(&msg.embed.callbacks),
                errbacks: nonempty(&msg.embed.errbacks),
                chain: nonempty(&msg.embed.chain),
                chord: msg.embed.chord.as_ref(),
            },
        }
    }
}

impl Request<'_> {
    /// The request as Python objects: what `json.loads` of its JSON gives
    /// (the same keys in the same order).
    fn to_python<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        use pyo3::intern;
        let opt_list = |list: Option<&[Value]>| -> PyResult<Bound<'py, PyAny>> {
            match list {
                Some(items) => Ok(objects::list(py, items)?.into_any()),
                None => Ok(py.None().into_bound(py)),
            }
        };
        let p = &self.properties;
        let properties = PyDict::new(py);
        properties.set_item(intern!(py, "content_type"), p.content_type)?;
        properties.set_item(intern!(py, "content_encoding"), p.content_encoding)?;
        if let Some(v) = p.correlation_id {
            properties.set_item(intern!(py, "correlation_id"), v)?;
        }
        if let Some(v) = p.reply_to {
            properties.set_item(intern!(py, "reply_to"), v)?;
        }
        if let Some(v) = p.priority {
            properties.set_item(intern!(py, "priority"), v)?;
        }
        objects::insert_all(&properties, p.other)?;
        let d = &self.delivery_info;
        let delivery = PyDict::new(py);
        delivery.set_item(intern!(py, "exchange"), d.exchange)?;
        delivery.set_item(intern!(py, "routing_key"), d.routing_key)?;
        delivery.set_item(intern!(py, "priority"), d.priority)?;
        delivery.set_item(intern!(py, "redelivered"), d.redelivered)?;
        let e = &self.embed;
        let embed = PyDict::new(py);
        embed.set_item(intern!(py, "callbacks"), opt_list(e.callbacks)?)?;
        embed.set_item(intern!(py, "errbacks"), opt_list(e.errbacks)?)?;
        embed.set_item(intern!(py, "chain"), opt_list(e.chain)?)?;
        match e.chord {
            Some(chord) => embed.set_item(intern!(py, "chord"), objects::value(py, chord)?)?,
            None => embed.set_item(intern!(py, "chord"), py.None())?,
        }
        let out = PyDict::new(py);
        out.set_item(intern!(py, "headers"), objects::dict(py, &self.headers)?)?;
        out.set_item(intern!(py, "properties"), properties)?;
        out.set_item(intern!(py, "delivery_info"), delivery)?;
        out.set_item(intern!(py, "args"), objects::list(py, self.args)?)?;
        out.set_item(intern!(py, "kwargs"), objects::dict(py, self.kwargs)?)?;
        out.set_item(intern!(py, "embed"), embed)?;
        Ok(out)
    }

    /// Whether a kombu typed value is anywhere in what the tracer gets.
    fn has_typed_value(&self) -> bool {
        let lists = [
            Some(self.args),
            self.embed.callbacks,
            self.embed.errbacks,
            self.embed.chain,
        ];
        self.headers.values().any(typed)
            || self.properties.other.values().any(typed)
            || self.kwargs.values().any(typed)
            || lists.into_iter().flatten().flatten().any(typed)
            || self.embed.chord.is_some_and(typed)
    }
}

/// The message's headers; for protocol 1, the fields they would carry.
fn headers(msg: &TaskMessage) -> Cow<'_, Map<String, Value>> {
    if !msg.headers.is_empty() {
        return Cow::Borrowed(&msg.headers);
    }
    let mut h = Map::new();
    h.insert("id".into(), msg.id.clone().into());
    h.insert("task".into(), msg.task.clone().into());
    h.insert("retries".into(), msg.retries.into());
    h.insert("eta".into(), msg.eta.map(|t| t.to_rfc3339()).into());
    h.insert("expires".into(), msg.expires.map(|t| t.to_rfc3339()).into());
    h.insert("group".into(), msg.group.clone().into());
    h.insert("root_id".into(), msg.root_id.clone().into());
    h.insert("parent_id".into(), msg.parent_id.clone().into());
    h.insert(
        "timelimit".into(),
        json!([msg.time_limit, msg.soft_time_limit]),
    );
    Cow::Owned(h)
}

/// A request and how the task ended outside its run, for `settle_elsewhere`.
#[derive(Serialize)]
struct Ended<'a> {
    #[serde(flatten)]
    request: Request<'a>,
    store_result: bool,
    end: Value,
}

#[derive(Deserialize)]
struct ExcJson {
    repr: String,
    traceback: String,
    exc_type: String,
    exc_module: String,
    exc_message: Value,
}

impl From<ExcJson> for ExceptionInfo {
    fn from(e: ExcJson) -> Self {
        let args = match e.exc_message {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        let mut info = ExceptionInfo::new(&e.exc_type, &e.exc_module, args);
        info.shown = Some(Box::new(Shown {
            repr: e.repr,
            traceback: e.traceback,
        }));
        info
    }
}

#[derive(Deserialize)]
#[serde(tag = "state")]
enum Outcome {
    #[serde(rename = "FAILURE")]
    Failure { exc: ExcJson },
    #[serde(rename = "RETRY")]
    Retry {
        countdown: Option<f64>,
        exc: Option<ExcJson>,
    },
    #[serde(rename = "REJECTED")]
    Rejected {
        requeue: bool,
        reason: String,
        traceback: Option<String>,
    },
    #[serde(rename = "IGNORED")]
    Ignored,
}

/// The worker's view of what the tracer reported.
fn outcome_of(text: &str) -> Result<Value, TaskError> {
    let outcome: Outcome = serde_json::from_str(text).map_err(|e| {
        TaskError::runtime_error(format!("celeriac could not read the task's outcome: {e}"))
    })?;
    match outcome {
        Outcome::Failure { exc } => Err(TaskError::Exception(exc.into())),
        Outcome::Retry { countdown, exc } => Err(TaskError::Retry(celeriac::task::Retry {
            countdown,
            exc: exc.map(Into::into),
            max_retries: None,
        })),
        Outcome::Rejected {
            requeue,
            reason,
            traceback,
        } => Err(TaskError::Reject {
            requeue,
            reason,
            traceback,
        }),
        Outcome::Ignored => Err(TaskError::Ignore),
    }
}
