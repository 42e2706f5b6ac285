"""A durable JetStream consumer of pusher-bridge events, with nats-py.

Reads the events stream through a durable pull consumer with a subject filter, prints one JSON
line per event and acknowledges it after processing, so a restart resumes where it stopped.

    NATS_URL=nats://127.0.0.1:4222 STREAM=PUSHER_EVENTS \
    SUBJECT='pusher.*.member_added.>' DURABLE=presence-sync python nats_consumer.py

MAX_MESSAGES=n stops after n events (the test suite uses it); by default it runs until stopped.
"""

import asyncio
import json
import os

import nats
from nats.errors import TimeoutError as NatsTimeout


async def main() -> None:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    stream = os.environ.get("STREAM", "PUSHER_EVENTS")
    subject = os.environ.get("SUBJECT", "pusher.*.member_added.>")
    durable = os.environ.get("DURABLE", "presence-sync")
    limit = int(os.environ.get("MAX_MESSAGES", "0"))

    nc = await nats.connect(url)
    js = nc.jetstream()
    # Creates the durable consumer on first use; later runs continue from its position.
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
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
