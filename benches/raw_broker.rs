//! The floor under any AMQP worker on this machine: a bare lapin consumer
//! (same library, same runtime shape as a celeriac task process) that acks
//! each pre-filled message on arrival without decoding it.
//!
//! `cargo bench --bench raw_broker -- <queue> <messages> <prefetch>` (the
//! queue must hold the messages already; benches/throughput.py fills it).
//!
//! With `--echo-events` it also publishes, for each message, a one-event
//! `task.multi` batch (`task-succeeded` with the message's correlation id)
//! to `celeryev` as soon as it arrives: the least any worker must do to
//! report a task, so benches/events.py can measure the latency floor of
//! publish -> broker -> worker -> broker -> monitor on this machine.

use std::time::Instant;

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

fn cpu_seconds() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(usage.user_time()) + t(usage.system_time())
}

fn main() {
    let echo_events = std::env::args().any(|a| a == "--echo-events");
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.len() < 3 {
        eprintln!("usage: raw_broker <queue> <messages> <prefetch>");
        return;
    }
    let queue = args[0].clone();
    let total: usize = args[1].parse().expect("messages");
    let prefetch: u16 = args[2].parse().expect("prefetch");
    let url = std::env::var("BENCH_BROKER")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let conn = celeriac::broker::connect(&url, "raw-broker-bench")
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        let events = conn.create_channel().await.expect("channel");
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        println!("consuming");
        let mut seen = 0usize;
        let (mut start, mut cpu0) = (Instant::now(), 0.0);
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.expect("delivery");
            if seen == 0 {
                start = Instant::now();
                cpu0 = cpu_seconds();
            }
            // Hand the ack to the connection without waiting for the write, as celeriac does.
            let _ = futures_lite::future::poll_once(delivery.acker.ack(BasicAckOptions::default()))
                .await;
            if echo_events {
                let id = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map_or_else(String::new, |c| c.to_string());
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let body = format!(
                    "[{{\"hostname\":\"floor@bench\",\"uuid\":\"{id}\",\"timestamp\":{now},\"type\":\"task-succeeded\"}}]"
                );
                let _ = events
                    .basic_publish(
                        "celeryev".into(),
                        "task.multi".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_content_type("application/json".into()),
                    )
                    .await;
            }
            seen += 1;
            if seen == total {
                break;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        println!(
            "{{\"tasks_s\": {:.1}, \"cpu_us\": {:.2}}}",
            total as f64 / elapsed,
            cpu / total as f64 * 1e6
        );
    });
}
