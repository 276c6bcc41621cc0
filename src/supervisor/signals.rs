//! Signals in the supervisor without threads: each handler sets a flag and
//! writes a byte to a self-pipe that the main loop polls. The doorbell
//! ([`crate::signals::DOORBELL`]) only wakes the loop, which then looks at
//! the shared memory.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use signal_hook::consts::{SIGCHLD, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::SigId;

use crate::signals::DOORBELL;

/// What arrived since the last look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// SIGTERM or SIGINT.
    pub terminate: bool,
    /// SIGQUIT.
    pub quit: bool,
    /// SIGCHLD.
    pub child: bool,
}

/// The supervisor's signal handlers.
pub struct Signals {
    terminate: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    child: Arc<AtomicBool>,
    wake: UnixStream,
    ids: Vec<SigId>,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let terminate = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        let child = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for (signal, flag) in [
            (SIGTERM, &terminate),
            (SIGINT, &terminate),
            (SIGQUIT, &quit),
            (SIGCHLD, &child),
        ] {
            ids.push(signal_hook::flag::register(signal, Arc::clone(flag))?);
            ids.push(signal_hook::low_level::pipe::register(
                signal,
                notify.try_clone()?,
            )?);
        }
        ids.push(signal_hook::low_level::pipe::register(
            DOORBELL as i32,
            notify.try_clone()?,
        )?);
        Ok(Self {
            terminate,
            quit,
            child,
            wake,
            ids,
        })
    }

    /// Waits up to `timeout` for a signal, then reports (and clears) what
    /// arrived. The timeout is rounded up to whole milliseconds, so a
    /// deadline is never woken for a little early (and then spun on).
    pub fn wait(&mut self, timeout: Duration) -> Pending {
        let ms = u16::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        // EINTR is expected: a signal is exactly what we wait for.
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut sink = [0u8; 64];
        while matches!(self.wake.read(&mut sink), Ok(n) if n > 0) {}
        Pending {
            terminate: self.terminate.swap(false, Ordering::AcqRel),
            quit: self.quit.swap(false, Ordering::AcqRel),
            child: self.child.swap(false, Ordering::AcqRel),
        }
    }

    /// In a freshly forked child: removes the supervisor's handlers, so the
    /// child's own runtime decides what signals do.
    pub fn forget_in_child(&self) {
        for id in &self.ids {
            signal_hook::low_level::unregister(*id);
        }
    }
}
