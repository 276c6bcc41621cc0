//! The Celery wire format, with no I/O: task messages (protocol v1 and v2),
//! result documents, exception encoding and timestamps.
//!
//! Everything here is a pure function of bytes and values so it can be unit
//! tested against messages captured from real Celery.

pub mod events;
mod exception;
mod message;
mod outgoing;
mod result;
mod time;

pub use exception::{ExceptionInfo, Shown};
pub use message::{
    DecodeError, Embed, RawMessage, TaskMessage, ACCEPTED_CONTENT_TYPE, REJECTED_CONTENT_TYPES,
};
pub use outgoing::{signature_message, OutgoingTask, BROKER_HEADERS};
pub use result::{ResultDocument, TaskState};
pub use time::{format_iso, parse_iso, unix_seconds};
