// A durable JetStream consumer of pusher-bridge events, with nats.js (`nats` on npm).
//
// Reads the events stream through a durable consumer with a subject filter, prints one JSON line
// per event and acknowledges it after processing, so a restart resumes where it stopped.
//
//   NATS_URL=nats://127.0.0.1:4222 STREAM=PUSHER_EVENTS \
//   SUBJECT='pusher.*.member_added.>' DURABLE=presence-sync node nats_consumer.mjs
//
// MAX_MESSAGES=n stops after n events (the test suite uses it); by default it runs until stopped.
import { AckPolicy, connect } from "nats";

const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const stream = process.env.STREAM ?? "PUSHER_EVENTS";
const subject = process.env.SUBJECT ?? "pusher.*.member_added.>";
const durable = process.env.DURABLE ?? "presence-sync";
const limit = Number(process.env.MAX_MESSAGES ?? "0");

const nc = await connect({ servers: url.split(",") });
const jsm = await nc.jetstreamManager();
// Creates the durable consumer, or finds it with its position when it exists.
await jsm.consumers.add(stream, {
  durable_name: durable,
  ack_policy: AckPolicy.Explicit,
  filter_subject: subject,
});
const consumer = await nc.jetstream().consumers.get(stream, durable);
const messages = await consumer.consume({ max_messages: 100 });
let seen = 0;
for await (const m of messages) {
  const event = m.json();
  console.log(
    JSON.stringify({
      // The same id for a webhook Pusher delivered twice.
      id: m.headers?.get("Nats-Msg-Id"),
      subject: m.subject,
      app_id: event.app_id,
      event: event.name,
      channel: event.channel,
      user_id: event.user_id,
    }),
  );
  m.ack();
  seen += 1;
  if (limit && seen >= limit) break;
}
await nc.drain();
