// A RabbitMQ consumer of pusher-bridge events, with amqplib.
//
// Declares its own durable queue, binds it to the bridge's topic exchange with a binding key,
// acknowledges each event after processing and drops redeliveries by `message_id` (RabbitMQ does
// not deduplicate: a webhook Pusher delivered twice arrives twice with the same id).
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=pusher.events \
//   QUEUE=client-events-worker BINDING='pusher.*.client_event.#' node amqp_consumer.mjs
//
// It prints {"ready":true} once the queue is bound. MAX_MESSAGES=n stops after n events (the
// test suite uses it); by default it runs until stopped.
import amqp from "amqplib";

const url = process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f";
const exchange = process.env.EXCHANGE ?? "pusher.events";
const queue = process.env.QUEUE ?? "client-events-worker";
const binding = process.env.BINDING ?? "pusher.*.client_event.#";
const limit = Number(process.env.MAX_MESSAGES ?? "0");
const REMEMBER = 100_000;

const conn = await amqp.connect(url);
const ch = await conn.createChannel();
await ch.assertQueue(queue, { durable: true });
// `*` is one word (the app id), `#` any number of words; the channel is one escaped word.
await ch.bindQueue(queue, exchange, binding);
await ch.prefetch(100);
console.log(JSON.stringify({ ready: true }));

const seenIds = new Set(); // insertion-ordered: the oldest id is dropped first
let handled = 0;
await new Promise((done) => {
  ch.consume(queue, (msg) => {
    if (msg === null) return done(); // the broker cancelled the consumer
    const id = msg.properties.messageId ?? "";
    if (!seenIds.has(id)) {
      seenIds.add(id);
      if (seenIds.size > REMEMBER) seenIds.delete(seenIds.values().next().value);
      const event = JSON.parse(msg.content.toString("utf8"));
      console.log(
        JSON.stringify({
          id,
          routing_key: msg.fields.routingKey,
          app_id: event.app_id,
          event: event.name,
          channel: event.channel,
          redelivered: msg.fields.redelivered,
        }),
      );
      handled += 1;
    }
    ch.ack(msg);
    if (limit && handled >= limit) done();
  });
});
await ch.close();
await conn.close();
