//! Shutdown signals for the processes that run an async runtime (task and
//! control processes). The supervisor has its own, thread-free handlers in
//! `supervisor::signals`.

use tokio::signal::unix::{signal, Signal, SignalKind};

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
