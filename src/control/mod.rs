//! The control process: forked beside the task processes, it owns
//! worker-level duties that need an async runtime — today the Prometheus
//! endpoint. It never runs tasks.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info};

use crate::config::WorkerConfig;
use crate::shm::{ChildState, SharedState};

/// The body of the forked control process; returns its exit code.
pub fn control_main(shm: SharedState, config: Arc<WorkerConfig>) -> i32 {
    let span = tracing::error_span!("control");
    let _entered = span.enter();
    shm.control_slot().set_state(ChildState::Booting);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(run(shm, config))
}

async fn run(shm: SharedState, config: Arc<WorkerConfig>) -> i32 {
    let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        error!("cannot install signal handlers");
        return 1;
    };
    let listener = match config.metrics_bind {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => {
                let local = l
                    .local_addr()
                    .map_or_else(|_| addr.to_string(), |a| a.to_string());
                info!("metrics on http://{local}/metrics");
                Some(l)
            }
            Err(e) => {
                error!("metrics endpoint disabled: cannot listen on {addr}: {e}");
                None
            }
        },
        None => None,
    };
    let slot = shm.control_slot();
    slot.set_state(ChildState::Consuming);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = quit.recv() => break,
            _ = heartbeat.tick() => {
                slot.beat();
                // A SIGTERM sent before our handlers existed was lost: the
                // shared flag still says the worker is draining.
                if shm.draining() {
                    break;
                }
            }
            accepted = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                match accepted {
                    Ok((stream, _)) => {
                        let config = Arc::clone(&config);
                        tokio::spawn(async move {
                            if let Err(e) = serve(stream, shm, &config).await {
                                debug!("metrics request failed: {e}");
                            }
                        });
                    }
                    Err(e) => debug!("accept failed: {e}"),
                }
            }
        }
    }
    0
}

/// Answers one HTTP/1.x request: `GET /metrics` gets the exposition.
async fn serve(
    mut stream: TcpStream,
    shm: SharedState,
    config: &WorkerConfig,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out")
        })??;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::render(&shm, config),
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "celeriac worker: see /metrics\n".to_owned(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
