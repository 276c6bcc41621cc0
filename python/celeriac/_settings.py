"""Which of the app's settings celeriac's worker honours, and which it
refuses at startup (see docs/python-apps.md, "Configuration from the app").

Every setting of Celery 5.7 (``celery.app.defaults``) is in :data:`SETTINGS`
(those of the other result backends by prefix, :data:`PREFIXES`), with how
celeriac handles it:

- ``option``: becomes a worker option (``_worker._options``, :func:`words`);
- ``task``: Celery copies it onto each task at ``finalize``; celeriac reads
  the task's attribute, so a task's own value wins, as under Celery;
- ``queues``: Celery builds the queue objects from it; celeriac declares and
  consumes what they say;
- ``celery``: Celery's own code applies it, in the supervisor (loader,
  logging) or in the task processes (tracer, result backend);
- ``celeriac``: celeriac already does what the setting asks for;
- ``client``: read by Celery's producer and result code only (in a task
  process too, as under ``celery worker``); nothing the worker does;
- ``n/a``: nothing a worker on RabbitMQ reads (beat, event receivers);
- ``refused``: refused at startup unless left at Celery's default;
- ``by value``: some values are served, the others refused (a function of
  :data:`CHECKS`, or of :func:`task_refusal` for what each task ends up with).

A refusal is one line naming each offending setting, its value and what to
do instead.
"""

import math
import os

OPTION, TASK, QUEUES, CELERY, CELERIAC = "option", "task", "queues", "celery", "celeriac"
CLIENT, NA, REFUSED, BY_VALUE = "client", "n/a", "refused", "by value"

HONOURED = (OPTION, TASK, QUEUES, CELERY, CELERIAC)
NOT_APPLICABLE = (CLIENT, NA)

_BACKEND = "Celery's result backend, in the task processes"
_LOGGING = "Celery's logging setup (app.log.setup), run in the supervisor before the fork"
_PRODUCER = "Celery's producer (a task that sends tasks uses it, as under celery worker)"
_JSON = "JSON only: celeriac decodes and encodes JSON; set it to json"
_ONE_URL = "celeriac consumes and publishes through one broker URL: give broker_url (or -b) only"

#: setting -> (kind, how celeriac handles it; for ``refused``, what to do instead).
SETTINGS = {
    # --- the broker connection ---
    "broker_url": (BY_VALUE, "--broker; one amqp://, amqps:// or pyamqp:// URL"),
    "broker_host": (OPTION, "--broker when broker_url is unset (Celery's own fallback)"),
    "broker_read_url": (BY_VALUE, "served when it is broker_url; " + _ONE_URL),
    "broker_write_url": (BY_VALUE, "served when it is broker_url; " + _ONE_URL),
    "broker_port": (BY_VALUE, "served when the broker URL has its own; otherwise write it into the URL"),
    "broker_user": (BY_VALUE, "served when the broker URL has its own; otherwise write it into the URL"),
    "broker_password": (BY_VALUE, "served when the broker URL has its own; otherwise write it into the URL"),
    "broker_vhost": (BY_VALUE, "served when the broker URL has its own; otherwise write it into the URL"),
    "broker_transport": (BY_VALUE, "amqp/pyamqp only: celeriac speaks AMQP 0-9-1 to RabbitMQ"),
    "broker_transport_options": (
        BY_VALUE,
        "honoured by Celery's producer in the task processes (confirm_publish, the retry policy) or "
        "meant for other transports (visibility_timeout); keys that shape the consuming connection "
        "(connect_timeout, read_timeout, write_timeout, socket_settings, client_properties, "
        "channel_max, frame_max, heartbeat, login_method, ssl) are refused",
    ),
    "broker_use_ssl": (
        BY_VALUE,
        "with an amqps:// URL: served when it asks for a verified server (cert_reqs=CERT_REQUIRED) "
        "and, if ca_certs is given, SSL_CERT_FILE names the same file; client certificates, "
        "CERT_NONE and other keys are refused",
    ),
    "broker_login_method": (BY_VALUE, "AMQPLAIN and PLAIN (the URL's user and password) served; EXTERNAL refused"),
    "broker_heartbeat": (
        BY_VALUE,
        "?heartbeat=N in the broker URL celeriac uses (a heartbeat already in the URL wins, as in kombu); "
        "None/0 refused (celeriac's heartbeats cannot be turned off), and with -b refused: "
        "put ?heartbeat=N in that URL",
    ),
    "broker_heartbeat_checkrate": (REFUSED, "celeriac's AMQP client paces heartbeats itself: remove it"),
    "broker_connection_timeout": (
        BY_VALUE,
        "?connection_timeout=<ms> in the broker URL celeriac uses (None: celeriac's 10 s, then it retries); "
        "with -b refused: put it in that URL",
    ),
    "broker_connection_retry": (
        REFUSED,
        "celeriac always reconnects to a lost broker (the task running then finishes): remove it",
    ),
    "broker_connection_retry_on_startup": (OPTION, "False: --boot-timeout=0 (no retry at startup)"),
    "broker_connection_max_retries": (
        BY_VALUE,
        "None or 0 (forever): --boot-timeout without end (and celeriac retries forever once running); "
        "another number is refused: remove it and give --boot-timeout",
    ),
    "broker_channel_error_retry": (
        CELERIAC,
        "celeriac reopens a channel the broker closed and declares its queues again, as True asks",
    ),
    "broker_failover_strategy": (REFUSED, "celeriac connects to one broker URL: remove it"),
    "broker_pool_limit": (CLIENT, _PRODUCER),
    "broker_pool_acquire_timeout": (CLIENT, _PRODUCER),
    "broker_native_delayed_delivery_queue_type": (
        REFUSED,
        "celeriac declares the delay levels of native delayed delivery as quorum queues: remove it",
    ),
    # --- messages ---
    "accept_content": (BY_VALUE, _JSON),
    "task_serializer": (BY_VALUE, _JSON + " (a task's own serializer too)"),
    "result_accept_content": (BY_VALUE, _JSON),
    "result_serializer": (BY_VALUE, _JSON),
    "event_serializer": (BY_VALUE, _JSON),
    "task_compression": (
        REFUSED,
        "celeriac does not decompress task messages (and the app's tasks would send compressed ones): remove it",
    ),
    "task_protocol": (CLIENT, _PRODUCER + "; celeriac consumes protocol 1 and 2"),
    "security_key": (NA, "used only by app.setup_security(), whose auth serializer is refused"),
    "security_key_password": (NA, "used only by app.setup_security(), whose auth serializer is refused"),
    "security_certificate": (NA, "used only by app.setup_security(), whose auth serializer is refused"),
    "security_cert_store": (NA, "used only by app.setup_security(), whose auth serializer is refused"),
    "security_digest": (NA, "used only by app.setup_security(), whose auth serializer is refused"),
    # --- queues ---
    "task_queues": (QUEUES, "the queues consumed (without -Q, all of them) and how they are declared"),
    "task_default_queue": (QUEUES, "the default queue"),
    "task_default_exchange": (QUEUES, "the default queue's exchange"),
    "task_default_exchange_type": (QUEUES, "direct, topic, fanout and headers exchanges"),
    "task_default_routing_key": (QUEUES, "the default queue's routing key"),
    "task_default_queue_type": (QUEUES, "x-queue-type (quorum: native delayed delivery, as Celery)"),
    "task_queue_max_priority": (QUEUES, "x-max-priority"),
    "task_create_missing_queues": (QUEUES, "a -Q queue the app does not declare (False: refused at startup)"),
    "task_create_missing_queue_type": (QUEUES, "a -Q queue the app does not declare"),
    "task_create_missing_queue_exchange_type": (QUEUES, "a -Q queue the app does not declare"),
    # --- running tasks ---
    "task_acks_late": (OPTION, "--acks-late; a task's own acks_late wins"),
    "task_acks_on_failure_or_timeout": (
        BY_VALUE,
        "celeriac acknowledges an acks-late task that failed or timed out; an acks-late task that "
        "would not (False) is refused",
    ),
    "task_acks_on_failure": (BY_VALUE, "as task_acks_on_failure_or_timeout, for failures"),
    "task_acks_on_timeout": (BY_VALUE, "as task_acks_on_failure_or_timeout, for hard time limits"),
    "task_reject_on_worker_lost": (OPTION, "--reject-on-worker-lost; a task's own value wins"),
    "task_retry_on_worker_lost": (BY_VALUE, "a task with retry_on_worker_lost=True is refused"),
    "task_time_limit": (OPTION, "--time-limit; a task's own time_limit wins"),
    "task_soft_time_limit": (OPTION, "--soft-time-limit; a task's own soft_time_limit wins"),
    "task_track_started": (OPTION, "--track-started; a task's own track_started wins"),
    "task_ignore_result": (TASK, "each task's ignore_result"),
    "task_default_rate_limit": (TASK, "each task's rate_limit"),
    "task_store_errors_even_if_ignored": (TASK, "each task's store_errors_even_if_ignored (the tracer and celeriac's failures)"),
    "task_annotations": (TASK, "applied to each task at finalize"),
    "task_inherit_parent_priority": (CELERY, "Celery's tracer and producer"),
    "worker_deduplicate_successful_tasks": (CELERY, "Celery's tracer (a redelivered acks-late task)"),
    "worker_disable_rate_limits": (BY_VALUE, "True with a task that has a rate_limit is refused"),
    # --- what a task publishes, and clients ---
    "task_routes": (CLIENT, _PRODUCER),
    "task_default_priority": (CLIENT, _PRODUCER),
    "task_default_delivery_mode": (CLIENT, _PRODUCER),
    "task_publish_retry": (CLIENT, _PRODUCER),
    "task_publish_retry_policy": (CLIENT, _PRODUCER),
    "task_send_sent_event": (CLIENT, _PRODUCER + " (task-sent events of what tasks send)"),
    "task_repr_maxlevels": (CLIENT, _PRODUCER),
    "task_allow_error_cb_on_chord_header": (CLIENT, "Celery's canvas"),
    "task_always_eager": (CLIENT, "Celery's apply_async"),
    "task_eager_propagates": (CLIENT, "Celery's apply"),
    "task_store_eager_result": (CLIENT, "Celery's apply"),
    "task_remote_tracebacks": (CLIENT, "Celery's AsyncResult.get"),
    # --- results ---
    "result_backend": (CELERY, _BACKEND + "; rpc:// and redis:// are also --result-backend"),
    "result_backend_always_retry": (CELERY, _BACKEND),
    "result_backend_base_sleep_between_retries_ms": (CELERY, _BACKEND),
    "result_backend_max_retries": (CELERY, _BACKEND),
    "result_backend_max_sleep_between_retries_ms": (CELERY, _BACKEND),
    "result_backend_transport_options": (CELERY, _BACKEND),
    "result_cache_max": (CLIENT, "Celery's AsyncResult"),
    "result_chord_join_timeout": (CELERY, _BACKEND),
    "result_chord_retry_interval": (CELERY, _BACKEND),
    "result_chord_expires": (CELERY, _BACKEND),
    "result_compression": (CELERY, _BACKEND),
    "result_exchange": (CELERY, _BACKEND),
    "result_exchange_type": (CELERY, _BACKEND),
    "result_expires": (CELERY, _BACKEND),
    "result_failure_expires": (CELERY, _BACKEND),
    "result_extended": (CELERY, _BACKEND),
    "result_persistent": (CELERY, _BACKEND),
    # --- the worker's processes ---
    "worker_pool": (BY_VALUE, "prefork (or processes) only"),
    "worker_pool_start_method": (BY_VALUE, "fork only"),
    "worker_concurrency": (OPTION, "-c"),
    "worker_prefetch_multiplier": (OPTION, "--prefetch-multiplier (0: no limit, as Celery)"),
    "worker_max_tasks_per_child": (OPTION, "--max-tasks-per-child"),
    "worker_max_memory_per_child": (OPTION, "--max-memory-per-child"),
    "worker_eta_task_limit": (OPTION, "--eta-limit"),
    "worker_send_task_events": (OPTION, "-E"),
    "worker_proc_alive_timeout": (
        OPTION,
        "--child-heartbeat-timeout (a starting process silent this long is replaced; celeriac's default 60 s)",
    ),
    "worker_lost_wait": (CELERIAC, "celeriac learns of a lost process from its exit and reports it at once"),
    "worker_timer_precision": (CELERIAC, "celeriac's ETA and rate-limit timers fire on time, without polling"),
    "worker_enable_prefetch_count_reduction": (
        CELERIAC,
        "each task process reserves its own messages and takes its whole prefetch back after a reconnect",
    ),
    "worker_disable_prefetch": (NA, "Redis brokers only; Celery ignores it on RabbitMQ too"),
    "worker_autoscaler": (NA, "read only with --autoscale, which celeriac refuses"),
    "worker_pool_putlocks": (REFUSED, "each celeriac task process consumes its own messages: remove it"),
    "worker_pool_restarts": (REFUSED, "celeriac has no pool_restart command; restart the worker: remove it"),
    "worker_consumer": (REFUSED, "celeriac's consumer is its own: remove it"),
    "worker_timer": (REFUSED, "celeriac's timers are its own: remove it"),
    "worker_agent": (REFUSED, "celeriac starts no cell actor agent: remove it"),
    "worker_direct": (REFUSED, "celeriac consumes no per-node queue (C.dq2): remove it, route to a queue"),
    "worker_detect_quorum_queues": (
        REFUSED,
        "celeriac always detects quorum queues (per-consumer prefetch, native delayed delivery): remove it",
    ),
    "worker_cancel_long_running_tasks_on_connection_loss": (
        REFUSED,
        "a celeriac task running when the broker is lost finishes: remove it",
    ),
    "worker_enable_remote_control": (
        REFUSED,
        "celeriac always answers remote control (celery inspect/control, Flower): remove it",
    ),
    "worker_state_db": (
        REFUSED,
        "celeriac keeps revoked ids in memory: remove it (give tasks an expires for revokes that must outlive a restart)",
    ),
    "worker_soft_shutdown_timeout": (
        REFUSED,
        "celeriac's warm shutdown hands unfinished tasks back after --shutdown-timeout: remove it and set that",
    ),
    "worker_enable_soft_shutdown_on_idle": (
        REFUSED,
        "celeriac has no soft shutdown (see --shutdown-timeout): remove it",
    ),
    # --- logging ---
    "worker_hijack_root_logger": (CELERY, _LOGGING),
    "worker_log_color": (CELERY, _LOGGING),
    "worker_log_format": (CELERY, _LOGGING + " (--log-format json replaces it)"),
    "worker_log_datefmt": (CELERY, _LOGGING),
    "worker_task_log_format": (CELERY, _LOGGING + " (--log-format json replaces it)"),
    "worker_task_log_datefmt": (CELERY, _LOGGING),
    "worker_redirect_stdouts": (CELERY, _LOGGING),
    "worker_redirect_stdouts_level": (CELERY, _LOGGING),
    # --- events and remote control ---
    "event_exchange": (REFUSED, "celeriac sends events to the celeryev exchange: remove it"),
    "event_queue_ttl": (NA, "event receivers' queues (Flower, celery events); celeriac has no gossip"),
    "event_queue_expires": (NA, "event receivers' queues (Flower, celery events); celeriac has no gossip"),
    "event_queue_prefix": (NA, "event receivers' queues (Flower, celery events); celeriac has no gossip"),
    "event_queue_durable": (NA, "event receivers' queues (Flower, celery events); celeriac has no gossip"),
    "event_queue_exclusive": (NA, "event receivers' queues (Flower, celery events); celeriac has no gossip"),
    "control_exchange": (REFUSED, "celeriac's remote control listens on the celery.pidbox exchange: remove it"),
    "control_queue_ttl": (REFUSED, "celeriac declares its pidbox queue as Celery's defaults say: remove it"),
    "control_queue_expires": (REFUSED, "celeriac declares its pidbox queue as Celery's defaults say: remove it"),
    "control_queue_durable": (REFUSED, "celeriac declares its pidbox queue as Celery's defaults say: remove it"),
    "control_queue_exclusive": (REFUSED, "celeriac declares its pidbox queue as Celery's defaults say: remove it"),
    # --- the app ---
    "imports": (CELERY, "Celery's loader, in the supervisor"),
    "include": (CELERY, "Celery's loader, in the supervisor (-I adds to it)"),
    "timezone": (CELERY, "Celery's code (an ETA without a zone is UTC, in Celery and in celeriac)"),
    "enable_utc": (CELERY, "Celery's code"),
}

#: Every setting of these namespaces (a result backend's, beat's) is handled alike.
PREFIXES = {
    "beat_": (NA, "celery beat's; run it as a process of its own"),
    "arangodb_": (CELERY, _BACKEND),
    "azureblockblob_": (CELERY, _BACKEND),
    "cache_": (CELERY, _BACKEND),
    "cassandra_": (CELERY, _BACKEND),
    "cosmosdbsql_": (CELERY, _BACKEND),
    "couchbase_": (CELERY, _BACKEND),
    "database_": (CELERY, _BACKEND),
    "elasticsearch_": (CELERY, _BACKEND),
    "gcs_": (CELERY, _BACKEND),
    "mongodb_": (CELERY, _BACKEND),
    "redis_": (CELERY, _BACKEND),
    "s3_": (CELERY, _BACKEND),
}


def handling(key):
    """``(kind, how)`` for a setting, or None for one celeriac does not know."""
    if key in SETTINGS:
        return SETTINGS[key]
    for prefix, entry in PREFIXES.items():
        if key.startswith(prefix):
            return entry
    return None


# --- values ---


def _defaults():
    from celery.app.defaults import DEFAULTS

    return DEFAULTS


def _is_default(key, value):
    """Whether ``value`` is what Celery does with the setting left alone."""
    default = _defaults().get(key)
    if value == default:
        return True
    if default is None:
        return value in (None, "", (), [], {})
    if isinstance(default, bool):
        return bool(value) == default
    if isinstance(default, (int, float)) and value is not None and not isinstance(value, bool):
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return False
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value) == list(default)
    return False


def _without_passwords(value):
    from kombu.utils.url import maybe_sanitize_url

    if isinstance(value, str) and "://" in value:
        return ";".join(maybe_sanitize_url(url) for url in value.split(";"))
    if isinstance(value, (list, tuple)):
        return [_without_passwords(v) for v in value]
    return value


def _shown(key, value):
    """The value for a one-line message: URLs without their password, short."""
    text = repr(_without_passwords(value))
    return text if len(text) <= 120 else text[:117] + "..."


def _one_url(conf):
    url = conf.broker_url
    return url if isinstance(url, str) and ";" not in url else None


def _url_parts(conf):
    from kombu.utils.url import url_to_parts

    url = _one_url(conf)
    return url_to_parts(url) if url else None


_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_JSON_NAMES = ("json", "application/json")


def _check_broker_url(conf, value, given):
    url = conf.broker_url
    if url is None:
        return None
    if not _one_url(conf):
        return "celeriac connects to one broker: give one amqp:// or amqps:// URL (no failover list)"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _AMQP_SCHEMES:
        return "celeriac consumes from RabbitMQ: give an amqp:// or amqps:// URL"
    return None


def _check_same_url(attribute):
    def check(conf, value, given):
        if getattr(conf, attribute) != conf.broker_url:
            return _ONE_URL
        return None

    return check


def _check_url_part(part):
    def check(conf, value, given):
        parts = _url_parts(conf)
        if value in (None, "") or (parts is not None and getattr(parts, part) not in (None, "")):
            return None
        return "celeriac takes it from the broker URL only: write it into broker_url"

    return check


def _check_transport(conf, value, given):
    if value in (None, "") or str(value).lower() in ("amqp", "amqps", "pyamqp", "py-amqp", "librabbitmq"):
        return None
    return "celeriac speaks AMQP 0-9-1 to RabbitMQ: remove it"


# Keys of broker_transport_options that py-amqp applies to the connection
# Celery's worker consumes on; celeriac's connections do not read them.
_CONSUMING_CONNECTION_KEYS = (
    "connect_timeout",
    "read_timeout",
    "write_timeout",
    "socket_settings",
    "client_properties",
    "channel_max",
    "frame_max",
    "heartbeat",
    "login_method",
    "login_response",
    "authentication",
    "locale",
    "ssl",
)


def _check_transport_options(conf, value, given):
    bad = sorted(k for k in (value or {}) if k in _CONSUMING_CONNECTION_KEYS)
    if not bad:
        return None
    return f"celeriac's AMQP client does not read {', '.join(bad)}: remove " + ("it" if len(bad) == 1 else "them")


def _check_use_ssl(conf, value, given):
    if not value:
        return None
    parts = _url_parts(conf)
    if parts is None or parts.scheme.lower() != "amqps":
        return "celeriac speaks TLS to an amqps:// URL: give the broker as amqps://"
    if value is True:
        return None
    if not isinstance(value, dict):
        return "give True or a dict of ssl options"
    import ssl

    problems = []
    for key, option in value.items():
        if key == "cert_reqs":
            if option not in (ssl.CERT_REQUIRED, "CERT_REQUIRED", "required"):
                problems.append("celeriac always verifies the broker's certificate (cert_reqs=CERT_REQUIRED)")
        elif key == "ca_certs":
            trusted = os.environ.get("SSL_CERT_FILE")
            if not trusted or os.path.realpath(trusted) != os.path.realpath(str(option)):
                problems.append(f"celeriac trusts the CAs in SSL_CERT_FILE: set SSL_CERT_FILE={option}")
        elif key in ("keyfile", "certfile"):
            problems.append("celeriac sends no client certificate")
        else:
            problems.append(f"celeriac has no {key} for the broker's TLS")
    return ", ".join(problems) or None


def _check_login_method(conf, value, given):
    if value in (None, "") or str(value).upper() in ("AMQPLAIN", "PLAIN"):
        return None
    return "celeriac logs in with the URL's user and password (PLAIN): remove it"


def _check_heartbeat(conf, value, given):
    parts = _url_parts(conf)
    if parts is not None and "heartbeat" in parts.query:
        return None  # the URL's wins, as in kombu
    if not value:
        return "celeriac cannot turn AMQP heartbeats off: remove it, or give a number of seconds"
    try:
        float(value)
    except (TypeError, ValueError):
        return "give a number of seconds"
    if _broker_from_command_line(given):
        return f"celeriac cannot add it to the URL given with -b: add ?heartbeat={_int(value)} to that URL"
    return None


def _check_connection_timeout(conf, value, given):
    if value is None:
        return None
    try:
        float(value)
    except (TypeError, ValueError):
        return "give a number of seconds"
    if _broker_from_command_line(given):
        return (
            "celeriac cannot add it to the URL given with -b: add "
            f"?connection_timeout={_int(float(value) * 1000)} (milliseconds) to that URL"
        )
    return None


def _check_max_retries(conf, value, given):
    if value in (None, 0):
        return None
    return (
        "celeriac retries an unreachable broker for --boot-timeout seconds at startup and forever once "
        "running: remove it and give --boot-timeout"
    )


def _check_json_list(conf, value, given):
    values = (value,) if isinstance(value, str) else (value or ())
    if all(v in _JSON_NAMES for v in values):
        return None
    return "celeriac decodes JSON messages only: set it to ['json']"


def _check_json(conf, value, given):
    if value in (None, "") or value in _JSON_NAMES:
        return None
    return "celeriac speaks JSON only: set it to 'json'"


def _check_pool(conf, value, given):
    if value in (None, "", "prefork", "processes"):
        return None
    return "celeriac runs the prefork pool only: remove it"


def _check_start_method(conf, value, given):
    if value in (None, "", "fork"):
        return None
    return "celeriac forks its task processes from the loaded app: remove it"


def _per_task(conf, value, given):
    return None  # decided per task, after finalize (task_refusal)


#: setting -> check(conf, value, given): None when served, else what to do.
CHECKS = {
    "broker_url": _check_broker_url,
    "broker_read_url": _check_same_url("broker_read_url"),
    "broker_write_url": _check_same_url("broker_write_url"),
    "broker_port": _check_url_part("port"),
    "broker_user": _check_url_part("username"),
    "broker_password": _check_url_part("password"),
    "broker_vhost": _check_url_part("path"),
    "broker_transport": _check_transport,
    "broker_transport_options": _check_transport_options,
    "broker_use_ssl": _check_use_ssl,
    "broker_login_method": _check_login_method,
    "broker_heartbeat": _check_heartbeat,
    "broker_connection_timeout": _check_connection_timeout,
    "broker_connection_max_retries": _check_max_retries,
    "accept_content": _check_json_list,
    "result_accept_content": _check_json_list,
    "task_serializer": _check_json,
    "result_serializer": _check_json,
    "event_serializer": _check_json,
    "worker_pool": _check_pool,
    "worker_pool_start_method": _check_start_method,
    "task_acks_on_failure_or_timeout": _per_task,
    "task_acks_on_failure": _per_task,
    "task_acks_on_timeout": _per_task,
    "task_retry_on_worker_lost": _per_task,
    "worker_disable_rate_limits": _per_task,
}


def _broker_from_command_line(given):
    """Whether the broker URL came from -b (the app's own URL, with what
    the settings add to it, is then not used)."""
    broker = (given or {}).get("broker")
    return bool(broker) and os.environ.get("BROKER_URL") != broker


def _int(value):
    return int(math.ceil(float(value)))


def _value(conf, key):
    if key in ("broker_url", "broker_read_url", "broker_write_url"):
        return getattr(conf, key)
    return conf.get(key)


def _name(key, namespace):
    return f"{namespace}_{key.upper()}" if namespace else key


def refusal(conf, given=None, namespace=None):
    """One line naming every setting of the app celeriac cannot serve (its
    value, and what to do instead), or None. ``given`` are the options
    ``load`` got; ``namespace`` the app's (``CELERY`` for Django settings)."""
    problems = []
    for key, (kind, how) in SETTINGS.items():
        if kind not in (REFUSED, BY_VALUE):
            continue
        value = _value(conf, key)
        if kind == REFUSED:
            if _is_default(key, value):
                continue
            why = how
        else:
            if key not in ("broker_url",) and _is_default(key, value):
                continue
            why = CHECKS[key](conf, value, given)
            if why is None:
                continue
        problems.append(f"{_name(key, namespace)}={_shown(key, value)} ({why})")
    if not problems:
        return None
    return "celeriac cannot serve these settings of the app: " + "; ".join(problems)


def _listed(names):
    names = sorted(names, key=lambda n: (n.startswith("celery."), n))
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def task_refusal(app, namespace=None):
    """One line naming what the app's tasks ask for (after ``finalize``:
    settings, annotations and each task's own options) that celeriac does
    not do, or None."""
    conf = app.conf
    found = {}

    def note(what, name):
        found.setdefault(what, []).append(name)

    disable_rate_limits = bool(conf.get("worker_disable_rate_limits"))
    for name, task in app.tasks.items():
        serializer = getattr(task, "serializer", None)
        if serializer not in (None, "") and serializer not in _JSON_NAMES:
            note(
                f"serializer={serializer!r} (the app's task_serializer or the task's own; "
                "celeriac speaks JSON only: set it to 'json')",
                name,
            )
        if getattr(task, "acks_late", False):
            failure = not getattr(task, "acks_on_failure", True)
            timeout = not getattr(task, "acks_on_timeout", True)
            if failure or timeout:
                what = "acks_on_failure_or_timeout" if failure and timeout else (
                    "acks_on_failure" if failure else "acks_on_timeout"
                )
                note(
                    f"{what}=False with acks_late (from task_{what} or the task's own; celeriac acknowledges "
                    "an acks-late task that failed or hit its hard time limit: remove it)",
                    name,
                )
        if getattr(task, "retry_on_worker_lost", False):
            note(
                "retry_on_worker_lost=True (from task_retry_on_worker_lost or the task's own; celeriac fails a "
                "task whose process died, or requeues it with reject_on_worker_lost: remove it)",
                name,
            )
        if disable_rate_limits and getattr(task, "rate_limit", None):
            note(
                f"rate_limit with {_name('worker_disable_rate_limits', namespace)}=True (celeriac applies "
                "rate limits: remove the setting or the task's rate_limit)",
                name,
            )
    if not found:
        return None
    return "celeriac cannot serve these tasks of the app as configured: " + "; ".join(
        f"{what}: {_listed(names)}" for what, names in found.items()
    )


# --- worker options ---

#: --boot-timeout standing for "retry forever" (ten years).
FOREVER = 10 * 365 * 24 * 3600


def broker_url(conf):
    """The app's broker URL with what its settings add for celeriac's
    client: ``heartbeat`` and ``connection_timeout`` (milliseconds) in the
    query, unless the URL has them (kombu's URL wins over the settings too)."""
    url = conf.broker_url
    if not _one_url(conf):
        return url
    parts = _url_parts(conf)
    extra = []
    heartbeat = conf.get("broker_heartbeat")
    if not _is_default("broker_heartbeat", heartbeat) and heartbeat and "heartbeat" not in parts.query:
        extra.append(f"heartbeat={_int(heartbeat)}")
    timeout = conf.get("broker_connection_timeout")
    if (
        timeout is not None
        and not _is_default("broker_connection_timeout", timeout)
        and "connection_timeout" not in parts.query
    ):
        extra.append(f"connection_timeout={_int(float(timeout) * 1000)}")
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + "&".join(extra)


def words(conf):
    """The worker options (as command-line words) the settings of this
    module map onto, beyond those ``_worker._options`` reads directly."""
    out = []
    if "CELERIAC_BOOT_TIMEOUT" not in os.environ:
        on_startup = conf.get("broker_connection_retry_on_startup")
        if on_startup is not None and not on_startup:
            out.append("--boot-timeout=0")
        elif conf.get("broker_connection_max_retries") in (None, 0):
            out.append(f"--boot-timeout={FOREVER}")
    alive = conf.get("worker_proc_alive_timeout")
    if alive is not None and not _is_default("worker_proc_alive_timeout", alive):
        out.append(f"--child-heartbeat-timeout={_int(alive)}")
    return out
