//! A team's own worker: define tasks on the celeriac library and get the
//! same `worker` command line as the `celeriac` binary.
//!
//! ```text
//! cargo run -p custom-tasks -- worker -Q celery --result-backend rpc://
//! ```
//!
//! Python then calls them by name:
//!
//! ```python
//! app.send_task("shop.tasks.invoice_total", ([{"price": 9.5, "qty": 2}],), {"vat": 0.2}).get()
//! ```

#![forbid(unsafe_code)]

use celeriac::task::TaskError;
use celeriac::App;
use serde::Deserialize;

#[derive(Deserialize)]
struct Line {
    price: f64,
    qty: u32,
}

/// Arguments of `invoice_total(lines, vat=0.0)`.
#[derive(Deserialize)]
struct InvoiceTotal {
    lines: Vec<Line>,
    vat: Option<f64>,
}

/// Arguments of `slugify(text)`.
#[derive(Deserialize)]
struct Slugify {
    text: String,
}

fn main() {
    let mut app = App::new();
    let tasks = app.registry_mut();

    // A blocking function: runs on its own thread, never stalls the worker.
    tasks
        .register(
            "shop.tasks.invoice_total",
            &["lines", "vat"],
            |_ctx, a: InvoiceTotal| {
                if a.lines.is_empty() {
                    return Err(TaskError::value_error("an invoice needs at least one line"));
                }
                let net: f64 = a.lines.iter().map(|l| l.price * f64::from(l.qty)).sum();
                Ok((net * (1.0 + a.vat.unwrap_or(0.0)) * 100.0).round() / 100.0)
            },
        )
        .acks_late(true);

    // An async function, retried on a transient condition.
    tasks.register_async(
        "shop.tasks.slugify",
        &["text"],
        |ctx, a: Slugify| async move {
            if a.text.trim().is_empty() && ctx.retries() < 1 {
                return Err(TaskError::retry().countdown(0.1).into());
            }
            let slug: String = a
                .text
                .to_lowercase()
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join("-");
            Ok::<_, TaskError>(slug)
        },
    );

    app.run()
}
