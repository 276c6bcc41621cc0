//! celeriac: a worker runtime that is wire-compatible with Python Celery.
//!
//! Python producers publish tasks with `send_task`/`delay` as usual; a
//! celeriac worker consumes them from RabbitMQ, runs Rust functions
//! registered under the same names, and stores results where
//! `AsyncResult.get()` finds them (rpc:// or redis://).
//!
//! A worker runs as three process roles; `docs/architecture.md` tells the
//! whole story. The modules, from the wire up:
//!
//! | module | what it holds |
//! |---|---|
//! | [`protocol`] | Celery's wire format: task messages v1/v2, results, events, exceptions (no I/O) |
//! | [`repr`] | Python `repr()` of JSON values, as Celery shows arguments and results |
//! | [`task`] | the task registry, the task API (context, errors) and the built-in tasks |
//! | [`broker`] | RabbitMQ: connecting, kombu-compatible topology, publishing with confirms |
//! | [`backend`] | result backends: `rpc://` and `redis://` |
//! | [`config`] | the command line and environment, validated before anything forks |
//! | [`exit`] | every exit code, of the worker and of the processes it forks |
//! | [`backoff`] | the one capped exponential backoff with jitter |
//! | [`deadline`] | a timer that wakes an idle runtime once, when due |
//! | [`signals`] | shutdown signals of the processes that run a tokio runtime |
//! | [`shm`] | the memory the processes share, one file per table |
//! | [`events`] | publishing Celery events (task events batched on `task.multi`) |
//! | [`inspect`] | the lines `inspect active/reserved/scheduled` show |
//! | [`metrics`] | rendering the Prometheus endpoint from shared memory |
//! | [`logging`] | log setup (text or JSON) |
//! | [`supervisor`] | role: the single-threaded prefork parent |
//! | [`child`] | role: a task process (consume, run, settle) |
//! | [`control`] | role: the control process (worker events, remote control, `/metrics`) |
//! | [`host`] | hooks for an embedding that runs a Python app's tasks |
//! | [`app`] | the composition root: command line → config → roles → supervisor |

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod backend;
pub mod backoff;
pub mod broker;
pub mod child;
pub mod config;
pub mod control;
pub mod deadline;
pub mod events;
pub mod exit;
pub mod host;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod repr;
pub mod shm;
pub mod signals;
pub mod supervisor;
pub mod task;
pub mod token;

pub use app::App;
