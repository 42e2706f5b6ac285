"""A RabbitMQ consumer of pusher-bridge events, with pika.

Declares its own durable queue, binds it to the bridge's topic exchange with a binding key,
acknowledges each event after processing and drops redeliveries by `message_id` (RabbitMQ does
not deduplicate: a webhook Pusher delivered twice arrives twice with the same id). Each event is
processed in an OpenTelemetry consumer span that continues the bridge's trace: its `trace` field
is `<trace id> parent <the bridge's producer span id> span <its own id>`, or `<trace id> (new)
span <id>` for a message without `traceparent` (the bridge's tracing is off).

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=pusher.events \
    QUEUE=python-amqp-example BINDING='pusher.*.client_event.#' python amqp_consumer.py

QUEUE names the queue (default `python-amqp-example`, no other example's). Consumers of one
queue share its events, each event going to one of them (a work queue); each queue bound to the
exchange gets its own copy of every event it binds. The queue keeps events while the example is
stopped, but not for ever: RabbitMQ deletes it once it has had no consumer for QUEUE_EXPIRES
seconds (default 86400, a day: `x-expires`), and it holds at most QUEUE_MAX_LENGTH events
(default 100000, the oldest dropped first: `x-max-length`). `rabbitmqctl delete_queue <QUEUE>`
deletes it at once. Change either and delete the queue first: RabbitMQ refuses to declare an
existing queue with other arguments (PRECONDITION_FAILED).

It prints {"ready": true} once the queue is bound. MAX_MESSAGES=n stops after n events (the
test suite uses it); by default it runs until stopped.
"""

import json
import os
from collections import OrderedDict

import pika
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


REMEMBER = 100_000


def queue_arguments() -> dict:
    """`x-expires` (ms without a consumer before RabbitMQ deletes the queue) and `x-max-length`."""
    return {
        "x-expires": int(float(os.environ.get("QUEUE_EXPIRES", "86400")) * 1000),
        "x-max-length": int(os.environ.get("QUEUE_MAX_LENGTH", "100000")),
    }


def main() -> None:
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("EXCHANGE", "pusher.events")
    queue = os.environ.get("QUEUE", "python-amqp-example")
    binding = os.environ.get("BINDING", "pusher.*.client_event.#")
    limit = int(os.environ.get("MAX_MESSAGES", "0"))

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    # Bounded in time and size, so an example left behind does not grow for ever.
    channel.queue_declare(queue=queue, durable=True, arguments=queue_arguments())
    # `*` is one word (the app id), `#` any number of words; the channel is one escaped word.
    channel.queue_bind(queue=queue, exchange=exchange, routing_key=binding)
    channel.basic_qos(prefetch_count=100)
    print(json.dumps({"ready": True}), flush=True)

    seen_ids: "OrderedDict[str, None]" = OrderedDict()
    handled = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=1):
        if method is None:
            continue  # idle: nothing within a second
        msg_id = properties.message_id or ""
        if msg_id not in seen_ids:
            seen_ids[msg_id] = None
            if len(seen_ids) > REMEMBER:
                seen_ids.popitem(last=False)
            # The bridge's producer span, from the message's headers (none: a new trace).
            parent = w3c.extract(properties.headers or {})
            with tracer.start_as_current_span(
                f"process {queue}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes={"messaging.system": "rabbitmq", "messaging.message.id": msg_id},
            ) as span:
                event = json.loads(body)
                print(
                    json.dumps(
                        {
                            "id": msg_id,
                            "routing_key": method.routing_key,
                            "app_id": event["app_id"],
                            "event": event["name"],
                            "channel": event["channel"],
                            "redelivered": method.redelivered,
                            "trace": continuation(parent, span),
                        }
                    ),
                    flush=True,
                )
            handled += 1
        channel.basic_ack(method.delivery_tag)
        if limit and handled >= limit:
            break
    channel.cancel()
    connection.close()


if __name__ == "__main__":
    main()
