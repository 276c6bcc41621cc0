//! The control process's broker connection: opening it (events, pidbox,
//! replies), native delayed delivery, and reopening channels the broker closed.

use super::*;

pub(super) struct Session {
    /// Shared with the token keeper (weakly), which pushes fresh tokens to it.
    pub(super) conn: Arc<Connection>,
    pub(super) events: Channel,
    pub(super) replies: Channel,
    pub(super) requests: Consumer,
    /// The connection's events: a channel the broker closes is an error
    /// there, which starts [`repair_channels`] at once.
    pub(super) happenings: std::pin::Pin<Box<dyn futures_lite::Stream<Item = lapin::Event> + Send>>,
    /// The token generation awaited before reopening closed channels.
    pub(super) renewal: Option<u64>,
}

impl Session {
    /// Whether a publishing channel of the live connection is closed: the
    /// loop then looks every second until it is open again.
    pub(super) fn channels_closed(&self) -> bool {
        self.conn.status().connected()
            && !(self.events.status().connected() && self.replies.status().connected())
    }
}

/// What woke the loop on the broker's side.
pub(super) enum FromBroker {
    Request(Option<lapin::Result<Box<lapin::message::Delivery>>>),
    Happening(lapin::Event),
}

/// How often the loop looks while a channel is closed.
pub(super) const REPAIR_EVERY: Duration = Duration::from_secs(1);

/// When the broker closed the events or replies channel on a live
/// connection (with OAuth 2 tokens: 403 once the token expired), gets a
/// fresh token pushed, then reopens them; the pidbox consumer is untouched.
pub(super) async fn repair_channels(
    s: &mut Session,
    tokens: Option<&TokenKeeper>,
    events: &Events,
) {
    if !s.conn.status().connected()
        || (s.events.status().connected() && s.replies.status().connected())
    {
        s.renewal = None;
        return;
    }
    if let Some(tokens) = tokens {
        match s.renewal {
            None => {
                warn!("the broker closed a publishing channel (with OAuth 2 tokens: the token may have expired); getting a fresh token before reopening it");
                s.renewal = Some(tokens.generation());
                tokens.request_renewal();
                return;
            }
            Some(asked) if tokens.generation() == asked => return,
            Some(_) => {}
        }
    }
    let reopened = async {
        if !s.events.status().connected() {
            let channel = s
                .conn
                .create_channel()
                .await
                .map_err(BrokerError::amqp("open channel"))?;
            crate::events::declare_exchange(&channel).await?;
            events.use_channel(channel.clone());
            s.events = channel;
        }
        if !s.replies.status().connected() {
            s.replies = s
                .conn
                .create_channel()
                .await
                .map_err(BrokerError::amqp("open channel"))?;
        }
        Ok::<_, BrokerError>(())
    };
    match reopened.await {
        Ok(()) => {
            s.renewal = None;
            warn!("reopened the control channels the broker had closed");
        }
        Err(e) => debug!("cannot reopen the closed control channels yet: {e}"),
    }
}

/// With quorum queues, native delayed delivery as Celery's worker declares
/// it (see [`crate::broker::delayed`]), on channels of its own: the delay
/// levels, and every consumed queue whose exchange is not direct *on the
/// broker* (an existing exchange of another type than configured is
/// adopted) bound to the delivery exchange, so a countdown/ETA task a
/// producer routes through the levels reaches it. A
/// broker that refuses it (permissions) is reported once: ETA tasks are
/// then held in memory, as on classic queues.
pub(super) async fn delayed_delivery(
    conn: &Connection,
    config: &WorkerConfig,
    shm: SharedState,
    reported: &mut bool,
) {
    let Some(queue_type) = config.queues.iter().find_map(|q| q.queue_type.clone()) else {
        return;
    };
    // Which exchanges are not direct on the broker: the queues are declared
    // here too (as the task processes do; so the binding cannot come first).
    let mut routed = Vec::new();
    let mut direct = Vec::new();
    for spec in &config.queues {
        let kind = if spec.declared.exclusive {
            crate::broker::exchange_type_in_force(conn, spec).await
        } else {
            crate::broker::declare_queue(conn, spec).await
        };
        match kind {
            Ok(ExchangeType::Direct) => direct.push(spec.name.clone()),
            Ok(_) => routed.push(spec),
            Err(e) => {
                debug!(queue = %spec.name, "cannot declare the queue for delayed delivery yet: {e}")
            }
        }
    }
    let declared = async {
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("open channel"))?;
        let result = async {
            crate::broker::delayed::declare_levels(&channel, &queue_type).await?;
            for spec in &routed {
                crate::broker::delayed::bind(&channel, spec).await?;
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        let _ = channel.close(200, ShortString::from("done")).await;
        result
    }
    .await;
    shm.set_delayed_delivery(declared.is_ok());
    match declared {
        Ok(()) => {
            info!("native delayed delivery declared for {queue_type} queues");
            if !direct.is_empty() && !*reported {
                warn!(
                    "queues {direct:?} use a direct exchange: Python producers send their countdown/ETA tasks straight to them (held in memory here); use --exchange-type topic for native delayed delivery"
                );
            }
        }
        Err(e) if !*reported => warn!(
            "native delayed delivery is not available ({e}); countdown/ETA tasks are held in memory by the task processes"
        ),
        Err(e) => debug!("native delayed delivery still not available: {e}"),
    }
    *reported = true;
}

/// Connects and declares the event exchange, the pidbox exchanges and this
/// node's pidbox queue (non-durable, exclusive, auto-delete, with kombu's
/// TTL and expiry), then consumes it without acknowledgements.
pub(super) async fn open_session(
    config: &WorkerConfig,
    tokens: Option<&TokenKeeper>,
) -> Result<Session, ConnectError> {
    let name = format!(
        "celeriac {} control pid {}",
        config.hostname,
        std::process::id()
    );
    let conn = crate::token::connect(&config.broker_url, &name, tokens).await?;
    let happenings = Box::pin(conn.events_listener());
    let events = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    crate::events::declare_exchange(&events).await?;
    let replies = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    declare_exchange(&replies, REPLY_EXCHANGE, ExchangeKind::Direct, false).await?;
    let requests = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    declare_exchange(&requests, PIDBOX_EXCHANGE, ExchangeKind::Fanout, false).await?;
    let queue = format!("{}.celery.pidbox", config.hostname);
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongInt(300_000),
    );
    args.insert(ShortString::from("x-expires"), AMQPValue::LongInt(10_000));
    requests
        .queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(BrokerError::amqp("declare the pidbox queue"))?;
    requests
        .queue_bind(
            ShortString::from(queue.as_str()),
            ShortString::from(PIDBOX_EXCHANGE),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp("bind the pidbox queue"))?;
    let requests = requests
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from("celeriac-pidbox"),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp("consume the pidbox queue"))?;
    Ok(Session {
        conn,
        events,
        replies,
        requests,
        happenings,
        renewal: None,
    })
}
