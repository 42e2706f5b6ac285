"""A RabbitMQ consumer of pusher-bridge events, with pika.

Declares its own durable queue, binds it to the bridge's topic exchange with a binding key,
acknowledges each event after processing and drops redeliveries by `message_id` (RabbitMQ does
not deduplicate: a webhook Pusher delivered twice arrives twice with the same id).

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
