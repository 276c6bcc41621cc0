//! Python `repr()` of JSON values, for the text fields Celery puts in
//! events and headers (`argsrepr`, `result`, `exception`).

use serde_json::Value;

/// The longest repr Celery sends in events (`saferepr(..., 1024)`).
pub const MAX_REPR: usize = 1024;

/// Python's `repr()` of a JSON value: `'text'`, `None`, `True`, `[1, 2]`, `{'k': 1}`.
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

/// `repr()` cut to `limit` characters with a trailing `...`, like Celery's saferepr.
pub fn short_repr(value: &Value, limit: usize) -> String {
    truncate(python_repr(value), limit)
}

/// The repr of positional arguments as a tuple: `(2, 3)`, `(1,)`, `()`.
pub fn args_repr(args: &[Value]) -> String {
    let inner: Vec<String> = args.iter().map(python_repr).collect();
    let text = match inner.len() {
        1 => format!("({},)", inner[0]),
        _ => format!("({})", inner.join(", ")),
    };
    truncate(text, MAX_REPR)
}

fn truncate(text: String, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text;
    }
    let mut cut: String = text.chars().take(limit.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

fn write_repr(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                out.push_str(&float_repr(f));
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(k, out);
                out.push_str(": ");
                write_repr(v, out);
            }
            out.push('}');
        }
    }
}

fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn write_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_and_containers() {
        assert_eq!(python_repr(&json!(5)), "5");
        assert_eq!(python_repr(&json!(2.0)), "2.0");
        assert_eq!(python_repr(&json!(0.5)), "0.5");
        assert_eq!(python_repr(&json!(null)), "None");
        assert_eq!(python_repr(&json!(true)), "True");
        assert_eq!(python_repr(&json!("it's")), "\"it's\"");
        assert_eq!(python_repr(&json!({"a": [1, "b"]})), "{'a': [1, 'b']}");
    }

    #[test]
    fn args_are_a_tuple() {
        assert_eq!(args_repr(&[json!(2), json!(3)]), "(2, 3)");
        assert_eq!(args_repr(&[json!(1)]), "(1,)");
        assert_eq!(args_repr(&[]), "()");
    }

    #[test]
    fn long_values_are_cut() {
        let s = short_repr(&json!("x".repeat(5000)), MAX_REPR);
        assert_eq!(s.chars().count(), MAX_REPR);
        assert!(s.ends_with("..."));
    }
}
