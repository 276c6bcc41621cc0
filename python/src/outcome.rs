//! `celeriac._native.Outcome`: the function of the lean trace path's fallback tracer
//! (`celeriac/_lean.py`). Celery's tracer calls it as it would call the task; it gives
//! back the value or raises the exception the task already produced.
//!
//! It is native code so that raising adds no frame of its own: the traceback the
//! tracer stores and sends is its own frame followed by the task's frames, as under
//! `celery worker`.

use std::sync::Mutex;

use pyo3::exceptions::{PyBaseException, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// What the next call returns or raises.
enum Pending {
    Value(Py<PyAny>),
    Raise(Py<PyBaseException>),
}

/// A callable that returns the value given by `give`, or raises the exception given by
/// `throw` (with the traceback it carries), once.
#[pyclass(module = "celeriac._native")]
#[derive(Default)]
pub struct Outcome {
    pending: Mutex<Option<Pending>>,
}

impl Outcome {
    fn set(&self, pending: Option<Pending>) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = pending;
    }
}

#[pymethods]
impl Outcome {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// The next call returns `value`.
    fn give(&self, value: Py<PyAny>) {
        self.set(Some(Pending::Value(value)));
    }

    /// The next call raises `exc`.
    fn throw(&self, exc: Py<PyBaseException>) {
        self.set(Some(Pending::Raise(exc)));
    }

    /// Forgets what was given.
    fn clear(&self) {
        self.set(None);
    }

    #[pyo3(signature = (*_args, **_kwargs))]
    fn __call__(
        &self,
        py: Python<'_>,
        _args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match pending {
            Some(Pending::Value(value)) => Ok(value),
            Some(Pending::Raise(exc)) => Err(PyErr::from_value(exc.into_bound(py).into_any())),
            None => Err(PyRuntimeError::new_err(
                "celeriac: the lean trace path's outcome was already taken",
            )),
        }
    }
}
