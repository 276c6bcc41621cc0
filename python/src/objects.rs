//! Python objects built straight from decoded JSON values: what `json.loads`
//! gives for the same text, without the text in between (the task request
//! the bridge hands Celery's tracer, once per task). The differential suites
//! (`tests/interop/test_python_tasks.py`: every JSON type as an argument, its
//! value and type as the task saw them, compared with `celery worker`) hold
//! it to that.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use serde_json::{Map, Value};

/// `value` as `json.loads` would give it: `None`, `bool`, `int`, `float`,
/// `str`, `list`, `dict` (keys in the value's order).
pub(crate) fn value<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => list(py, items)?.into_any(),
        Value::Object(map) => dict(py, map)?.into_any(),
    })
}

/// A JSON array as a `list`.
pub(crate) fn list<'py>(py: Python<'py>, items: &[Value]) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for item in items {
        out.append(value(py, item)?)?;
    }
    Ok(out)
}

/// A JSON object as a `dict`.
pub(crate) fn dict<'py>(py: Python<'py>, map: &Map<String, Value>) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    insert_all(&out, map)?;
    Ok(out)
}

/// Adds every entry of `map` to `out`, in order.
pub(crate) fn insert_all(out: &Bound<'_, PyDict>, map: &Map<String, Value>) -> PyResult<()> {
    let py = out.py();
    for (k, v) in map {
        out.set_item(PyString::new(py, k), value(py, v)?)?;
    }
    Ok(())
}
