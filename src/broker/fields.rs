//! AMQP field tables <-> JSON values, with the field types py-amqp expects.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// Converts an AMQP header table to a JSON object.
pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
        .collect()
}

/// Converts one AMQP field value to JSON. Byte strings become UTF-8 text
/// (lossily), timestamps become seconds, decimals become floats.
pub fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => Value::Object(table_to_json(t)),
        AMQPValue::Void => Value::Null,
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Converts a JSON object to an AMQP table using the types Python sends:
/// `S` strings, `t` booleans, `I` 32-bit ints (64-bit beyond), `d` floats,
/// `V` null, `A` arrays and `F` tables.
pub fn json_to_table(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in map {
        table.insert(ShortString::from(k.as_str()), json_to_value(v));
    }
    table
}

/// Converts one JSON value to an AMQP field value (see [`json_to_table`]).
pub fn json_to_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(i),
                }
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(json_to_value).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(json_to_table(map)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_celery_header_shapes() {
        let headers = json!({
            "lang": "py", "task": "tasks.add", "shadow": null, "retries": 1,
            "timelimit": [2, 1.5], "ignore_result": false, "stamps": {}, "big": 1099511627776_i64
        });
        let map = headers.as_object().unwrap();
        let table = json_to_table(map);
        assert!(matches!(
            table.inner().get("retries"),
            Some(AMQPValue::LongInt(1))
        ));
        assert!(matches!(
            table.inner().get("big"),
            Some(AMQPValue::LongLongInt(_))
        ));
        assert!(matches!(table.inner().get("shadow"), Some(AMQPValue::Void)));
        assert!(matches!(
            table.inner().get("lang"),
            Some(AMQPValue::LongString(_))
        ));
        assert_eq!(Value::Object(table_to_json(&table)), headers);
    }
}
