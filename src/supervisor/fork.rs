//! Forking a process for a role, with the single-thread rule checked every time.

use nix::sys::signal::Signal;
use nix::unistd::{fork, getppid, ForkResult, Pid};
use thiserror::Error;
use tracing::debug;

use super::roles::{Role, RoleBodies};
use super::signals::Signals;
use crate::shm::SharedState;

/// Why a child could not be forked.
#[derive(Debug, Error)]
pub enum ForkError {
    /// The supervisor has more than one thread: forking now would be unsound.
    #[error("refusing to fork: the supervisor has {0} threads (it must have exactly 1)")]
    Threads(usize),
    /// A tokio runtime exists in the supervisor.
    #[error("refusing to fork: a tokio runtime is active in the supervisor")]
    Runtime,
    /// fork(2) failed.
    #[error("fork failed: {0}")]
    Fork(nix::Error),
}

/// The number of threads of this process, from /proc/self/status.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Forks a process for `role`, which runs `bodies.run(role, …)` and exits
/// with its code. Returns its pid in the supervisor; never returns in the
/// forked process.
pub fn spawn(
    role: Role,
    shm: &SharedState,
    signals: &Signals,
    bodies: &dyn RoleBodies,
) -> Result<Pid, ForkError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ForkError::Threads(threads));
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(ForkError::Runtime);
    }
    debug!(threads, "forking {role}");
    let supervisor = nix::unistd::getpid();
    let slot = &shm.slots()[role.slot(shm.task_slots().len())];
    slot.reset();
    // An embedded interpreter takes its lock and runs its fork hooks.
    bodies.before_fork();
    // SAFETY: the supervisor is single-threaded (checked just above), so the
    // child starts with every lock free and may allocate. The child never
    // returns into the supervisor's code: it runs its role's body and exits.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    if !matches!(forked, Ok(ForkResult::Child)) {
        bodies.after_fork_in_parent();
    }
    match forked.map_err(ForkError::Fork)? {
        ForkResult::Parent { child } => {
            slot.set_pid(child.as_raw() as u32);
            Ok(child)
        }
        ForkResult::Child => {
            bodies.after_fork_in_child();
            signals.forget_in_child();
            // Own process group: a terminal's Ctrl-C reaches the supervisor
            // only, which then stops the children itself.
            let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
            // If the supervisor is killed, drain instead of running on alone.
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
            if getppid() != supervisor {
                std::process::exit(crate::exit::DRAINED);
            }
            std::process::exit(bodies.run(role, *shm))
        }
    }
}
