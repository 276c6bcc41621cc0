//! Tasks: plain Rust functions registered under their Celery names.
//!
//! ```
//! use celeriac::task::{Registry, TaskError};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Add { x: i64, y: i64 }
//!
//! let mut registry = Registry::new();
//! registry.register("proj.tasks.add", &["x", "y"], |_ctx, a: Add| Ok::<_, TaskError>(a.x + a.y));
//! assert!(registry.get("proj.tasks.add").is_some());
//! ```

pub mod builtins;
mod context;
mod error;
pub mod main_thread;
mod registry;
pub mod testing;

pub use context::{Context, DeliveryInfo};
pub use error::{Retry, TaskError};
pub use registry::{
    bind_arguments, Elsewhere, End, Registered, Registry, TaskFuture, TaskHandler, TaskOptions,
};
pub(crate) use registry::{panic_exception, panic_payload_exception};
