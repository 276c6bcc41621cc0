//! How a task's arguments reach `inspect active`, `reserved`, `scheduled`
//! and `query_task`: the task process writes them into shared memory as
//! plain text fields, and the control process turns them back into the
//! values of Celery's reply. Celery answers with the arguments as JSON
//! values, or with the producer's `argsrepr`/`kwargsrepr` strings when the
//! request says `safe`.

use serde_json::Value;

use crate::protocol::TaskMessage;
use crate::repr::{args_repr, python_repr};

/// The longest JSON text or repr kept of one field, in bytes.
pub const FIELD_LIMIT: usize = 400;

/// A task's arguments as text fields free of tabs, newlines and NULs (so
/// they fit the shared-memory records and the reserved list's lines).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArgsText {
    /// Positional arguments as JSON text; empty when too long to keep.
    pub args: String,
    /// Keyword arguments as JSON text; empty when too long to keep.
    pub kwargs: String,
    /// The producer's `argsrepr` (or ours), cut to [`FIELD_LIMIT`].
    pub argsrepr: String,
    /// The producer's `kwargsrepr` (or ours), cut to [`FIELD_LIMIT`].
    pub kwargsrepr: String,
}

impl ArgsText {
    /// The fields for `msg`.
    pub fn of(msg: &TaskMessage) -> Self {
        let argsrepr = msg.argsrepr.clone().unwrap_or_else(|| args_repr(&msg.args));
        let kwargsrepr = msg
            .kwargsrepr
            .clone()
            .unwrap_or_else(|| python_repr(&Value::Object(msg.kwargs.clone())));
        Self {
            args: kept_json(serde_json::to_string(&msg.args)),
            kwargs: kept_json(serde_json::to_string(&msg.kwargs)),
            argsrepr: plain(&argsrepr),
            kwargsrepr: plain(&kwargsrepr),
        }
    }

    /// The four fields in the order [`ArgsText::from_fields`] takes them.
    pub fn fields(&self) -> [&str; 4] {
        [&self.args, &self.kwargs, &self.argsrepr, &self.kwargsrepr]
    }

    /// Reads back what [`ArgsText::fields`] gave (missing fields are empty).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = &'a str>) -> Self {
        let mut it = fields.into_iter().map(str::to_owned);
        let mut next = || it.next().unwrap_or_default();
        Self {
            args: next(),
            kwargs: next(),
            argsrepr: next(),
            kwargsrepr: next(),
        }
    }

    /// `args` and `kwargs` as Celery's reply has them: JSON values, or the
    /// repr strings when `safe` (or when a value was too long to keep).
    pub fn values(&self, safe: bool) -> (Value, Value) {
        let pick = |json: &str, repr: &str| {
            (!safe)
                .then(|| serde_json::from_str(json).ok())
                .flatten()
                .unwrap_or_else(|| Value::String(repr.to_owned()))
        };
        (
            pick(&self.args, &self.argsrepr),
            pick(&self.kwargs, &self.kwargsrepr),
        )
    }
}

/// A message a task process holds but has not started, as listed for
/// `inspect reserved` (no ETA) and `inspect scheduled` (with its ETA).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Queued {
    /// The ETA (ISO 8601) of a scheduled message.
    pub eta: Option<String>,
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// The exchange it was delivered from.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its arguments.
    pub args: ArgsText,
}

impl Queued {
    /// One line of text (no newline) for [`Queued::parse`].
    pub fn line(&self) -> String {
        let mut fields = vec![
            self.eta.as_deref().map_or("R", |_| "S").to_owned(),
            plain(self.eta.as_deref().unwrap_or("")),
            plain(&self.id),
            plain(&self.name),
            plain(&self.exchange),
            plain(&self.routing_key),
        ];
        fields.extend(self.args.fields().map(str::to_owned));
        fields.join("\t")
    }

    /// Reads a line written by [`Queued::line`].
    pub fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split('\t').collect();
        let (kind, eta, id, name, exchange, routing_key, args) = match f.as_slice() {
            [kind @ ("R" | "S"), eta, id, name, exchange, routing_key, args @ ..] => {
                (*kind, *eta, *id, *name, *exchange, *routing_key, args)
            }
            _ => return None,
        };
        Some(Self {
            eta: (kind == "S").then(|| eta.to_owned()),
            id: id.to_owned(),
            name: name.to_owned(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            args: ArgsText::from_fields(args.iter().copied()),
        })
    }
}

fn kept_json(text: serde_json::Result<String>) -> String {
    // serde_json escapes control characters, so the text has no tab,
    // newline or NUL of its own.
    text.ok()
        .filter(|t| t.len() <= FIELD_LIMIT)
        .unwrap_or_default()
}

/// `text` cut to [`FIELD_LIMIT`] bytes with tabs, newlines and NULs turned
/// into spaces: safe to store as one field of a record or a line.
pub fn plain(text: &str) -> String {
    let mut end = text.len().min(FIELD_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\t', '\n', '\r', '\0'], " ")
}

/// The message's stamps as JSON text, `{"header": value}` for each of its
/// `stamped_headers` (Celery's `Request.stamps`); "" when it has none.
pub fn stamps(msg: &TaskMessage) -> String {
    let Some(stamped) = msg.headers.get("stamped_headers").and_then(Value::as_array) else {
        return String::new();
    };
    let stamps = msg.headers.get("stamps").and_then(Value::as_object);
    let map: serde_json::Map<String, Value> = stamped
        .iter()
        .filter_map(Value::as_str)
        .map(|h| {
            let value = stamps
                .and_then(|s| s.get(h))
                .cloned()
                .unwrap_or(Value::Null);
            (h.to_owned(), value)
        })
        .collect();
    if map.is_empty() {
        String::new()
    } else {
        Value::Object(map).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(args: Value, kwargs: Value, argsrepr: Option<&str>) -> TaskMessage {
        TaskMessage {
            args: args.as_array().cloned().unwrap_or_default(),
            kwargs: kwargs.as_object().cloned().unwrap_or_default(),
            argsrepr: argsrepr.map(str::to_owned),
            ..TaskMessage::default()
        }
    }

    #[test]
    fn values_are_json_unless_safe() {
        let msg = message(json!([4, "a\tb"]), json!({"z": [1]}), Some("(4, <hidden>)"));
        let text = ArgsText::from_fields(ArgsText::of(&msg).fields());
        assert_eq!(text.values(false), (json!([4, "a\tb"]), json!({"z": [1]})));
        assert_eq!(
            text.values(true),
            (json!("(4, <hidden>)"), json!("{'z': [1]}"))
        );
        assert!(text
            .fields()
            .iter()
            .all(|f| !f.contains(['\t', '\n', '\0'])));
    }

    #[test]
    fn a_value_too_long_to_keep_is_answered_with_its_repr() {
        let long = "x".repeat(FIELD_LIMIT * 2);
        let msg = message(json!([long]), json!({}), Some("('xxx…',)\n"));
        let text = ArgsText::of(&msg);
        assert!(text.args.is_empty());
        assert_eq!(text.values(false), (json!("('xxx…',) "), json!({})));
    }

    #[test]
    fn queued_lines_read_back() {
        let msg = message(json!([1, "two"]), json!({"k": null}), None);
        for eta in [None, Some("2026-11-25T17:31:30.745121+00:00".to_owned())] {
            let queued = Queued {
                eta,
                id: "id-1".into(),
                name: "tasks.add".into(),
                exchange: "ex\tchange".into(),
                routing_key: "rk".into(),
                args: ArgsText::of(&msg),
            };
            let line = queued.line();
            assert!(!line.contains('\n'));
            let back = Queued::parse(&line).expect("parses");
            assert_eq!(back.exchange, "ex change");
            assert_eq!(
                Queued {
                    exchange: "ex change".into(),
                    ..queued
                },
                back
            );
            assert_eq!(
                back.args.values(false),
                (json!([1, "two"]), json!({"k": null}))
            );
        }
        assert_eq!(Queued::parse("X\tnonsense"), None);
    }

    #[test]
    fn reprs_are_cut_on_a_character_boundary() {
        let msg = message(json!([]), json!({}), Some(&"é".repeat(FIELD_LIMIT)));
        let text = ArgsText::of(&msg);
        assert!(text.argsrepr.len() <= FIELD_LIMIT);
        assert!(text.argsrepr.chars().all(|c| c == 'é'));
    }
}
