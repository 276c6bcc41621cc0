//! Command-line and environment validation.

use std::time::Duration;

use super::*;
use crate::broker::QueueSpec;

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
    // The celery command reads -b from BROKER_URL and then overwrites
    // CELERY_BROKER_URL with it, so BROKER_URL wins.
    assert_eq!(worker(&[], &env).unwrap().broker_url, "amqp://a:b@h1//");
    let env = [("CELERY_BROKER_URL", "amqp://a:b@h2//")];
    assert_eq!(worker(&[], &env).unwrap().broker_url, "amqp://a:b@h2//");
    let env = [("BROKER_URL", "amqp://a:b@h1//")];
    assert_eq!(
        worker(&["-b", "amqp://a:b@h3//"], &env).unwrap().broker_url,
        "amqp://a:b@h3//"
    );
}

#[test]
fn result_backend_from_env_in_celery_order() {
    let env = [
        ("RESULT_BACKEND", "redis://h1:6379/0"),
        ("CELERY_RESULT_BACKEND", "rpc://"),
    ];
    assert_eq!(
        worker(&[], &env).unwrap().result_backend,
        Some(BackendUrl::Redis("redis://h1:6379/0".into()))
    );
    let env = [("CELERY_RESULT_BACKEND", "rpc://")];
    assert_eq!(
        worker(&[], &env).unwrap().result_backend,
        Some(BackendUrl::Rpc)
    );
}

#[test]
fn global_options_work_before_and_after_the_subcommand() {
    for argv in [
        vec![
            "celeriac",
            "-b",
            "amqp://u:p@b1//",
            "-q",
            "worker",
            "-c",
            "1",
        ],
        vec![
            "celeriac",
            "worker",
            "-b",
            "amqp://u:p@b1//",
            "-q",
            "-c",
            "1",
        ],
    ] {
        let Ok(Invocation::Worker(c)) = parse(argv.clone(), &[]) else {
            panic!("{argv:?} did not parse");
        };
        assert_eq!(c.broker_url, "amqp://u:p@b1//");
        assert!(c.quiet);
    }
}

#[test]
fn every_celery_worker_option_is_accepted_or_refused_with_one_line() {
    // Accepted: the worker runs with them.
    for args in [
        &["-O", "fair"][..],
        &["--optimization", "default"],
        &["--pool-start-method", "fork"],
        &["-P", "processes"],
        &["-l", "FATAL"],
        &["--umask", "0022"],
        &["--heartbeat-interval", "5"],
        &["--without-heartbeat"],
        &["--without-gossip", "--without-mingle"],
        &["-X", "other"],
        &["-C", "--skip-checks", "--workdir", "/tmp"],
    ] {
        worker(args, &[]).unwrap_or_else(|e| panic!("{args:?} refused: {e}"));
    }
    // Refused, each naming the option and what to do instead.
    for (args, name) in [
        (&["--loader", "x"][..], "--loader"),
        (&["--config", "celeryconfig"], "--config"),
        (&["-D"], "--detach"),
        (&["-S", "/tmp/state"], "--statedb"),
        (&["--disable-prefetch"], "--disable-prefetch"),
        (&["--purge"], "--purge"),
        (&["--discard"], "--purge"),
        (&["-I", "proj.tasks"], "--include"),
        (&["--autoscale", "10,3"], "--autoscale"),
        (&["-B"], "--beat"),
        (&["-s", "/tmp/beat"], "--schedule-filename"),
        (&["--schedule", "/tmp/beat"], "--schedule-filename"),
        (&["--scheduler", "x"], "--scheduler"),
        (&["-f", "/tmp/log"], "--logfile"),
        (&["--pidfile", "/tmp/pid"], "--pidfile"),
        (&["--uid", "1000"], "--uid"),
        (&["--gid", "1000"], "--gid"),
        (&["--executable", "/usr/bin/python"], "--executable"),
        (&["-P", "gevent"], "--pool"),
        (&["--pool-start-method", "spawn"], "--pool-start-method"),
        (&["-O", "fast"], "--optimization"),
        (&["--umask", "9x"], "--umask"),
        (&["--heartbeat-interval", "0"], "--heartbeat-interval"),
    ] {
        let e = worker(args, &[]).expect_err(&format!("{args:?} accepted"));
        assert_eq!(e.name, name, "{args:?}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
}

#[test]
fn an_app_takes_the_options_celery_hands_it() {
    let c = worker(
        &[
            "-A",
            "proj",
            "-I",
            "proj.a,proj.b",
            "--loader",
            "default",
            "-b",
            "amqp://h1//",
        ],
        &[("CELERY_BROKER_URL", "amqp://h2//")],
    )
    .unwrap();
    let app = c.app.expect("the app");
    assert_eq!(app.name, "proj");
    assert_eq!(app.include, ["proj.a", "proj.b"]);
    assert_eq!(app.loader.as_deref(), Some("default"));
    // -b is exported to the app; CELERY_BROKER_URL is already in its environment.
    assert_eq!(app.broker.as_deref(), Some("amqp://h1//"));
    assert!(!app.queues_given);
    let c = worker(
        &["-A", "proj", "-Q", "a"],
        &[("CELERY_BROKER_URL", "amqp://h2//")],
    )
    .unwrap();
    let app = c.app.unwrap();
    assert_eq!(app.broker, None);
    assert!(app.queues_given);
    assert!(worker(&[], &[]).unwrap().app.is_none());
}

#[test]
fn an_apps_settings_yield_to_the_command_line_and_environment() {
    let app = [
        "--concurrency=7".to_owned(),
        "--acks-late".to_owned(),
        "--queues=a,b".to_owned(),
        "--prefetch-multiplier=2".to_owned(),
    ];
    let parse = |args: &[&str], env: &[(&str, &str); 1]| {
        let mut argv = vec!["celeriac", "worker"];
        argv.extend_from_slice(args);
        match super::parse_with_app(argv, env, &app) {
            Ok(Invocation::Worker(c)) => *c,
            other => panic!("{other:?}"),
        }
    };
    let c = parse(&[], &[("UNRELATED", "x")]);
    assert_eq!(c.concurrency, 7);
    assert!(c.acks_late);
    assert_eq!(c.prefetch_multiplier, 2);
    let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let c = parse(
        &["-c", "3", "-Q", "z", "--prefetch-multiplier", "1"],
        &[("UNRELATED", "x")],
    );
    assert_eq!(c.concurrency, 3);
    assert_eq!(c.prefetch_multiplier, 1);
    assert_eq!(c.queues.len(), 1);
    // clap reads CELERIAC_CONCURRENCY itself; the app's value must stay out of its way.
    let c = parse(&[], &[("CELERIAC_CONCURRENCY", "5")]);
    assert_ne!(c.concurrency, 7);
    let c = parse(&[], &[("CELERY_WORKER_CONCURRENCY", "4")]);
    assert_eq!(c.concurrency, 4);
}

#[test]
fn exclude_queues_removes_from_the_consumed_ones() {
    let c = worker(&["-Q", "a,b,c", "-X", "b"], &[]).unwrap();
    let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    let e = worker(&["-Q", "a", "-X", "a"], &[]).unwrap_err();
    assert_eq!(e.name, "--queues");
}

#[test]
fn heartbeats_default_to_two_seconds_and_can_be_turned_off() {
    let c = worker(&[], &[]).unwrap();
    assert_eq!(c.heartbeat_interval, Some(Duration::from_secs(2)));
    let c = worker(&["--heartbeat-interval", "10"], &[]).unwrap();
    assert_eq!(c.heartbeat_interval, Some(Duration::from_secs(10)));
    let c = worker(&["--without-heartbeat"], &[]).unwrap();
    assert_eq!(c.heartbeat_interval, None);
    assert_eq!(worker(&["--umask", "027"], &[]).unwrap().umask, Some(0o027));
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
        (&["-c", "-2"], "--concurrency"),
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
    // 0 is not among them: as in Celery it means the default.
    for n in ["-1", "-99999999999"] {
        let err = worker(&["-c", n], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--concurrency: must be at least 1, not {n}")
        );
        let err = worker(&["--concurrency", n], &[]).unwrap_err();
        assert_eq!(err.name, "--concurrency", "{err}");
    }
    let err = worker(&["-c", "1025"], &[]).unwrap_err();
    assert_eq!(err.to_string(), "--concurrency: 1025 is more than 1024");
    let err = worker(&["-c", "many"], &[]).unwrap_err();
    assert!(err.to_string().starts_with("--concurrency:"), "{err}");
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

/// The CPUs the machine has online, as `/sys` lists them ("0-3,6").
fn online_cpus() -> usize {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[test]
fn default_concurrency_is_the_machines_cpu_count_as_celerys() {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    // Pin this test's thread to one CPU: the default must not follow the
    // affinity (nor a cgroup quota), since os.cpu_count() does not.
    let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let mut one = CpuSet::new();
    one.set(
        (0..CpuSet::count())
            .find(|&i| before.is_set(i).unwrap())
            .unwrap(),
    )
    .unwrap();
    sched_setaffinity(Pid::from_raw(0), &one).unwrap();
    let c = worker(&[], &[]);
    sched_setaffinity(Pid::from_raw(0), &before).unwrap();
    assert_eq!(c.unwrap().concurrency, online_cpus());
    assert_eq!(worker(&["-c", "3"], &[]).unwrap().concurrency, 3);
}

#[test]
fn celery_worker_variables_give_options_the_command_line_does_not() {
    let env = [
        ("CELERY_WORKER_CONCURRENCY", "3"),
        ("CELERY_WORKER_QUEUES", "a,b"),
        ("CELERY_WORKER_TASK_EVENTS", "true"),
        ("CELERY_WORKER_WITHOUT_MINGLE", "0"),
        ("CELERY_WORKER_HOSTNAME", "env@host"),
    ];
    let c = worker(&[], &env).unwrap();
    assert_eq!(c.concurrency, 3);
    let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(c.task_events);
    assert_eq!(c.hostname, "env@host");
    // The command line wins, in either spelling.
    let c = worker(&["-c", "5", "--queues=z", "-nflag@host"], &env).unwrap();
    assert_eq!(c.concurrency, 5);
    assert_eq!(c.queues.len(), 1);
    assert_eq!(c.hostname, "flag@host");
    // A refused option is refused from its variable too, naming the option.
    let e = worker(&[], &[("CELERY_WORKER_BEAT", "yes")]).unwrap_err();
    assert_eq!(e.name, "--beat");
    // Flags read as Click reads booleans.
    assert!(
        !worker(&[], &[("CELERY_WORKER_TASK_EVENTS", "off")])
            .unwrap()
            .task_events
    );
}

#[test]
fn concurrency_zero_is_the_default_and_auto_follows_the_cpu_quota() {
    assert_eq!(
        worker(&["-c", "0"], &[]).unwrap().concurrency,
        default_concurrency()
    );
    let auto = worker(&["-c", "auto"], &[]).unwrap().concurrency;
    assert!(auto >= 1 && auto <= default_concurrency(), "{auto}");
    assert_eq!(cpu_quota("150000 100000"), Some(2));
    assert_eq!(cpu_quota("20000 100000"), Some(1));
    assert_eq!(cpu_quota("max 100000"), None);
    let e = worker(&["-c", "lots"], &[]).unwrap_err();
    assert_eq!(e.name, "--concurrency");
}

#[test]
fn variables_go_in_after_the_subcommand_not_after_a_value_named_worker() {
    let argv = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
    let at = super::celery_cli::subcommand_position;
    assert_eq!(at(&argv(&["celeriac", "worker", "-c", "1"])), Some(1));
    assert_eq!(at(&argv(&["celeriac", "-b", "worker", "worker"])), Some(3));
    assert_eq!(
        at(&argv(&["celeriac", "--workdir", "/w", "-q", "worker"])),
        Some(4)
    );
    assert_eq!(at(&argv(&["celeriac", "--version"])), None);
    let Ok(Invocation::Worker(c)) = parse(
        ["celeriac", "-b", "amqp://u:p@worker//", "worker"],
        &[("CELERY_WORKER_CONCURRENCY", "3")],
    ) else {
        panic!("did not parse");
    };
    assert_eq!(c.concurrency, 3);
}

/// A readable token file for the broker-auth tests.
fn token_file(name: &str) -> String {
    let path = std::env::temp_dir().join(format!("celeriac-config-{}-{name}", std::process::id()));
    std::fs::write(&path, "x.y.z").unwrap();
    path.display().to_string()
}

#[test]
fn password_auth_is_the_default_and_takes_no_oauth_options() {
    assert_eq!(worker(&[], &[]).unwrap().broker_auth, BrokerAuth::Password);
    let err = worker(&["--broker-oauth-scope", "api://x/.default"], &[]).unwrap_err();
    assert_eq!(err.name, "--broker-oauth-scope");
}

#[test]
fn workload_identity_reads_the_webhook_variables() {
    let file = token_file("wi");
    let env = [
        ("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
        ("AZURE_TENANT_ID", "contoso.onmicrosoft.com"),
        ("AZURE_FEDERATED_TOKEN_FILE", file.as_str()),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
    ];
    let args = [
        "-b",
        "amqps://celeriac@rabbitmq.example:5671/prod",
        "--broker-auth",
        "azure-workload-identity",
        "--broker-oauth-scope",
        "api://rabbitmq/.default",
    ];
    let c = worker(&args, &env).unwrap();
    let BrokerAuth::AzureWorkloadIdentity(id) = &c.broker_auth else {
        panic!("{:?}", c.broker_auth)
    };
    assert_eq!(
        id.token_url(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(id.scope, "api://rabbitmq/.default");
    assert_eq!(id.token_file.display().to_string(), file);

    // Each missing variable is named.
    for missing in 0..env.len() {
        let partial: Vec<(&str, &str)> = env
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != missing)
            .map(|(_, kv)| *kv)
            .collect();
        let partial: [(&str, &str); 3] = partial.try_into().unwrap();
        let err = worker(&args, &partial).unwrap_err();
        assert_eq!(err.name, env[missing].0);
        assert!(err.reason.starts_with("not set"), "{err}");
    }
    // No scope; a password in the URL; plain http to a remote authority; an unreadable file.
    let err = worker(&args[..4], &env).unwrap_err();
    assert_eq!(err.name, "--broker-oauth-scope");
    let mut with_password = args;
    with_password[1] = "amqp://u:secret@h//";
    let err = worker(&with_password, &env).unwrap_err();
    assert_eq!(err.name, "--broker");
    assert!(!err.to_string().contains("secret@"), "{err}");
    let mut http = env;
    http[3].1 = "http://login.example.com/";
    assert_eq!(
        worker(&args, &http).unwrap_err().name,
        "AZURE_AUTHORITY_HOST"
    );
    http[3].1 = "http://127.0.0.1:8080";
    assert!(worker(&args, &http).is_ok());
    let mut gone = env;
    gone[2].1 = "/nonexistent/azure-identity-token";
    let err = worker(&args, &gone).unwrap_err();
    assert_eq!(err.name, "AZURE_FEDERATED_TOKEN_FILE");
    assert!(
        err.reason.contains("/nonexistent/azure-identity-token"),
        "{err}"
    );
    std::fs::remove_file(file).unwrap();
}

#[test]
fn a_token_file_needs_its_path() {
    let file = token_file("tf");
    let args = ["-b", "amqp://h//", "--broker-auth", "oauth2-token-file"];
    let err = worker(&args, &[]).unwrap_err();
    assert_eq!(err.name, "--broker-oauth-token-file");
    let mut with_file = args.to_vec();
    with_file.extend(["--broker-oauth-token-file", file.as_str()]);
    assert_eq!(
        worker(&with_file, &[]).unwrap().broker_auth,
        BrokerAuth::TokenFile(file.clone().into())
    );
    // The default URL carries guest's password.
    let err = worker(&with_file[2..], &[]).unwrap_err();
    assert_eq!(err.name, "--broker");
    std::fs::remove_file(file).unwrap();
}
