//! The main thread of a task process, for task code that must run there.
//!
//! An interpreter such as CPython runs signal handlers on the main thread
//! only, and the soft time limit is a signal handler raising an exception
//! inside the running task. So in a process that hosts such tasks the
//! async runtime runs on a thread of its own and the main thread serves
//! the work submitted with [`run`], one piece at a time.

use std::sync::mpsc;
use std::sync::OnceLock;

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

type Work = Box<dyn FnOnce() + Send>;

enum Message {
    Run(Work),
    Stop(i32),
}

static QUEUE: OnceLock<mpsc::Sender<Message>> = OnceLock::new();
static MAIN: OnceLock<Pthread> = OnceLock::new();

/// The signal that interrupts the task running on the main thread (the
/// soft time limit). It is blocked in every other thread of the process.
pub const INTERRUPT: Signal = Signal::SIGUSR1;

/// Runs `work` on this process's main thread and waits for it without
/// blocking the calling runtime. `None` if the process serves no main
/// thread (a task process hosting an app) or `work` panicked.
pub async fn run<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let queue = QUEUE.get()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    queue
        .send(Message::Run(Box::new(move || {
            let _ = tx.send(work());
        })))
        .ok()?;
    rx.await.ok()
}

/// Interrupts the work running on the main thread with [`INTERRUPT`].
pub fn interrupt() {
    if let Some(main) = MAIN.get() {
        let _ = pthread_kill(*main, INTERRUPT);
    }
}

/// Runs `body` on a new thread (with [`INTERRUPT`] blocked there) and serves
/// [`run`]'s work on the calling thread, which must be the process's main
/// thread, until `body` returns its exit code.
pub(crate) fn serve(body: impl FnOnce() -> i32 + Send + 'static) -> i32 {
    let (tx, rx) = mpsc::channel();
    if QUEUE.set(tx.clone()).is_err() {
        return body();
    }
    let _ = MAIN.set(pthread_self());
    let mut blocked = SigSet::empty();
    blocked.add(INTERRUPT);
    // The new thread inherits the mask: only the main thread takes the signal.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None);
    // A task process, after fork: the supervisor's single-thread rule
    // does not reach here.
    #[allow(clippy::disallowed_methods)]
    let spawned = std::thread::Builder::new()
        .name("runtime".into())
        .spawn(move || {
            let code = body();
            let _ = tx.send(Message::Stop(code));
        });
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&blocked), None);
    if let Err(e) = spawned {
        tracing::error!("cannot start the runtime thread: {e}");
        return crate::exit::FAILED;
    }
    loop {
        match rx.recv() {
            Ok(Message::Run(work)) => {
                // A panic drops the reply: the waiting task sees `None`.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            }
            Ok(Message::Stop(code)) => return code,
            Err(_) => return crate::exit::FAILED,
        }
    }
}
