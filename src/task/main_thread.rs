//! The main thread of a task process, for task code that must run there.
//!
//! An interpreter such as CPython runs signal handlers on the main thread
//! only, and the soft time limit is a signal handler raising an exception
//! inside the running task. So in a process that hosts such tasks the main
//! thread runs both: the process's current-thread runtime, and, between
//! turns of it, the work submitted with [`run`], in place, one piece at a
//! time. A task so is not handed to another thread and back.
//!
//! While a piece of work runs the runtime is not driven by the main thread.
//! If the work lasts longer than [`TAKE_OVER_AFTER`], a watch thread takes
//! the runtime over (a current-thread runtime can be driven by any thread
//! that calls `block_on`) until the work returns: the process keeps
//! receiving, beating its liveness slot, firing time limits (the soft limit
//! interrupts the main thread with [`INTERRUPT`]) and acting on a drain
//! deadline while a long task runs. The watch thread sleeps on a timer
//! armed for each piece of work, so a short piece never wakes it.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};

/// A piece of work: runs on the main thread outside the runtime and returns
/// what hands its result over, which the main thread calls inside its next
/// turn of the runtime (a wake-up from there needs no write to the
/// runtime's wake-up descriptor).
type Work = Box<dyn FnOnce() -> Handover + Send>;
type Handover = Box<dyn FnOnce() + Send>;

static QUEUE: OnceLock<mpsc::UnboundedSender<Work>> = OnceLock::new();
static MAIN: OnceLock<Pthread> = OnceLock::new();

/// The signal that interrupts the task running on the main thread (the
/// soft time limit). It is blocked in every other thread of the process.
pub const INTERRUPT: Signal = Signal::SIGUSR1;

/// How long a piece of work runs on the main thread before the watch thread
/// drives the runtime in its stead.
pub const TAKE_OVER_AFTER: Duration = Duration::from_millis(2);

/// Runs `work` on this process's main thread and waits for it without
/// blocking the calling runtime. `None` if the process serves no main
/// thread (a task process hosting an app) or `work` panicked.
pub async fn run<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let queue = QUEUE.get()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    queue
        .send(Box::new(move || {
            let result = work();
            Box::new(move || {
                let _ = tx.send(result);
            })
        }))
        .ok()?;
    rx.await.ok()
}

/// Interrupts the work running on the main thread with [`INTERRUPT`].
pub fn interrupt() {
    if let Some(main) = MAIN.get() {
        let _ = pthread_kill(*main, INTERRUPT);
    }
}

/// Runs `body` on `runtime` from the calling thread, which must be the
/// process's main thread, and serves [`run`]'s work on it between turns of
/// the runtime, until `body` returns its exit code.
pub(crate) fn serve(runtime: Runtime, body: impl Future<Output = i32> + Send + 'static) -> i32 {
    let (tx, mut queue) = mpsc::unbounded_channel::<Work>();
    if QUEUE.set(tx).is_err() {
        return runtime.block_on(body);
    }
    let _ = MAIN.set(pthread_self());
    let runtime = Arc::new(runtime);
    let watch = match Watch::start(Arc::clone(&runtime)) {
        Ok(watch) => watch,
        Err(e) => {
            tracing::error!("cannot start the watch thread: {e}");
            return crate::exit::FAILED;
        }
    };
    let mut body = runtime.spawn(body);
    let mut handover: Option<Handover> = None;
    loop {
        let next = runtime.block_on(async {
            if let Some(hand) = handover.take() {
                hand();
            }
            tokio::select! {
                biased;
                work = queue.recv() => Ok(work),
                code = &mut body => Err(code),
            }
        });
        match next {
            Ok(Some(work)) => {
                watch.calling();
                // A panic drops the reply: the waiting task sees `None`.
                handover = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).ok();
                watch.returned();
            }
            Ok(None) => return crate::exit::FAILED,
            Err(code) => return code.unwrap_or(crate::exit::FAILED),
        }
    }
}

/// Where the main thread is, for the watch thread.
struct Phase;

impl Phase {
    /// Driving the runtime, or between pieces of work.
    const IDLE: u8 = 0;
    /// Running a piece of work; the runtime is not driven.
    const CALLING: u8 = 1;
    /// Running a piece of work; the watch thread drives the runtime.
    const TAKEN: u8 = 2;
}

struct Shared {
    phase: AtomicU8,
    /// The main thread is back: the watch thread gives the runtime up.
    back: Notify,
}

/// The main thread's side of the watch thread.
struct Watch {
    shared: Arc<Shared>,
    timer: Arc<TimerFd>,
}

impl Watch {
    fn start(runtime: Arc<Runtime>) -> std::io::Result<Self> {
        let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)
            .map(Arc::new)
            .map_err(std::io::Error::from)?;
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(Phase::IDLE),
            back: Notify::new(),
        });
        let (thread_shared, thread_timer) = (Arc::clone(&shared), Arc::clone(&timer));
        let mut blocked = SigSet::empty();
        blocked.add(INTERRUPT);
        // The new thread inherits the mask: only the main thread takes the signal.
        let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None);
        // A task process, after fork: the supervisor's single-thread rule
        // does not reach here.
        #[allow(clippy::disallowed_methods)]
        let spawned = std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || watch(&runtime, &thread_shared, &thread_timer));
        let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&blocked), None);
        spawned?;
        Ok(Self { shared, timer })
    }

    /// A piece of work starts on the main thread.
    fn calling(&self) {
        self.shared.phase.store(Phase::CALLING, Ordering::SeqCst);
        let after = TimeSpec::from_duration(TAKE_OVER_AFTER);
        let _ = self
            .timer
            .set(Expiration::OneShot(after), TimerSetTimeFlags::empty());
    }

    /// The piece of work returned: if the watch thread drives the runtime,
    /// it hands it back (the main thread's next `block_on` waits for that).
    fn returned(&self) {
        let _ = self.timer.unset();
        let was = self.shared.phase.swap(Phase::IDLE, Ordering::SeqCst);
        if was == Phase::TAKEN {
            self.shared.back.notify_one();
        }
    }
}

/// The watch thread: when a piece of work outlasts its timer, drives the
/// runtime until the main thread is back.
fn watch(runtime: &Runtime, shared: &Shared, timer: &TimerFd) {
    loop {
        if timer.wait().is_err() {
            // Only a broken descriptor gets here: pace the retries.
            std::thread::sleep(TAKE_OVER_AFTER);
            continue;
        }
        let taken = shared.phase.compare_exchange(
            Phase::CALLING,
            Phase::TAKEN,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if taken.is_ok() {
            // `returned` sends exactly one notice per take-over; one sent
            // before this waits is kept as a permit.
            runtime.block_on(shared.back.notified());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    // One test: `serve` owns the process-wide queue once set.
    #[test]
    fn work_runs_in_place_and_a_long_piece_lets_the_runtime_run() {
        let serving = std::thread::current().id();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let code = serve(runtime, async move {
            let ticks = Arc::new(AtomicU32::new(0));
            let counter = Arc::clone(&ticks);
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
            let quick = run(|| std::thread::current().id()).await;
            let during_long = run(move || {
                let before = ticks.load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                ticks.load(Ordering::SeqCst) - before
            })
            .await;
            let after = run(|| 7).await;
            ticker.abort();
            assert_eq!(quick, Some(serving), "work runs on the serving thread");
            let during_long = during_long.unwrap();
            assert!(
                during_long >= 10,
                "the runtime ran {during_long} ticks in 200 ms of work"
            );
            assert_eq!(
                after,
                Some(7),
                "the main thread serves again after a take-over"
            );
            42
        });
        assert_eq!(code, 42);
    }
}
