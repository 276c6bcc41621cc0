//! Command-line and environment validation.

use super::*;

fn worker(args: &[&str], env: &dyn Env) -> Result<WorkerConfig, ConfigError> {
    let mut argv = vec!["celeriac", "worker"];
    argv.extend_from_slice(args);
    match parse(argv, env)? {
        Invocation::Worker(c) => Ok(*c),
        Invocation::Print(p) => panic!("unexpected print: {p}"),
    }
}

#[test]
fn defaults_just_work() {
    let c = worker(&[], &[]).unwrap();
    assert_eq!(c.broker_url, DEFAULT_BROKER);
    assert_eq!(c.queues, vec![QueueSpec::celery_default("celery")]);
    assert_eq!(c.prefetch_multiplier, 4);
    assert!(c.result_backend.is_none());
    assert!(c.hostname.starts_with("celery@"));
    assert!(c.concurrency >= 1);
}

#[test]
fn the_brief_command_line_parses() {
    let c = worker(&["--pool", "prefork", "-Q", "requests", "--events"], &[]).unwrap();
    assert!(c.task_events);
    assert_eq!(c.queues[0].name, "requests");
}

#[test]
fn broker_from_env_in_celery_order() {
    let env = [
        ("BROKER_URL", "amqp://a:b@h1//"),
        ("CELERY_BROKER_URL", "amqp://a:b@h2//"),
    ];
    assert_eq!(worker(&[], &env).unwrap().broker_url, "amqp://a:b@h2//");
    let env = [("BROKER_URL", "amqp://a:b@h1//")];
    assert_eq!(worker(&[], &env).unwrap().broker_url, "amqp://a:b@h1//");
}

#[test]
fn queues_split_and_dedupe() {
    let c = worker(&["-Q", "a,b", "-Q", "a,c"], &[]).unwrap();
    let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[test]
fn bad_values_name_themselves_in_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["-P", "threads"], "--pool"),
        (&["-c", "0"], "--concurrency"),
        (&["--loglevel", "LOUD"], "--loglevel"),
        (&["--result-backend", "mongodb://x"], "--result-backend"),
        (&["-n", "w%q"], "--hostname"),
        (&["--time-limit", "-1"], "--time-limit"),
        (&["--broker", "http://u:hunter2@h/"], "--broker"),
        (&["-Q", ","], "--queues"),
    ];
    for (args, name) in cases {
        let err = worker(args, &[]).unwrap_err();
        assert_eq!(&err.name, name, "{args:?}");
        assert!(!err.to_string().contains('\n'));
        assert!(!err.to_string().contains("hunter2"));
    }
    let err = worker(&["-c", "many"], &[]).unwrap_err();
    assert!(err.reason.contains("--concurrency"), "{err}");
    assert!(!err.to_string().contains('\n'));
}

#[test]
fn bad_env_names_the_variable() {
    let err = worker(&[], &[("CELERY_BROKER_URL", "redis://h/0")]).unwrap_err();
    assert_eq!(err.name, "CELERY_BROKER_URL");
    let err = worker(&[], &[("CELERY_RESULT_BACKEND", "cache+memcached://x")]).unwrap_err();
    assert_eq!(err.name, "CELERY_RESULT_BACKEND");
}

#[test]
fn hostname_templates() {
    assert_eq!(
        expand_hostname("celery@%h", "pod-1.ns.svc").unwrap(),
        "celery@pod-1.ns.svc"
    );
    assert_eq!(expand_hostname("w@%n", "pod-1.ns.svc").unwrap(), "w@pod-1");
    assert_eq!(
        expand_hostname("%n@%d", "pod-1.ns.svc").unwrap(),
        "pod-1@ns.svc"
    );
    assert_eq!(expand_hostname("worker1", "h").unwrap(), "celery@worker1");
}

#[test]
fn cgroup_cpu_limits_round_up() {
    assert_eq!(cpu_max_limit("200000 100000\n"), Some(2));
    assert_eq!(cpu_max_limit("20000 100000"), Some(1));
    assert_eq!(cpu_max_limit("150000 100000"), Some(2));
    assert_eq!(cpu_max_limit("max 100000"), None);
}
