"""A durable JetStream consumer of pusher-bridge events, with nats-py.

Reads the events stream through a durable pull consumer with a subject filter, prints one JSON
line per event and acknowledges it after processing, so a restart resumes where it stopped.
Each event is processed in an OpenTelemetry consumer span that continues the bridge's trace:
its `trace` field is `<trace id> parent <the bridge's producer span id> span <its own id>`, or
`<trace id> (new) span <id>` for a message without `traceparent` (the bridge's tracing is off).

    NATS_URL=nats://127.0.0.1:4222 STREAM=PUSHER_EVENTS \
    SUBJECT='pusher.*.member_added.>' DURABLE=python-nats-example python nats_consumer.py

DURABLE names the consumer (default `python-nats-example`, no other example's). Consumers that
share a durable name share its events, each event going to one of them (a work queue); give
each reader that must see every event a name of its own. The server deletes the consumer once
nobody has pulled from it for INACTIVE_THRESHOLD seconds (default 86400, a day; a later run
then starts again from the stream's first event); `nats consumer rm PUSHER_EVENTS <DURABLE>`
deletes it at once.

MAX_MESSAGES=n stops after n events (the test suite uses it); by default it runs until stopped.
"""

import asyncio
import json
import os

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Real spans with ids, sent nowhere. To send them to the collector the bridge sends its spans to,
# `pip install opentelemetry-exporter-otlp-proto-http==1.45.2` (the SDK's release), set
# OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4318; OTEL_SERVICE_NAME names the service)
# and add after the provider:
#     from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
#     from opentelemetry.sdk.trace.export import BatchSpanProcessor
#     provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
provider = TracerProvider()
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("pusher-bridge-example")
w3c = TraceContextTextMapPropagator()  # reads the `traceparent` and `tracestate` headers


def continuation(parent, span) -> str:
    """`<trace id> parent <producer span id> span <span id>`, or `(new)` without a parent."""
    ids = span.get_span_context()
    producer = trace.get_current_span(parent).get_span_context()
    via = f"parent {format_span_id(producer.span_id)}" if producer.is_valid else "(new)"
    return f"{format_trace_id(ids.trace_id)} {via} span {format_span_id(ids.span_id)}"


async def main() -> None:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    stream = os.environ.get("STREAM", "PUSHER_EVENTS")
    subject = os.environ.get("SUBJECT", "pusher.*.member_added.>")
    durable = os.environ.get("DURABLE", "python-nats-example")
    inactive = float(os.environ.get("INACTIVE_THRESHOLD", "86400"))
    limit = int(os.environ.get("MAX_MESSAGES", "0"))

    nc = await nats.connect(url)
    js = nc.jetstream()
    # Creates the durable consumer on first use; later runs continue from its position. The
    # inactive threshold keeps an abandoned example from holding its consumer for ever.
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=stream,
        config=ConsumerConfig(inactive_threshold=inactive),
    )
    seen = 0
    while limit == 0 or seen < limit:
        batch = 100 if limit == 0 else min(100, limit - seen)
        try:
            messages = await sub.fetch(batch, timeout=5)
        except NatsTimeout:
            continue
        for msg in messages:
            headers = msg.headers or {}
            # The bridge's producer span, from the message's headers (none: a new trace).
            parent = w3c.extract(headers)
            with tracer.start_as_current_span(
                f"process {stream}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes={"messaging.system": "nats", "messaging.destination.name": stream},
            ) as span:
                event = json.loads(msg.data)
                print(
                    json.dumps(
                        {
                            # The same id for a webhook Pusher delivered twice.
                            "id": headers.get("Nats-Msg-Id"),
                            "subject": msg.subject,
                            "app_id": event["app_id"],
                            "event": event["name"],
                            "channel": event["channel"],
                            "user_id": event.get("user_id"),
                            "trace": continuation(parent, span),
                        }
                    ),
                    flush=True,
                )
                await msg.ack()
            seen += 1
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
