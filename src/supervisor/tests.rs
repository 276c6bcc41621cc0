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
