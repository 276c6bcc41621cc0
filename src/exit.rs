//! Every process exit code celeriac uses, in one place.
//!
//! The worker (the supervisor's own exit status, what the container
//! runtime sees) and the processes it forks share this vocabulary: a forked
//! process's code tells the supervisor how to count its death and whether
//! to start it again at once, later, or not at all.
//!
//! | code | constant | who exits with it | meaning |
//! |---:|---|---|---|
//! | 0 | [`DRAINED`] | worker, task and control processes | stopped after a shutdown with nothing lost |
//! | 1 | [`FAILED`] | worker, any process | stopped on an error (a cold shutdown of the worker too) |
//! | 3 | [`BOOT_REFUSED`] | task process | the broker or backend refused it at startup (credentials, vhost, arguments) |
//! | 4 | [`UNREACHABLE`] | task process | the broker or result backend could not be reached |
//! | 5 | [`RECYCLED`] | task process | drained to be replaced (`--max-tasks-per-child`, `--max-memory-per-child`) |
//! | 64 | [`USAGE`] | worker | a bad flag or environment variable (sysexits `EX_USAGE`), before anything connects |

/// A clean stop after a shutdown: everything received was finished or handed back.
pub const DRAINED: i32 = 0;
/// A stop on an error. The worker exits with it after a cold shutdown or a
/// fatal startup failure.
pub const FAILED: i32 = 1;
/// A task process the broker or result backend refused at startup
/// (credentials, vhost, arguments). Retrying the same way will not help.
pub const BOOT_REFUSED: i32 = 3;
/// A task process that could not reach the broker or the result backend.
/// Retrying later may help.
pub const UNREACHABLE: i32 = 4;
/// A task process that drained itself to be replaced by a fresh one.
pub const RECYCLED: i32 = 5;
/// A bad flag or environment variable (sysexits `EX_USAGE`).
pub const USAGE: i32 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let mut codes = [DRAINED, FAILED, BOOT_REFUSED, UNREACHABLE, RECYCLED, USAGE];
        codes.sort_unstable();
        let before = codes.len();
        let mut unique = codes.to_vec();
        unique.dedup();
        assert_eq!(unique.len(), before);
    }
}
