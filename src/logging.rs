//! Log output: Celery-like text lines or JSON, on stderr. No background
//! thread is started, so logging is safe in the single-threaded supervisor.

use crate::config::LogFormat;

/// Installs the global subscriber at `level` in `format`. Lines logged by a
/// forked process carry its span (`child{n=1}`, `control`).
pub fn init(level: tracing::Level, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // A second init (tests, embedding) keeps the first subscriber.
    drop(installed);
}
