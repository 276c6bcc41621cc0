//! Tasks for celeriac's own failure tests, registered only with
//! `--with-test-tasks` (never in production: they crash and hog on purpose).
//!
//! | task | does |
//! |---|---|
//! | `celeriac.test.record(key, token, seconds=0)` | waits, then `HINCRBY key token 1` in Redis; returns `{"pid", "count"}` |
//! | `celeriac.test.crash(signal="SIGKILL")` | kills its own process with `signal` |
//! | `celeriac.test.spin(seconds)` | burns CPU in a blocking loop, ignoring every limit |
//! | `celeriac.test.hog(mib)` | allocates and keeps `mib` MiB, returns the pid |
//! | `celeriac.test.orphan()` | leaves a short-lived orphan process behind, returns its pid |
//! | `celeriac.test.deaf()` | clears its process's parent-death signal (as if the supervisor's death went unnoticed), returns the pid |
//!
//! `record` talks to `CELERIAC_TEST_REDIS` (default `redis://127.0.0.1:6379/0`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Context, Registry, TaskError};

#[derive(Deserialize)]
struct Record {
    key: String,
    token: String,
    seconds: Option<f64>,
}

#[derive(Deserialize)]
struct Crash {
    signal: Option<String>,
}

#[derive(Deserialize)]
struct Spin {
    seconds: f64,
}

#[derive(Deserialize)]
struct Hog {
    mib: usize,
}

static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Adds the test tasks to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_async(
        "celeriac.test.record",
        &["key", "token", "seconds"],
        |_ctx: Context, a: Record| async move {
            if let Some(s) = a.seconds.filter(|s| *s > 0.0) {
                tokio::time::sleep(Duration::from_secs_f64(s.min(3600.0))).await;
            }
            let url = std::env::var("CELERIAC_TEST_REDIS")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
            let fail = |e: redis::RedisError| TaskError::runtime_error(format!("redis: {e}"));
            let client = redis::Client::open(url).map_err(fail)?;
            let mut conn = client
                .get_multiplexed_tokio_connection()
                .await
                .map_err(fail)?;
            let count: i64 = redis::cmd("HINCRBY")
                .arg(&a.key)
                .arg(&a.token)
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(fail)?;
            Ok::<Value, TaskError>(json!({"pid": std::process::id(), "count": count}))
        },
    );
    registry.register("celeriac.test.crash", &["signal"], |_ctx, a: Crash| {
        let name = a.signal.unwrap_or_else(|| "SIGKILL".into());
        let signal: nix::sys::signal::Signal = name
            .parse()
            .map_err(|_| TaskError::value_error(format!("unknown signal {name}")))?;
        nix::sys::signal::raise(signal).map_err(|e| TaskError::runtime_error(e.to_string()))?;
        std::thread::sleep(Duration::from_secs(5));
        Ok::<Value, TaskError>(Value::Null)
    });
    registry.register("celeriac.test.spin", &["seconds"], |_ctx, a: Spin| {
        let end = Instant::now() + Duration::from_secs_f64(a.seconds.clamp(0.0, 3600.0));
        let mut x: u64 = 0;
        while Instant::now() < end {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        Ok::<u64, TaskError>(x)
    });
    registry.register("celeriac.test.orphan", &[], |_ctx, (): ()| {
        // The shell exits at once; its background sleep is re-parented to
        // the nearest subreaper (the supervisor) and must be reaped there.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"])
            .output()
            .map_err(|e| TaskError::runtime_error(e.to_string()))?;
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| TaskError::runtime_error("no pid"))?;
        Ok::<u32, TaskError>(pid)
    });
    // Async, so that it runs on the process's main thread: the parent-death
    // signal is kept per thread.
    registry.register_async("celeriac.test.deaf", &[], |_ctx: Context, (): ()| async {
        nix::sys::prctl::set_pdeathsig(None)
            .map_err(|e| TaskError::runtime_error(e.to_string()))?;
        Ok::<u32, TaskError>(std::process::id())
    });
    registry.register("celeriac.test.hog", &["mib"], |_ctx, a: Hog| {
        let block = vec![1u8; a.mib.min(4096) * 1024 * 1024];
        HOARD
            .lock()
            .map_err(|_| TaskError::runtime_error("poisoned"))?
            .push(block);
        Ok::<u32, TaskError>(std::process::id())
    });
}
