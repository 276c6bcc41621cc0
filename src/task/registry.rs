//! The task registry and argument binding.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Context, TaskError};
use crate::protocol::ExceptionInfo;

/// What running a task produces.
pub type TaskFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// Anything that can run a task from raw Celery arguments.
pub trait TaskHandler: Send + Sync {
    /// Runs the task with positional and keyword arguments.
    fn call(&self, ctx: Context, args: Vec<Value>, kwargs: Map<String, Value>) -> TaskFuture;

    /// Tells the running task `ctx` it is past its soft time limit, for a
    /// task that keeps running (a blocking or hosted one). The default
    /// does nothing: the task may check [`Context::soft_time_limit_exceeded`].
    fn interrupt(&self, ctx: &Context) {
        let _ = ctx;
    }

    /// For a task that settles itself: records an end decided outside its
    /// run (its process died or hit the hard limit, or it was revoked) the
    /// way its own framework does (result, errbacks, signals). `false`, the
    /// default, leaves it to the worker, which stores its own document.
    fn settle_elsewhere(&self, ended: Elsewhere) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let _ = ended;
        Box::pin(async { false })
    }
}

/// How a task ended outside its run, for [`TaskHandler::settle_elsewhere`].
#[derive(Debug, Clone)]
pub struct Elsewhere {
    /// The task's message (only id, name and reply fields when its process
    /// died after an early ack).
    pub msg: Arc<crate::protocol::TaskMessage>,
    /// Where it was delivered from.
    pub delivery: super::DeliveryInfo,
    /// Whether the result is stored (not `ignore_result`).
    pub store_result: bool,
    /// What happened.
    pub end: End,
}

/// What ended a task outside its run.
#[derive(Debug, Clone)]
pub enum End {
    /// FAILURE with this exception (`WorkerLostError`, `TimeLimitExceeded`).
    Failed(ExceptionInfo),
    /// REVOKED.
    Revoked {
        /// `revoked`, `expired` or `terminated` (its process was killed).
        reason: &'static str,
        /// The signal asked for.
        signal: Option<i32>,
    },
}

impl<F> TaskHandler for F
where
    F: Fn(Context, Vec<Value>, Map<String, Value>) -> TaskFuture + Send + Sync,
{
    fn call(&self, ctx: Context, args: Vec<Value>, kwargs: Map<String, Value>) -> TaskFuture {
        self(ctx, args, kwargs)
    }
}

/// Per-task settings, as on a Python `@app.task(...)` decorator.
/// `None` means "use the worker's setting".
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Acknowledge after the task returns instead of before it starts.
    pub acks_late: Option<bool>,
    /// With acks_late: requeue the message when the child running it dies.
    pub reject_on_worker_lost: Option<bool>,
    /// Store no result.
    pub ignore_result: bool,
    /// Store STARTED when the task starts.
    pub track_started: Option<bool>,
    /// Retries allowed before a retry becomes a failure (`None` = unlimited).
    pub max_retries: Option<u32>,
    /// Default countdown of a retry, in seconds.
    pub default_retry_delay: f64,
    /// Hard time limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            acks_late: None,
            reject_on_worker_lost: None,
            ignore_result: false,
            track_started: None,
            max_retries: Some(3),
            default_retry_delay: 180.0,
            time_limit: None,
            soft_time_limit: None,
        }
    }
}

impl TaskOptions {
    /// Sets `acks_late`.
    pub fn acks_late(&mut self, on: bool) -> &mut Self {
        self.acks_late = Some(on);
        self
    }
    /// Sets `reject_on_worker_lost`.
    pub fn reject_on_worker_lost(&mut self, on: bool) -> &mut Self {
        self.reject_on_worker_lost = Some(on);
        self
    }
    /// Sets `ignore_result`.
    pub fn ignore_result(&mut self, on: bool) -> &mut Self {
        self.ignore_result = on;
        self
    }
    /// Sets `track_started`.
    pub fn track_started(&mut self, on: bool) -> &mut Self {
        self.track_started = Some(on);
        self
    }
    /// Sets `max_retries` (`None` = unlimited).
    pub fn max_retries(&mut self, max: Option<u32>) -> &mut Self {
        self.max_retries = max;
        self
    }
    /// Sets `default_retry_delay` in seconds.
    pub fn default_retry_delay(&mut self, seconds: f64) -> &mut Self {
        self.default_retry_delay = seconds;
        self
    }
    /// Sets the hard and soft time limits in seconds.
    pub fn time_limits(&mut self, hard: Option<f64>, soft: Option<f64>) -> &mut Self {
        self.time_limit = hard;
        self.soft_time_limit = soft;
        self
    }
}

/// A task in the registry.
pub struct Registered {
    /// The Celery task name.
    pub name: String,
    /// Its settings.
    pub options: TaskOptions,
    /// The code.
    pub handler: Arc<dyn TaskHandler>,
    /// Whether the code blocks a thread (registered with [`Registry::register`]).
    pub blocking: bool,
    /// Whether the code stores its own result, sends its own follow-ups and
    /// retries (a hosted app's task, run by its own framework): the worker
    /// then only settles the message and reports the outcome.
    pub settles_itself: bool,
}

/// Maps Celery task names to Rust functions.
#[derive(Default)]
pub struct Registry {
    tasks: BTreeMap<String, Registered>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a blocking function. It runs on a blocking thread so it
    /// cannot stall the worker. `params` names the positional parameters, as a
    /// Python signature does: positional and keyword arguments are bound onto
    /// them and `A` is deserialized from the result (a struct with those
    /// fields). With no `params`, `A` is deserialized from the positional
    /// arguments as a sequence (a tuple, or `()` for none).
    pub fn register<A, R, F>(&mut self, name: &str, params: &[&str], f: F) -> &mut TaskOptions
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(&Context, A) -> Result<R, TaskError> + Send + Sync + 'static,
    {
        let params: Vec<String> = params.iter().map(|p| (*p).to_owned()).collect();
        let f = Arc::new(f);
        let handler =
            move |ctx: Context, args: Vec<Value>, kwargs: Map<String, Value>| -> TaskFuture {
                let bound = bind_arguments::<A>(&params, args, kwargs);
                let f = Arc::clone(&f);
                Box::pin(async move {
                    let a = bound?;
                    match tokio::task::spawn_blocking(move || f(&ctx, a).and_then(encode_return))
                        .await
                    {
                        Ok(outcome) => outcome,
                        Err(join) => Err(panic_exception(join)),
                    }
                })
            };
        self.insert(name, Arc::new(handler));
        let entry = self.tasks.get_mut(name).expect("just inserted");
        entry.blocking = true;
        &mut entry.options
    }

    /// Registers an async function; see [`Registry::register`] for argument binding.
    pub fn register_async<A, R, F, Fut>(
        &mut self,
        name: &str,
        params: &[&str],
        f: F,
    ) -> &mut TaskOptions
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Context, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
    {
        let params: Vec<String> = params.iter().map(|p| (*p).to_owned()).collect();
        let handler =
            move |ctx: Context, args: Vec<Value>, kwargs: Map<String, Value>| -> TaskFuture {
                match bind_arguments::<A>(&params, args, kwargs) {
                    Ok(a) => {
                        let fut = f(ctx, a);
                        Box::pin(async move { fut.await.and_then(encode_return) })
                    }
                    Err(e) => Box::pin(std::future::ready(Err(e))),
                }
            };
        self.insert(name, Arc::new(handler))
    }

    /// Registers a handler working on raw JSON arguments.
    pub fn insert(&mut self, name: &str, handler: Arc<dyn TaskHandler>) -> &mut TaskOptions {
        let entry = Registered {
            name: name.to_owned(),
            options: TaskOptions::default(),
            handler,
            blocking: false,
            settles_itself: false,
        };
        self.tasks.insert(name.to_owned(), entry);
        &mut self.tasks.get_mut(name).expect("just inserted").options
    }

    /// Registers a hosted task (see [`crate::host`]): it blocks the thread
    /// it runs on, and settles itself (see [`Registered::settles_itself`]).
    pub fn insert_hosted(
        &mut self,
        name: &str,
        handler: Arc<dyn TaskHandler>,
        options: TaskOptions,
    ) {
        let entry = Registered {
            name: name.to_owned(),
            options,
            handler,
            blocking: true,
            settles_itself: true,
        };
        self.tasks.insert(name.to_owned(), entry);
    }

    /// Removes every task whose name starts with `prefix`.
    pub fn remove_prefix(&mut self, prefix: &str) {
        self.tasks.retain(|name, _| !name.starts_with(prefix));
    }

    /// Looks a task up by name.
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.tasks.get(name)
    }

    /// The handler of hosted tasks (a Python app's), if any: it settles, in
    /// the app's own result backend, what happens to a task the app does not
    /// know (see [`TaskHandler::settle_elsewhere`]).
    pub fn host(&self) -> Option<Arc<dyn TaskHandler>> {
        self.tasks
            .values()
            .find(|t| t.settles_itself)
            .map(|t| Arc::clone(&t.handler))
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// How many tasks are registered.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is registered.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

fn encode_return<R: Serialize>(value: R) -> Result<Value, TaskError> {
    serde_json::to_value(value).map_err(|e| {
        TaskError::exception(
            "EncodeError",
            "kombu.exceptions",
            vec![e.to_string().into()],
        )
    })
}

pub(crate) fn panic_exception(join: tokio::task::JoinError) -> TaskError {
    match join.try_into_panic() {
        Ok(payload) => panic_payload_exception(payload),
        Err(e) => TaskError::Exception(ExceptionInfo::new(
            "Panic",
            "celeriac.exceptions",
            vec![e.to_string().into()],
        )),
    }
}

/// A panic in task code, as the exception Python sees (`celeriac.exceptions.Panic`).
pub(crate) fn panic_payload_exception(payload: Box<dyn std::any::Any + Send>) -> TaskError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    TaskError::Exception(ExceptionInfo::new(
        "Panic",
        "celeriac.exceptions",
        vec![message.into()],
    ))
}

/// Binds Celery's positional and keyword arguments onto named parameters,
/// raising `TypeError` the way a Python call with the wrong arguments would.
pub fn bind_arguments<A: DeserializeOwned>(
    params: &[String],
    args: Vec<Value>,
    kwargs: Map<String, Value>,
) -> Result<A, TaskError> {
    let value = if params.is_empty() {
        if let Some(key) = kwargs.keys().next() {
            return Err(TaskError::type_error(format!(
                "got an unexpected keyword argument '{key}'"
            )));
        }
        if args.is_empty() {
            if let Ok(unit) = serde_json::from_value::<A>(Value::Null) {
                return Ok(unit);
            }
        }
        Value::Array(args)
    } else {
        if args.len() > params.len() {
            return Err(TaskError::type_error(format!(
                "takes {} positional arguments but {} were given",
                params.len(),
                args.len()
            )));
        }
        let mut bound = Map::new();
        for (name, value) in params.iter().zip(args) {
            bound.insert(name.clone(), value);
        }
        for (key, value) in kwargs {
            if !params.contains(&key) {
                return Err(TaskError::type_error(format!(
                    "got an unexpected keyword argument '{key}'"
                )));
            }
            if bound.contains_key(&key) {
                return Err(TaskError::type_error(format!(
                    "got multiple values for argument '{key}'"
                )));
            }
            bound.insert(key, value);
        }
        Value::Object(bound)
    };
    serde_json::from_value(value).map_err(|e| TaskError::type_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Add {
        x: i64,
        y: i64,
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn binds_positional_and_keyword() {
        let kw = json!({"y": 2}).as_object().unwrap().clone();
        let a: Add = bind_arguments(&names(&["x", "y"]), vec![json!(1)], kw).unwrap();
        assert_eq!(a, Add { x: 1, y: 2 });
    }

    #[test]
    fn python_type_errors() {
        let err = bind_arguments::<Add>(
            &names(&["x", "y"]),
            vec![json!(1), json!(2), json!(3)],
            Map::new(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            TaskError::type_error("takes 2 positional arguments but 3 were given")
        );
        let kw = json!({"x": 5}).as_object().unwrap().clone();
        let err = bind_arguments::<Add>(&names(&["x", "y"]), vec![json!(1)], kw).unwrap_err();
        assert_eq!(
            err,
            TaskError::type_error("got multiple values for argument 'x'")
        );
        let err =
            bind_arguments::<Add>(&names(&["x", "y"]), vec![json!(1)], Map::new()).unwrap_err();
        assert!(matches!(err, TaskError::Exception(e) if e.exc_type == "TypeError"));
        let err =
            bind_arguments::<Add>(&names(&["x", "y"]), vec![json!("a"), json!(1)], Map::new())
                .unwrap_err();
        assert!(matches!(err, TaskError::Exception(e) if e.exc_type == "TypeError"));
    }

    #[test]
    fn tuples_and_unit_without_names() {
        let t: (i64, String) = bind_arguments(&[], vec![json!(1), json!("a")], Map::new()).unwrap();
        assert_eq!(t, (1, "a".to_owned()));
        bind_arguments::<()>(&[], vec![], Map::new()).unwrap();
        let err = bind_arguments::<()>(&[], vec![], json!({"k": 1}).as_object().unwrap().clone())
            .unwrap_err();
        assert_eq!(
            err,
            TaskError::type_error("got an unexpected keyword argument 'k'")
        );
    }
}
