//! The Prometheus exposition of a worker, built at scrape time from the
//! memory every process shares (so counters from all task processes, past
//! and present, add up in one place).

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

use crate::config::WorkerConfig;
use crate::shm::{
    ChildState, DeathCause, Outcome, SharedState, TaskStatSnapshot, Unpublished, RUNTIME_BUCKETS,
};

mod celery_exporter;

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

pub(crate) fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<Metric>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

pub(crate) fn counter(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

pub(crate) fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels(pairs));
    m
}

/// A runtime histogram sample from stats entries added together.
pub(crate) fn histogram(pairs: &[(&str, &str)], entries: &[&TaskStatSnapshot]) -> Metric {
    let mut cumulative = 0;
    let buckets = RUNTIME_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, ub)| {
            cumulative += entries.iter().map(|s| s.buckets[i]).sum::<u64>();
            let mut b = Bucket::default();
            b.set_upper_bound(*ub);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_sample_count(entries.iter().map(|s| s.runtime_count).sum());
    h.set_sample_sum(entries.iter().map(|s| s.runtime_sum).sum());
    h.set_bucket(buckets);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

/// Stats entries grouped by `key`, in first-seen order.
pub(crate) fn grouped<K: PartialEq>(
    stats: &[TaskStatSnapshot],
    key: impl Fn(&TaskStatSnapshot) -> K,
) -> Vec<(K, Vec<&TaskStatSnapshot>)> {
    let mut groups: Vec<(K, Vec<&TaskStatSnapshot>)> = Vec::new();
    for s in stats {
        let k = key(s);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(s),
            None => groups.push((k, vec![s])),
        }
    }
    groups
}

/// Renders every metric in Prometheus text format (version 0.0.4).
pub fn render(shm: &SharedState, config: &WorkerConfig) -> String {
    let stats = shm.task_stats();
    let mut tasks = Vec::new();
    let mut runtimes = Vec::new();
    // A task's counts are kept per queue and exception: add them up by name.
    for (name, entries) in grouped(&stats, |s| s.name.clone()) {
        if entries.iter().all(|s| s.queue.is_none()) {
            continue; // only the limits entry of a task that has not run here
        }
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            let count: u64 = entries.iter().map(|s| s.outcomes[i]).sum();
            tasks.push(counter(
                &[("task", &name), ("outcome", outcome.label())],
                count as f64,
            ));
        }
        runtimes.push(histogram(&[("task", &name)], &entries));
    }
    let slots = shm.task_slots();
    let active = slots.iter().filter(|s| s.running_task().is_some()).count();
    let reserved: u64 = slots.iter().map(|s| s.reserved()).sum();
    let reconnects: u64 = shm.slots().iter().map(|s| s.reconnects()).sum();
    let states = [
        ChildState::Booting,
        ChildState::Consuming,
        ChildState::Reconnecting,
        ChildState::Draining,
    ];
    let processes = states
        .iter()
        .map(|st| {
            gauge(
                &[("state", st.name())],
                slots
                    .iter()
                    .filter(|s| s.pid() != 0 && s.state() == *st)
                    .count() as f64,
            )
        })
        .collect();
    let deaths = DeathCause::ALL
        .iter()
        .zip(shm.deaths())
        .map(|(cause, n)| counter(&[("cause", cause.label())], n as f64))
        .collect();
    let families = vec![
        family(
            "celeriac_build_info",
            "Build and identity of this worker (always 1).",
            MetricType::GAUGE,
            vec![gauge(
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("hostname", &config.hostname),
                ],
                1.0,
            )],
        ),
        family(
            "celeriac_tasks_total",
            "Tasks handled, by task name and outcome.",
            MetricType::COUNTER,
            tasks,
        ),
        family(
            "celeriac_task_runtime_seconds",
            "Time tasks spent running, by task name.",
            MetricType::HISTOGRAM,
            runtimes,
        ),
        family(
            "celeriac_tasks_active",
            "Tasks running now.",
            MetricType::GAUGE,
            vec![gauge(&[], active as f64)],
        ),
        family(
            "celeriac_tasks_prefetched",
            "Messages received but not started (prefetched or waiting for their ETA).",
            MetricType::GAUGE,
            vec![gauge(&[], reserved as f64)],
        ),
        family(
            "celeriac_task_processes",
            "Task processes, by state.",
            MetricType::GAUGE,
            processes,
        ),
        family(
            "celeriac_task_processes_configured",
            "Task processes the worker runs (--concurrency, pool_grow, pool_shrink).",
            MetricType::GAUGE,
            vec![gauge(&[], shm.target() as f64)],
        ),
        family(
            "celeriac_child_spawns_total",
            "Processes forked by the supervisor.",
            MetricType::COUNTER,
            vec![counter(&[], shm.spawns() as f64)],
        ),
        family(
            "celeriac_child_deaths_total",
            "Processes that ended, by cause.",
            MetricType::COUNTER,
            deaths,
        ),
        family(
            "celeriac_broker_reconnects_total",
            "Broker connections re-established after a loss.",
            MetricType::COUNTER,
            vec![counter(&[], reconnects as f64)],
        ),
        family(
            "celeriac_task_messages_unpublished_total",
            "Task messages a task process had to send and could not (the broker refused, returned as unroutable or did not confirm them), by kind: a retry, a follow-up (callback, errback, chain step), a task handed back at the drain deadline. Each is logged with its task id.",
            MetricType::COUNTER,
            Unpublished::ALL
                .iter()
                .map(|kind| {
                    let n: u64 = shm.slots().iter().map(|s| s.unpublished(*kind)).sum();
                    counter(&[("kind", kind.label())], n as f64)
                })
                .collect(),
        ),
        family(
            "celeriac_redelivered_copies_total",
            "Redelivered copies of tasks already handled, acknowledged without running: an early-acknowledged task whose process died before its acknowledgement reached the broker (its loss is reported once), or an acks-late task whose delivery timed out while it ran. Each is logged with its task id.",
            MetricType::COUNTER,
            vec![counter(
                &[],
                shm.slots().iter().map(|s| s.copies_settled()).sum::<u64>() as f64,
            )],
        ),
        family(
            "celeriac_hand_backs_republished_total",
            "Messages handed back to their queue as a re-published copy (confirmed) and an acknowledgement instead of a requeue, because the requeue would have taken them past their quorum queue's delivery limit (RabbitMQ before 4.3 counts requeues, and drops or dead-letters a message past the limit). Each is logged with its task id.",
            MetricType::COUNTER,
            vec![counter(
                &[],
                shm.slots()
                    .iter()
                    .map(|s| s.republished_at_limit())
                    .sum::<u64>() as f64,
            )],
        ),
        family(
            "celeriac_consumer_timeouts_total",
            "Consumer channels the broker closed because a delivery was not acknowledged within its consumer_timeout.",
            MetricType::COUNTER,
            vec![counter(&[], shm.consumer_timeouts() as f64)],
        ),
        family(
            "celeriac_events_published_total",
            "Event messages published (task events are batched, several per message).",
            MetricType::COUNTER,
            vec![counter(&[], shm.events_published() as f64)],
        ),
        family(
            "celeriac_draining",
            "1 while the worker shuts down.",
            MetricType::GAUGE,
            vec![gauge(&[], if shm.draining() { 1.0 } else { 0.0 })],
        ),
    ];
    let mut families = families;
    if config.broker_auth != crate::token::BrokerAuth::Password {
        families.extend(token_families(shm));
    }
    families.extend(celery_exporter::families(&stats, active, &config.hostname));
    encode(families)
}

/// The broker-token series (with `--broker-auth` other than `password`):
/// each process holds its own token, so the expiry shown is the soonest
/// among the live processes (negative once expired); the counters add up
/// every process, past and present.
fn token_families(shm: &SharedState) -> Vec<MetricFamily> {
    let now = crate::shm::now_ms() as i64;
    let soonest = shm
        .slots()
        .iter()
        .filter(|s| s.pid() != 0 && s.token_expiry_ms() != 0)
        .map(|s| s.token_expiry_ms() as i64 - now)
        .min();
    let failures: u64 = shm.slots().iter().map(|s| s.token_failures()).sum();
    let updates: u64 = shm.slots().iter().map(|s| s.secret_updates()).sum();
    vec![
        family(
            "celeriac_broker_token_expiry_seconds",
            "Seconds until the soonest-expiring broker token of the worker's processes expires (negative once expired).",
            MetricType::GAUGE,
            soonest
                .map(|ms| vec![gauge(&[], ms as f64 / 1000.0)])
                .unwrap_or_default(),
        ),
        family(
            "celeriac_broker_token_refresh_failures_total",
            "Broker token refreshes that failed (each is retried with backoff).",
            MetricType::COUNTER,
            vec![counter(&[], failures as f64)],
        ),
        family(
            "celeriac_broker_token_updates_total",
            "Fresh broker tokens pushed to open connections with AMQP update-secret.",
            MetricType::COUNTER,
            vec![counter(&[], updates as f64)],
        ),
    ]
}

/// Writes `families` in the text format, leaving out those without a sample
/// yet (the encoder refuses them): a worker that has run no task has no
/// `celeriac_tasks_total` or `celeriac_task_runtime_seconds` series.
fn encode(mut families: Vec<MetricFamily>) -> String {
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("every family left has a sample, and it is written into memory");
    String::from_utf8(out).expect("the text encoder writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Invocation};

    fn config() -> WorkerConfig {
        let env: [(&str, &str); 0] = [];
        match parse(["celeriac", "worker", "-c", "2"], &env) {
            Ok(Invocation::Worker(c)) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_worker_that_ran_no_task_renders() {
        let shm = SharedState::map(2).unwrap();
        let text = render(&shm, &config());
        assert!(text.contains("celeriac_child_spawns_total 0\n"), "{text}");
        assert!(
            text.contains("celeriac_broker_reconnects_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("celeriac_consumer_timeouts_total 0\n"),
            "{text}"
        );
        assert!(!text.contains("celeriac_tasks_total"), "{text}");
        let index = shm.task_counter_index("proj.add", "celery", "");
        shm.record_task(index, Outcome::Succeeded, Some(0.01));
        let text = render(&shm, &config());
        let line = r#"celeriac_tasks_total{task="proj.add",outcome="succeeded"} 1"#;
        assert!(text.contains(line), "{text}");
        assert!(!text.contains("celeriac_broker_token"), "{text}");
    }

    #[test]
    fn redelivered_copies_are_counted_across_processes() {
        let shm = SharedState::map(2).unwrap();
        let text = render(&shm, &config());
        assert!(
            text.contains("celeriac_redelivered_copies_total 0\n"),
            "{text}"
        );
        shm.task_slots()[0].count_copy_settled();
        shm.task_slots()[1].count_copy_settled();
        let text = render(&shm, &config());
        assert!(
            text.contains("celeriac_redelivered_copies_total 2\n"),
            "{text}"
        );
    }

    #[test]
    fn hand_backs_republished_at_the_delivery_limit_are_counted_across_processes() {
        let shm = SharedState::map(2).unwrap();
        let text = render(&shm, &config());
        assert!(
            text.contains("celeriac_hand_backs_republished_total 0\n"),
            "{text}"
        );
        shm.task_slots()[0].count_republished_at_limit();
        shm.task_slots()[1].count_republished_at_limit();
        let text = render(&shm, &config());
        assert!(
            text.contains("celeriac_hand_backs_republished_total 2\n"),
            "{text}"
        );
    }

    #[test]
    fn unpublished_task_messages_are_counted_by_kind_across_processes() {
        let shm = SharedState::map(2).unwrap();
        let text = render(&shm, &config());
        for kind in ["retry", "follow_up", "hand_back"] {
            let line = format!("celeriac_task_messages_unpublished_total{{kind=\"{kind}\"}} 0\n");
            assert!(text.contains(&line), "{text}");
        }
        shm.task_slots()[0].count_unpublished(Unpublished::Retry);
        shm.task_slots()[1].count_unpublished(Unpublished::Retry);
        shm.task_slots()[1].count_unpublished(Unpublished::HandBack);
        let text = render(&shm, &config());
        assert!(
            text.contains("celeriac_task_messages_unpublished_total{kind=\"retry\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("celeriac_task_messages_unpublished_total{kind=\"hand_back\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("celeriac_task_messages_unpublished_total{kind=\"follow_up\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn token_series_show_the_soonest_expiry_and_add_up_counts() {
        let shm = SharedState::map(2).unwrap();
        let mut config = config();
        config.broker_auth = crate::token::BrokerAuth::TokenFile("/t".into());
        let text = render(&shm, &config);
        assert!(
            !text.contains("celeriac_broker_token_expiry_seconds"),
            "{text}"
        );
        assert!(
            text.contains("celeriac_broker_token_refresh_failures_total 0\n"),
            "{text}"
        );
        let now = crate::shm::now_ms();
        for (slot, (pid, expiry)) in shm.slots().iter().zip([(10, 50_000), (11, 20_000), (0, 1)]) {
            slot.set_pid(pid);
            slot.set_token_expiry_ms(now + expiry);
            slot.count_secret_update();
        }
        shm.control_slot().count_token_failure();
        let text = render(&shm, &config);
        let expiry: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("celeriac_broker_token_expiry_seconds "))
            .expect("an expiry sample")
            .parse()
            .unwrap();
        assert!((19.0..=20.0).contains(&expiry), "{text}");
        assert!(
            text.contains("celeriac_broker_token_refresh_failures_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("celeriac_broker_token_updates_total 3\n"),
            "{text}"
        );
    }
}
