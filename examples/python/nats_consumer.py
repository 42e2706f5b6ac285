"""A durable JetStream consumer of pusher-bridge events, with nats-py.

Reads the events stream through a durable pull consumer with a subject filter, prints one JSON
line per event and acknowledges it after processing, so a restart resumes where it stopped.

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
            event = json.loads(msg.data)
            headers = msg.headers or {}
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
                    }
                ),
                flush=True,
            )
            await msg.ack()
            seen += 1
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
