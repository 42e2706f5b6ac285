"""Reads pusher-bridge events as CloudEvents with the CloudEvents Python SDK.

With `broker.cloudevents = true` every event message carries binary-mode `ce-` headers, so a
CloudEvents consumer takes it as it is: the SDK's HTTP binding reads NATS headers (same
`ce-` mapping, `content-type` = datacontenttype), its RabbitMQ binding reads AMQP headers
(`content_type` property = datacontenttype). Prints one JSON line per event.

    BROKER=nats NATS_URL=nats://127.0.0.1:4222 STREAM=PUSHER_EVENTS SUBJECT='pusher.>' \
    DURABLE=python-cloudevents-example python cloudevents_consumer.py
    BROKER=amqp AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=pusher.events \
    QUEUE=python-cloudevents-example BINDING='pusher.#' python cloudevents_consumer.py

A message without `ce-` headers (the bridge runs with `broker.cloudevents = false`, the
default, or published it before the switch) is no CloudEvent: it is skipped (NATS: terminated,
never redelivered; RabbitMQ: rejected without requeueing) with a line on stderr saying so, and
the consumer goes on.

DURABLE (NATS) and QUEUE (RabbitMQ) default to `python-cloudevents-example`, no other
example's: readers that share one share its events (a work queue). The NATS consumer is deleted
by the server after INACTIVE_THRESHOLD seconds without a pull (default 86400), the RabbitMQ
queue after QUEUE_EXPIRES seconds without a consumer (default 86400) and holds at most
QUEUE_MAX_LENGTH events (default 100000), as in nats_consumer.py and amqp_consumer.py.

MAX_MESSAGES=n stops after n events; by default it runs until stopped.
"""

import asyncio
import json
import os
import sys

from cloudevents.core.bindings import http, rabbitmq
from cloudevents.core.formats.json import JSONFormat

NOT_CLOUDEVENTS = (
    "has no ce- headers, so it is no CloudEvent: the bridge adds them only with "
    "broker.cloudevents = true (PUSHER_BRIDGE_BROKER__CLOUDEVENTS=true), to the events it "
    "publishes from then on; skipped"
)


class Skips:
    """Says why the first message without `ce-` headers was skipped, then names the others."""

    def __init__(self) -> None:
        self.count = 0

    def skip(self, where: str) -> None:
        self.count += 1
        if self.count == 1:
            print(f"cloudevents_consumer: the message on {where} {NOT_CLOUDEVENTS}", file=sys.stderr)
        else:
            print(f"cloudevents_consumer: skipped {where} (no ce- headers)", file=sys.stderr)
        sys.stderr.flush()


def is_cloudevent(headers: dict) -> bool:
    """Binary mode: the required `ce-specversion` header (any case, as header names go)."""
    return any(str(k).lower() == "ce-specversion" for k in headers)


def describe(event) -> str:
    time = event.get_time()
    return json.dumps(
        {
            "specversion": event.get_specversion(),
            "id": event.get_id(),
            "type": event.get_type(),
            "source": event.get_source(),
            "subject": event.get_subject(),
            "time": time.isoformat() if time else None,
            "datacontenttype": event.get_datacontenttype(),
            "data": event.get_data(),
        }
    )


async def from_nats(limit: int) -> None:
    import nats
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import ConsumerConfig

    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        os.environ.get("SUBJECT", "pusher.>"),
        durable=os.environ.get("DURABLE", "python-cloudevents-example"),
        stream=os.environ.get("STREAM", "PUSHER_EVENTS"),
        config=ConsumerConfig(
            inactive_threshold=float(os.environ.get("INACTIVE_THRESHOLD", "86400"))
        ),
    )
    skips = Skips()
    seen = 0
    while limit == 0 or seen < limit:
        try:
            messages = await sub.fetch(100 if limit == 0 else limit - seen, timeout=5)
        except NatsTimeout:
            continue
        for msg in messages:
            headers = dict(msg.headers or {})
            if not is_cloudevent(headers):
                skips.skip(msg.subject)
                await msg.term()  # never redelivered: it will not grow ce- headers
                continue
            message = http.HTTPMessage(headers=headers, body=msg.data)
            print(describe(http.from_binary(message, JSONFormat())), flush=True)
            await msg.ack()
            seen += 1
    await nc.close()


def from_amqp(limit: int) -> None:
    import pika

    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = os.environ.get("QUEUE", "python-cloudevents-example")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    # Bounded in time and size, so an example left behind does not grow for ever.
    channel.queue_declare(
        queue=queue,
        durable=True,
        arguments={
            "x-expires": int(float(os.environ.get("QUEUE_EXPIRES", "86400")) * 1000),
            "x-max-length": int(os.environ.get("QUEUE_MAX_LENGTH", "100000")),
        },
    )
    channel.queue_bind(
        queue=queue,
        exchange=os.environ.get("EXCHANGE", "pusher.events"),
        routing_key=os.environ.get("BINDING", "pusher.#"),
    )
    print(json.dumps({"ready": True}), flush=True)
    skips = Skips()
    seen = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=1):
        if method is None:
            continue
        headers = {
            k: v.decode() if isinstance(v, bytes) else str(v)
            for k, v in (properties.headers or {}).items()
        }
        if not is_cloudevent(headers):
            skips.skip(method.routing_key)
            channel.basic_reject(method.delivery_tag, requeue=False)
            continue
        message = rabbitmq.RabbitMQMessage(
            headers=headers, content_type=properties.content_type, body=body
        )
        print(describe(rabbitmq.from_binary(message, JSONFormat())), flush=True)
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if limit and seen >= limit:
            break
    channel.cancel()
    connection.close()


if __name__ == "__main__":
    limit = int(os.environ.get("MAX_MESSAGES", "0"))
    if os.environ.get("BROKER", "nats") == "amqp":
        from_amqp(limit)
    else:
        asyncio.run(from_nats(limit))
