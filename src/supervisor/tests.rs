//! The supervisor's bookkeeping, driven with synthetic exits (no fork).

use super::*;
use crate::config::{parse, Invocation};

fn supervisor(args: &[&str]) -> Supervisor {
    let mut argv = vec!["celeriac", "worker"];
    argv.extend_from_slice(args);
    let config = match parse(argv, &[]) {
        Ok(Invocation::Worker(c)) => Arc::new(*c),
        _ => panic!("bad test arguments"),
    };
    let never = |role: Role, _: SharedState| -> i32 { panic!("{role} must not be forked") };
    Supervisor::new(config, Box::new(never)).expect("supervisor")
}

/// Pretends `role` runs as `pid`, without forking.
fn adopt(s: &mut Supervisor, role: Role, pid: i32) -> Pid {
    let pid = Pid::from_raw(pid);
    let entry = s.children.iter_mut().find(|c| c.role == role).unwrap();
    entry.pid = Some(pid);
    entry.started = Instant::now();
    pid
}

fn deaths(s: &Supervisor, cause: DeathCause) -> u64 {
    let at = DeathCause::ALL.iter().position(|c| *c == cause).unwrap();
    s.shm.deaths()[at]
}

#[test]
fn the_table_has_every_task_slot_then_the_control_process() {
    let s = supervisor(&["-c", "2"]);
    let roles: Vec<Role> = s.children.iter().map(|c| c.role).collect();
    // Room for pool_grow: twice -c, at least 4 more.
    assert_eq!(
        roles,
        [
            Role::Task(0),
            Role::Task(1),
            Role::Task(2),
            Role::Task(3),
            Role::Task(4),
            Role::Task(5),
            Role::Control
        ]
    );
    assert_eq!(s.shm.task_slots().len(), 6);
}

#[test]
fn a_quick_crash_is_counted_and_delays_the_restart() {
    let mut s = supervisor(&["-c", "2"]);
    let pid = adopt(&mut s, Role::Task(1), 4_000_001);
    s.child_exited(pid, Ended::Signal(Signal::SIGSEGV));
    assert_eq!(deaths(&s, DeathCause::Crashed), 1);
    let entry = &s.children[1];
    assert_eq!(entry.pid, None);
    assert_eq!(entry.quick_exits, 1);
    assert!(entry.respawn_at > Instant::now() + Duration::from_millis(100));
    assert!(s.fatal.is_none());
}

#[test]
fn a_recycled_process_is_replaced_at_once() {
    let mut s = supervisor(&["-c", "2"]);
    let pid = adopt(&mut s, Role::Task(0), 4_000_002);
    s.child_exited(pid, Ended::Code(exit::RECYCLED));
    assert_eq!(deaths(&s, DeathCause::Recycled), 1);
    assert_eq!(s.children[0].quick_exits, 0);
    assert!(s.children[0].respawn_at <= Instant::now());
}

#[test]
fn repeated_refusals_at_boot_stop_the_worker() {
    let mut s = supervisor(&["-c", "1"]);
    for n in 0..MAX_BOOT_FAILURES {
        assert!(s.fatal.is_none(), "fatal too early, after {n}");
        let pid = adopt(&mut s, Role::Task(0), 4_000_100 + n as i32);
        s.child_exited(pid, Ended::Code(exit::BOOT_REFUSED));
    }
    assert_eq!(deaths(&s, DeathCause::Boot), u64::from(MAX_BOOT_FAILURES));
    let fatal = s.fatal.expect("the worker gives up");
    assert!(fatal.contains("after 5 tries"), "{fatal}");
}

#[test]
fn during_a_drain_deaths_are_shutdowns_and_nothing_restarts() {
    let mut s = supervisor(&["-c", "1"]);
    let task = adopt(&mut s, Role::Task(0), 4_000_003);
    adopt(&mut s, Role::Control, 4_000_004);
    s.drain_deadline = Some(Instant::now() + Duration::from_secs(60));
    assert_eq!(s.live_task_children(), 1);
    assert_eq!(s.live_children(), 2);
    s.child_exited(task, Ended::Code(exit::DRAINED));
    assert_eq!(deaths(&s, DeathCause::Shutdown), 1);
    assert_eq!(s.live_task_children(), 0);
    assert_eq!(s.live_children(), 1, "the control process is stopped last");
}

#[test]
fn an_unknown_pid_is_an_orphan() {
    let mut s = supervisor(&["-c", "1"]);
    s.child_exited(Pid::from_raw(4_000_005), Ended::Code(1));
    assert!(DeathCause::ALL.iter().all(|c| deaths(&s, *c) == 0));
}

/// Every process running and the state file just written: the loop sleeps
/// until the next rewrite, not on a short tick.
fn settled(args: &[&str]) -> Supervisor {
    let mut s = supervisor(args);
    let roles: Vec<Role> = s.children.iter().map(|c| c.role).collect();
    let target = s.shm.target();
    for (n, role) in roles.into_iter().enumerate() {
        if matches!(role, Role::Task(i) if i >= target) {
            continue;
        }
        adopt(&mut s, role, 4_100_000 + n as i32);
    }
    s.state_written = Some(Instant::now());
    s
}

fn wakes_in(s: &Supervisor) -> Duration {
    s.next_wake().saturating_duration_since(Instant::now())
}

#[test]
fn an_idle_supervisor_sleeps_until_the_state_file_is_due() {
    let s = settled(&["-c", "2"]);
    let wait = wakes_in(&s);
    assert!(
        wait > STATE_EVERY - Duration::from_millis(100) && wait <= STATE_EVERY,
        "{wait:?}"
    );
    // Well within the probes' default --max-age (10 s).
    assert!(STATE_EVERY * 5 <= Duration::from_secs(10));
}

#[test]
fn the_supervisor_wakes_for_a_hard_limit_a_restart_and_the_drain() {
    let mut s = settled(&["-c", "2"]);
    // A task whose hard limit (plus the grace) falls due in about 200 ms.
    let task = crate::shm::RunningTask {
        id: "t".into(),
        started_ms: now_ms() - 2_000,
        deadline_ms: now_ms() + 200 - HARD_LIMIT_GRACE_MS,
        ..Default::default()
    };
    s.shm.task_slots()[0].start_task(&task);
    let wait = wakes_in(&s);
    assert!(wait <= Duration::from_millis(202), "{wait:?}");
    assert!(wait >= Duration::from_millis(100), "{wait:?}");
    // Once killed for it, the task is no longer a reason to wake.
    s.children[0].killed_for = Some(DeathCause::TimeLimit);
    assert!(wakes_in(&s) > Duration::from_millis(500));
    // A process to restart in 300 ms.
    let pid = s.children[1].pid.unwrap();
    s.child_exited(pid, Ended::Code(exit::RECYCLED));
    s.children[1].respawn_at = Instant::now() + Duration::from_millis(300);
    let wait = wakes_in(&s);
    assert!(
        wait <= Duration::from_millis(300) && wait > Duration::from_millis(200),
        "{wait:?}"
    );
    // Draining: no restarts, but the deadline.
    s.drain_deadline = Some(Instant::now() + Duration::from_millis(50));
    assert!(wakes_in(&s) <= Duration::from_millis(50));
}

#[test]
fn a_doorbell_wakes_the_supervisor() {
    let mut signals = Signals::install().expect("signals");
    let start = Instant::now();
    crate::signals::ring(std::process::id());
    signals.wait(Duration::from_secs(20));
    assert!(start.elapsed() < Duration::from_secs(10));
}
