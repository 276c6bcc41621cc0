//! The roles a forked process can have, and what the supervisor is given
//! to run in each. The supervisor forks; the composition root ([`crate::app`])
//! decides what a role's body is, so the supervisor needs to know nothing
//! about consuming tasks or answering remote control.

use crate::shm::SharedState;

/// What a forked process is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Task process number `n` (0-based; its shared-memory slot is `n`):
    /// consumes the worker's queues and runs tasks.
    Task(usize),
    /// The control process: worker events, remote control, `/metrics`.
    /// One per worker; its slot follows the task slots.
    Control,
}

impl Role {
    /// The role's slot in the shared memory, given the number of task slots.
    pub fn slot(self, task_slots: usize) -> usize {
        match self {
            Role::Task(n) => n,
            Role::Control => task_slots,
        }
    }

    /// Whether this is a task process.
    pub fn is_task(self) -> bool {
        matches!(self, Role::Task(_))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Task(n) => write!(f, "task process {}", n + 1),
            Role::Control => f.write_str("control process"),
        }
    }
}

/// The body of each role: called in the freshly forked process (single
/// threaded, every lock free), it runs the role to its end and returns the
/// process's exit code (see [`crate::exit`]).
pub trait RoleBodies {
    /// Runs `role` in this (forked) process.
    fn run(&self, role: Role, shm: SharedState) -> i32;

    /// Just before every fork, in the supervisor.
    fn before_fork(&self) {}

    /// Just after every fork, in the supervisor.
    fn after_fork_in_parent(&self) {}

    /// First thing in every forked process.
    fn after_fork_in_child(&self) {}
}

impl<F> RoleBodies for F
where
    F: Fn(Role, SharedState) -> i32,
{
    fn run(&self, role: Role, shm: SharedState) -> i32 {
        self(role, shm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_slot_follows_the_task_slots() {
        assert_eq!(Role::Task(0).slot(4), 0);
        assert_eq!(Role::Task(3).slot(4), 3);
        assert_eq!(Role::Control.slot(4), 4);
        assert!(Role::Task(2).is_task() && !Role::Control.is_task());
        assert_eq!(Role::Task(0).to_string(), "task process 1");
    }
}
