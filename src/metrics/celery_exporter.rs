//! The metric names and labels of the most used Celery Prometheus exporter
//! (danihodovic's celery-exporter, which turns Celery events into
//! metrics), served by the worker itself, so that dashboards and alerts
//! built on it (its published Grafana dashboards among them) read a
//! celeriac worker unchanged, with no exporter or task events needed.
//!
//! | metric | labels | celeriac counts |
//! |---|---|---|
//! | `celery_task_received_total` | `name`, `hostname`, `queue_name` | messages accepted for running |
//! | `celery_task_started_total` | same | runs started |
//! | `celery_task_succeeded_total`, `_retried_total`, `_rejected_total`, `_revoked_total` | same | outcomes |
//! | `celery_task_failed_total` | same + `exception` (the class name) | failures, lost processes included |
//! | `celery_task_runtime` (histogram) | `name`, `hostname`, `queue_name` | runtime of every run that ended |
//! | `celery_worker_up` | `hostname` | 1 while the worker answers |
//! | `celery_worker_tasks_active` | `hostname` | tasks running now |
//!
//! `hostname` is the part of the node name after `@`, as the exporter
//! labels it. Broker-side metrics of the exporter (`celery_queue_length`
//! and the consumer counts) come from the broker, not a worker: they are
//! not served here.

use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge, grouped, histogram};
use crate::shm::{Outcome, TaskStatSnapshot};

/// The exporter's `hostname` label: the node name after `@`.
pub(crate) fn exporter_hostname(node: &str) -> &str {
    node.split_once('@').map_or(node, |(_, host)| host)
}

/// One counter sample per (task, queue): `count` of its entries added up.
/// A task's limits-only entry (no queue) has no sample.
fn per_queue(
    stats: &[TaskStatSnapshot],
    host: &str,
    count: impl Fn(&TaskStatSnapshot) -> u64,
) -> Vec<prometheus::proto::Metric> {
    grouped(stats, |s| (s.name.clone(), s.queue.clone()))
        .into_iter()
        .filter_map(|((name, queue), entries)| {
            let queue = queue?;
            let n: u64 = entries.iter().map(|s| count(s)).sum();
            Some(counter(
                &[("name", &name), ("hostname", host), ("queue_name", &queue)],
                n as f64,
            ))
        })
        .collect()
}

/// The exporter-compatible families for these stats.
pub(crate) fn families(stats: &[TaskStatSnapshot], active: usize, node: &str) -> Vec<MetricFamily> {
    let host = exporter_hostname(node);
    let failed_at = Outcome::Failed.index();
    let failed = stats
        .iter()
        .filter_map(|s| {
            let (queue, exception) = (s.queue.as_ref()?, s.exception.as_ref()?);
            (!exception.is_empty()).then(|| {
                counter(
                    &[
                        ("name", &s.name),
                        ("hostname", host),
                        ("exception", exception),
                        ("queue_name", queue),
                    ],
                    s.outcomes[failed_at] as f64,
                )
            })
        })
        .collect();
    let runtimes = grouped(stats, |s| (s.name.clone(), s.queue.clone()))
        .iter()
        .filter_map(|((name, queue), entries)| {
            let queue = queue.as_ref()?;
            Some(histogram(
                &[("name", name), ("hostname", host), ("queue_name", queue)],
                entries,
            ))
        })
        .collect();
    let outcome_family = |name: &str, help: &str, outcome: Outcome| {
        let at = outcome.index();
        let samples = per_queue(stats, host, |s| s.outcomes[at]);
        family(name, help, MetricType::COUNTER, samples)
    };
    vec![
        family(
            "celery_task_received_total",
            "Tasks received by the worker.",
            MetricType::COUNTER,
            per_queue(stats, host, |s| s.received),
        ),
        family(
            "celery_task_started_total",
            "Tasks started by the worker.",
            MetricType::COUNTER,
            per_queue(stats, host, |s| s.started),
        ),
        outcome_family(
            "celery_task_succeeded_total",
            "Tasks that returned a value.",
            Outcome::Succeeded,
        ),
        family(
            "celery_task_failed_total",
            "Tasks that failed, by exception class.",
            MetricType::COUNTER,
            failed,
        ),
        outcome_family(
            "celery_task_retried_total",
            "Tasks that asked to be retried.",
            Outcome::Retried,
        ),
        outcome_family(
            "celery_task_rejected_total",
            "Tasks rejected by the worker (requeued or dead-lettered).",
            Outcome::Rejected,
        ),
        outcome_family(
            "celery_task_revoked_total",
            "Tasks revoked or expired before they ran.",
            Outcome::Revoked,
        ),
        family(
            "celery_task_runtime",
            "Task runtime in seconds.",
            MetricType::HISTOGRAM,
            runtimes,
        ),
        family(
            "celery_worker_up",
            "1 while the worker answers.",
            MetricType::GAUGE,
            vec![gauge(&[("hostname", host)], 1.0)],
        ),
        family(
            "celery_worker_tasks_active",
            "Tasks the worker is running now.",
            MetricType::GAUGE,
            vec![gauge(&[("hostname", host)], active as f64)],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::SharedState;

    #[test]
    fn the_hostname_label_is_the_host_part_of_the_node_name() {
        assert_eq!(exporter_hostname("celery@worker-7f9c"), "worker-7f9c");
        assert_eq!(exporter_hostname("plain"), "plain");
    }

    #[test]
    fn counts_are_labelled_by_task_queue_and_exception() {
        let shm = SharedState::map(1).unwrap();
        let ok = shm.task_counter_index("proj.add", "requests", "");
        let bad = shm.task_counter_index("proj.add", "requests", "ValueError");
        let _limits_only = shm.task_stat_index("proj.idle");
        shm.count_received(ok);
        shm.count_received(ok);
        shm.count_started(ok);
        shm.record_task(ok, Outcome::Succeeded, Some(0.003));
        shm.record_task(bad, Outcome::Failed, Some(0.2));
        let text = super::super::encode(families(&shm.task_stats(), 1, "celery@node-a"));
        for line in [
            r#"celery_task_received_total{name="proj.add",hostname="node-a",queue_name="requests"} 2"#,
            r#"celery_task_started_total{name="proj.add",hostname="node-a",queue_name="requests"} 1"#,
            r#"celery_task_succeeded_total{name="proj.add",hostname="node-a",queue_name="requests"} 1"#,
            r#"celery_task_failed_total{name="proj.add",hostname="node-a",exception="ValueError",queue_name="requests"} 1"#,
            r#"celery_task_runtime_count{name="proj.add",hostname="node-a",queue_name="requests"} 2"#,
            r#"celery_worker_up{hostname="node-a"} 1"#,
            r#"celery_worker_tasks_active{hostname="node-a"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("proj.idle"),
            "a task that never ran has no series"
        );
    }
}
