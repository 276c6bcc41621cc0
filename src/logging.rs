//! Log output on stderr, in one of two formats:
//!
//! - `text`: Celery's line shape, so that existing log parsing and alerts
//!   keep working: `[2026-12-02 10:00:00,123: INFO/ForkPoolWorker-1] Task
//!   proj.add[<id>] succeeded in 0.001s: 5` (local time, as Celery's
//!   `worker_log_format`). Structured fields other than the task ones (which
//!   the message already shows) follow as ` key=value`.
//! - `json`: one object per line with `timestamp` (UTC), `level`,
//!   `process`, `hostname`, `pid`, `message` and every field; task lines
//!   carry `task_name`, `task_id`, `queue`, `state`, `runtime` and
//!   `exception`.
//!
//! No background thread is started, so logging is safe in the
//! single-threaded supervisor. Each forked process names itself with
//! [`set_process_name`] before it logs.

use std::fmt;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

static PROCESS: OnceLock<String> = OnceLock::new();
static HOSTNAME: OnceLock<String> = OnceLock::new();

/// Fields a task line carries in JSON; the text line's message already
/// shows them, so they are not repeated there.
const TASK_FIELDS: [&str; 6] = [
    "task_id",
    "task_name",
    "state",
    "runtime",
    "exception",
    "queue",
];

/// Names this process in log lines (`ForkPoolWorker-1`), once, right after
/// the fork. The supervisor is `MainProcess`.
pub fn set_process_name(name: String) {
    let _ = PROCESS.set(name);
}

fn process_name() -> &'static str {
    PROCESS.get().map_or("MainProcess", String::as_str)
}

/// Installs the global subscriber at `level` in `format`; `hostname` (the
/// node name) goes into every JSON line.
pub fn init(level: Level, format: LogFormat, hostname: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let _ = HOSTNAME.set(hostname.to_owned());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(LineFormat {
            json: format == LogFormat::Json,
        })
        .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
            shown(level, meta.level(), meta.target())
        }));
    // A second init (tests, embedding) keeps the first subscriber.
    drop(tracing_subscriber::registry().with(layer).try_init());
}

/// Libraries whose own log lines describe conditions celeriac reports in
/// its own words (a refused login, a lost connection): shown only at DEBUG.
/// Their TRACE lines are never shown: lapin's dump the frames it writes,
/// `update-secret` and its broker token among them.
const QUIET_LIBRARIES: [&str; 4] = ["lapin", "amq_protocol", "pinky_swear", "redis"];

/// Whether an event at `event` level from `target` is written when the
/// worker logs at `max`.
fn shown(max: Level, event: &Level, target: &str) -> bool {
    if *event > max {
        return false;
    }
    let library = QUIET_LIBRARIES.iter().any(|l| {
        target
            .strip_prefix(l)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    !library || (max >= Level::DEBUG && *event <= Level::DEBUG)
}

/// Celery's level names.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

/// An event's message and fields.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, Value)>,
    /// Text lines leave the task fields out: they are not even recorded.
    skip_task_fields: bool,
}

impl Fields {
    fn kept(&self, field: &Field) -> bool {
        !(self.skip_task_fields && TASK_FIELDS.contains(&field.name()))
    }

    fn push(&mut self, field: &Field, value: impl Into<Value>) {
        if self.kept(field) {
            self.pairs.push((field.name(), value.into()));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.push(field, value);
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else if self.kept(field) {
            self.push(field, format!("{value:?}"));
        }
    }
}

impl Fields {
    fn of(event: &Event<'_>, skip_task_fields: bool) -> Self {
        let mut fields = Self {
            skip_task_fields,
            ..Self::default()
        };
        event.record(&mut fields);
        fields
    }
}

/// Formats each event as a Celery-shaped text line or as a JSON object.
struct LineFormat {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let fields = Fields::of(event, !self.json);
        let level = *event.metadata().level();
        if self.json {
            writeln!(
                w,
                "{}",
                json_line(&utc_stamp(), level, process_name(), fields)
            )
        } else {
            write!(
                w,
                "{}",
                text_line(&local_stamp(), level, process_name(), &fields)
            )
        }
    }
}

fn text_line(stamp: &str, level: Level, process: &str, fields: &Fields) -> String {
    let mut line = format!(
        "[{stamp}: {}/{process}] {}",
        level_name(level),
        fields.message
    );
    for (key, value) in &fields.pairs {
        if TASK_FIELDS.contains(key) {
            continue;
        }
        match value {
            Value::String(s) => line.push_str(&format!(" {key}={s}")),
            other => line.push_str(&format!(" {key}={other}")),
        }
    }
    line.push('\n');
    line
}

/// The fields every JSON line starts with.
fn json_head(stamp: &str, level: Level, process: &str) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("timestamp".into(), stamp.into());
    object.insert("level".into(), level_name(level).into());
    object.insert("process".into(), process.into());
    object.insert(
        "hostname".into(),
        HOSTNAME.get().map_or(Value::Null, |h| h.as_str().into()),
    );
    object.insert("pid".into(), std::process::id().into());
    object
}

/// Local time as Celery's text lines show it (`2026-12-07 03:16:11,349`).
/// The part up to the second is formatted once per second and thread (time
/// zone rules are looked up then), the milliseconds on every line.
fn local_stamp() -> String {
    thread_local! {
        static SECOND: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, millis) = (now.as_secs() as i64, now.subsec_millis());
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let local = chrono::DateTime::from_timestamp(secs, 0)
                .unwrap_or_default()
                .with_timezone(&chrono::Local);
            *cached = (secs, local.format("%Y-%m-%d %H:%M:%S").to_string());
        }
        format!("{},{millis:03}", cached.1)
    })
}

fn utc_stamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn json_line(stamp: &str, level: Level, process: &str, fields: Fields) -> Value {
    let mut object = json_head(stamp, level, process);
    object.insert("message".into(), fields.message.into());
    for (key, value) in fields.pairs {
        object.insert(key.into(), value);
    }
    Value::Object(object)
}

/// The banner line in JSON, for `--log-format json` (stdout, like the text banner).
pub fn json_banner(fields: Map<String, Value>) -> String {
    let mut object = json_head(&utc_stamp(), Level::INFO, process_name());
    object.extend(fields);
    Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(message: &str, pairs: &[(&'static str, Value)]) -> Fields {
        Fields {
            message: message.into(),
            pairs: pairs.to_vec(),
            skip_task_fields: false,
        }
    }

    #[test]
    fn client_library_lines_show_only_at_debug() {
        assert!(!shown(Level::WARN, &Level::ERROR, "lapin::channel"));
        assert!(!shown(Level::INFO, &Level::ERROR, "amq_protocol"));
        assert!(shown(Level::DEBUG, &Level::ERROR, "lapin::channel"));
        // Frame dumps (a token in update-secret) stay out even at -l TRACE.
        assert!(!shown(Level::TRACE, &Level::TRACE, "lapin::io_loop"));
        assert!(shown(Level::TRACE, &Level::DEBUG, "lapin::channel"));
        assert!(shown(Level::TRACE, &Level::TRACE, "celeriac::child"));
        assert!(shown(
            Level::WARN,
            &Level::ERROR,
            "celeriac::child::session"
        ));
        assert!(!shown(
            Level::WARN,
            &Level::INFO,
            "celeriac::child::session"
        ));
        assert!(
            shown(Level::WARN, &Level::ERROR, "lapinou"),
            "only whole names"
        );
    }

    #[test]
    fn the_cached_local_stamp_is_the_local_time_to_the_millisecond() {
        for _ in 0..3 {
            let before = chrono::Local::now();
            let stamp = local_stamp();
            let after = chrono::Local::now();
            let parsed = chrono::NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%d %H:%M:%S,%3f")
                .unwrap_or_else(|e| panic!("{stamp}: {e}"));
            let (low, high) = (before.naive_local(), after.naive_local());
            let low = low - chrono::Duration::milliseconds(1);
            assert!(
                low <= parsed && parsed <= high,
                "{stamp} not within {low}..{high}"
            );
            std::thread::sleep(std::time::Duration::from_millis(400));
        }
    }

    #[test]
    fn text_lines_have_celerys_shape() {
        let f = fields(
            "Task proj.add[6a1f] succeeded in 0.001000s: 5",
            &[
                ("task_id", "6a1f".into()),
                ("task_name", "proj.add".into()),
                ("state", "SUCCESS".into()),
                ("runtime", 0.001.into()),
            ],
        );
        assert_eq!(
            text_line("2026-12-02 10:00:00,123", Level::INFO, "ForkPoolWorker-1", &f),
            "[2026-12-02 10:00:00,123: INFO/ForkPoolWorker-1] Task proj.add[6a1f] succeeded in 0.001000s: 5\n"
        );
    }

    #[test]
    fn other_fields_follow_the_message_and_warn_is_warning() {
        let f = fields("forking task process 1", &[("threads", 1u64.into())]);
        assert_eq!(
            text_line("2026-12-02 10:00:00,123", Level::WARN, "MainProcess", &f),
            "[2026-12-02 10:00:00,123: WARNING/MainProcess] forking task process 1 threads=1\n"
        );
    }

    #[test]
    fn json_lines_carry_the_task_fields() {
        let f = fields(
            "Task proj.add[6a1f] raised unexpected: ValueError('x') (after 0.1s)",
            &[
                ("task_id", "6a1f".into()),
                ("task_name", "proj.add".into()),
                ("state", "FAILURE".into()),
                ("runtime", 0.1.into()),
                ("exception", "ValueError".into()),
            ],
        );
        let v = json_line(
            "2026-12-02T10:00:00.000000Z",
            Level::ERROR,
            "ForkPoolWorker-2",
            f,
        );
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["process"], "ForkPoolWorker-2");
        assert_eq!(v["task_name"], "proj.add");
        assert_eq!(v["state"], "FAILURE");
        assert_eq!(v["exception"], "ValueError");
        assert_eq!(v["pid"], std::process::id());
        assert!(v["message"]
            .as_str()
            .unwrap()
            .starts_with("Task proj.add[6a1f]"));
    }
}
