"""Reads pusher-bridge events as CloudEvents with the CloudEvents Python SDK.

With `broker.cloudevents = true` every event message carries binary-mode `ce-` headers, so a
CloudEvents consumer takes it as it is: the SDK's HTTP binding reads NATS headers (same
`ce-` mapping, `content-type` = datacontenttype), its RabbitMQ binding reads AMQP headers
(`content_type` property = datacontenttype). Prints one JSON line per event.

    BROKER=nats NATS_URL=nats://127.0.0.1:4222 STREAM=PUSHER_EVENTS SUBJECT='pusher.>' \
    DURABLE=ce-reader python cloudevents_consumer.py
    BROKER=amqp AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=pusher.events \
    QUEUE=ce-reader BINDING='pusher.#' python cloudevents_consumer.py

MAX_MESSAGES=n stops after n events; by default it runs until stopped.
"""

import asyncio
import json
import os

from cloudevents.core.bindings import http, rabbitmq
from cloudevents.core.formats.json import JSONFormat


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

    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        os.environ.get("SUBJECT", "pusher.>"),
        durable=os.environ.get("DURABLE", "ce-reader"),
        stream=os.environ.get("STREAM", "PUSHER_EVENTS"),
    )
    seen = 0
    while limit == 0 or seen < limit:
        try:
            messages = await sub.fetch(100 if limit == 0 else limit - seen, timeout=5)
        except NatsTimeout:
            continue
        for msg in messages:
            message = http.HTTPMessage(headers=dict(msg.headers or {}), body=msg.data)
            print(describe(http.from_binary(message, JSONFormat())), flush=True)
            await msg.ack()
            seen += 1
    await nc.close()


def from_amqp(limit: int) -> None:
    import pika

    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = os.environ.get("QUEUE", "ce-reader")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True)
    channel.queue_bind(
        queue=queue,
        exchange=os.environ.get("EXCHANGE", "pusher.events"),
        routing_key=os.environ.get("BINDING", "pusher.#"),
    )
    print(json.dumps({"ready": True}), flush=True)
    seen = 0
    for method, properties, body in channel.consume(queue, inactivity_timeout=1):
        if method is None:
            continue
        headers = {
            k: v.decode() if isinstance(v, bytes) else str(v)
            for k, v in (properties.headers or {}).items()
        }
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
