"""OpenTelemetry, set up as opentelemetry-instrumentation-celery documents it:
``CeleryInstrumentor().instrument()`` from ``worker_process_init``, so the
span processor starts in the pool process. Only when PROJ_OTEL_SPANS names a
file: finished spans are written there as JSON lines."""

import json
import os

from celery import signals

_SPANS = os.environ.get("PROJ_OTEL_SPANS")


def _exporter(path):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesExporter(SpanExporter):
        def export(self, spans):
            lines = []
            for s in spans:
                parent = s.parent
                lines.append(json.dumps({
                    "name": s.name,
                    "kind": s.kind.name,
                    "trace_id": format(s.context.trace_id, "032x"),
                    "span_id": format(s.context.span_id, "016x"),
                    "parent_span_id": format(parent.span_id, "016x") if parent else None,
                    "status": s.status.status_code.name,
                    "status_description": s.status.description,
                    "attributes": dict(s.attributes or {}),
                    "pid": os.getpid(),
                }, default=repr) + "\n")
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)
            return SpanExportResult.SUCCESS

        def shutdown(self):
            pass

    return JsonLinesExporter()


@signals.worker_process_init.connect(weak=False)
def instrument(**kwargs):
    if not _SPANS:
        return
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter(_SPANS)))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)
