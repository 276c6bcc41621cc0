//! `celeriac._native`: the worker as a Python extension module, so that
//! `pip install celeriac` puts a `celeriac` command in a venv beside
//! Celery and the team's own code. The console script (`celeriac._cli`)
//! calls [`main`] with `sys.argv`; everything else is the same Rust worker
//! as the standalone binary, plus the host ([`host::PythonHost`]) that runs
//! the tasks of the Celery app `-A` names.

mod fork;
mod host;
mod objects;
mod outcome;

use std::sync::Arc;

use pyo3::prelude::*;

/// Runs the `celeriac` command line (`argv[0]` is the program name) and
/// returns its exit code. The interpreter's lock is released while the
/// worker runs; the host takes it when it calls into Python.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| {
        celeriac::App::new()
            .with_host(Arc::new(host::PythonHost::default()))
            .run_with_args(argv)
    })
}

/// The module Python imports as `celeriac._native`.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_class::<outcome::Outcome>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
