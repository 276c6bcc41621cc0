//! Shutdown signals for the processes that run an async runtime (task and
//! control processes), and the doorbell every process rings to say "look at
//! the shared memory now". The supervisor has its own, thread-free handlers
//! in `supervisor::signals`.

use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The doorbell: a process that changed something in the shared memory
/// that another one waits for sends it this signal, so nobody has to poll
/// on a short timer. Its default action is to be ignored, so a doorbell
/// that reaches a process before it listens does nothing (the process
/// looks at the shared memory once it listens); sockets raise it only for
/// out-of-band data of a socket with an owner (`F_SETOWN`), which no
/// celeriac process sets.
///
/// Who rings whom:
/// - a task process changing its state: the supervisor (probe file,
///   readiness) and the control process (a hosted app's `worker_ready`);
/// - the control process after `pool_grow`/`pool_shrink`: the supervisor;
///   after `add_consumer`/`cancel_consumer`: the supervisor and the task processes;
/// - the supervisor after recording a lost task: the task processes; when
///   a drain begins: the control process.
pub const DOORBELL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGURG;

/// Rings the doorbell of process `pid` (nothing for 0, or a pid that is gone).
pub fn ring(pid: u32) {
    // 0 and 1 are never ours to ring (0 would be our process group).
    match i32::try_from(pid) {
        Ok(pid) if pid > 1 => {
            let _ = kill(Pid::from_raw(pid), DOORBELL);
        }
        _ => {}
    }
}

/// A process's doorbell, as a tokio signal stream (see [`DOORBELL`]).
pub struct Doorbell(Option<Signal>);

impl Doorbell {
    /// Listens (inside a tokio runtime). If the handler cannot be
    /// installed, [`Doorbell::rung`] falls back to a 1 s timer.
    pub fn install() -> Self {
        Self(signal(SignalKind::from_raw(DOORBELL as i32)).ok())
    }

    /// Waits for the next ring (rings since the last wait count as one).
    pub async fn rung(&mut self) {
        match &mut self.0 {
            Some(s) => {
                s.recv().await;
            }
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// How a process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: finish what runs, hand back what waits.
    Warm,
    /// SIGQUIT: stop now, still handing back what can be.
    Cold,
}

/// The handlers of a task or control process.
pub struct ProcessSignals {
    term: Signal,
    int: Signal,
    quit: Signal,
}

impl ProcessSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    /// Waits for the next stop signal.
    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.term.recv() => Stop::Warm,
            _ = self.int.recv() => Stop::Warm,
            _ = self.quit.recv() => Stop::Cold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_reaches_the_doorbell() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut doorbell = Doorbell::install();
            assert!(doorbell.0.is_some());
            ring(std::process::id());
            tokio::time::timeout(Duration::from_secs(10), doorbell.rung())
                .await
                .expect("rung");
        });
    }

    #[test]
    fn nobody_is_rung_for_pid_0_or_1() {
        // kill(0) would signal our process group, kill(1) init.
        ring(0);
        ring(1);
    }
}
