//! celeriac: a worker runtime that is wire-compatible with Python Celery.
//!
//! Python producers publish tasks with `send_task`/`delay` as usual; a
//! celeriac worker consumes them from RabbitMQ, runs Rust functions
//! registered under the same names, and stores results where
//! `AsyncResult.get()` finds them (rpc:// or redis://).
//!
//! The crate is split by responsibility: [`protocol`] (the wire format, no
//! I/O), [`broker`] (RabbitMQ), [`task`] (the registry and task API),
//! [`backend`] (results), [`child`] (the consume-and-run loop), [`config`]
//! (the command line), [`supervisor`] (the prefork parent) and [`shm`]
//! (the memory it shares with its children).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod backend;
pub mod backoff;
pub mod broker;
pub mod child;
pub mod config;
pub mod control;
pub mod events;
pub mod exit;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod repr;
pub mod shm;
pub mod signals;
pub mod supervisor;
pub mod task;

pub use app::App;
