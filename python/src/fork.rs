//! Forking a process that holds a Python interpreter, as `os.fork()` does:
//! the interpreter's lock taken and its fork hooks run around `fork(2)`.
//! Without them the child's interpreter state is not re-initialised and
//! `os.register_at_fork` hooks (the `random` reseed, logging's locks,
//! `threading`) do not run.

#![allow(unsafe_code)]

use pyo3::ffi;

/// Taken just before a fork; consumed on either side of it.
pub struct ForkGuard {
    state: ffi::PyGILState_STATE,
}

// SAFETY: the state is a plain C enum value; the guard is created and
// consumed by the one thread that forks.
unsafe impl Send for ForkGuard {}

impl ForkGuard {
    /// Takes the interpreter's lock and runs its before-fork hooks.
    pub fn before() -> Self {
        // SAFETY: the interpreter is initialised (this module was imported
        // by it), and this thread does not hold the lock: the worker runs
        // with it released. PyOS_BeforeFork requires the lock, taken here.
        let state = unsafe { ffi::PyGILState_Ensure() };
        // SAFETY: called with the lock held, as documented.
        unsafe { ffi::PyOS_BeforeFork() };
        Self { state }
    }

    /// In the parent: the after-fork hooks, then the lock released.
    pub fn in_parent(self) {
        // SAFETY: paired with `before` on this thread, lock held.
        unsafe {
            ffi::PyOS_AfterFork_Parent();
            ffi::PyGILState_Release(self.state);
        }
    }

    /// In the child: the interpreter re-initialised for one thread, its
    /// after-fork hooks run, then the lock released.
    pub fn in_child(self) {
        // SAFETY: the child's only thread is the one that took the lock in
        // `before`; PyOS_AfterFork_Child requires exactly that.
        unsafe {
            ffi::PyOS_AfterFork_Child();
            ffi::PyGILState_Release(self.state);
        }
    }
}
