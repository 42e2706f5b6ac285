// A RabbitMQ consumer of pusher-bridge events, with amqplib.
//
// Declares its own durable queue, binds it to the bridge's topic exchange with a binding key,
// acknowledges each event after processing and drops redeliveries by `message_id` (RabbitMQ does
// not deduplicate: a webhook Pusher delivered twice arrives twice with the same id).
//
// Each event is processed in an OpenTelemetry consumer span that continues the bridge's trace: its
// `trace` field is `<trace id> parent <the bridge's producer span id> span <its own id>`, or
// `<trace id> (new) span <id>` for a message without `traceparent` (the bridge's tracing is off).
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f EXCHANGE=pusher.events \
//   QUEUE=node-amqp-example BINDING='pusher.*.client_event.#' node amqp_consumer.mjs
//
// QUEUE names the queue (default `node-amqp-example`, no other example's). Consumers of one queue
// share its events, each event going to one of them (a work queue); each queue bound to the
// exchange gets its own copy of every event it binds. The queue keeps events while the example is
// stopped, but not for ever: RabbitMQ deletes it once it has had no consumer for QUEUE_EXPIRES
// seconds (default 86400, a day: `x-expires`), and it holds at most QUEUE_MAX_LENGTH events
// (default 100000, the oldest dropped first: `x-max-length`). `rabbitmqctl delete_queue <QUEUE>`
// deletes it at once. Change either and delete the queue first: RabbitMQ refuses to declare an
// existing queue with other arguments (PRECONDITION_FAILED).
//
// It prints {"ready":true} once the queue is bound. MAX_MESSAGES=n stops after n events (the
// test suite uses it); by default it runs until stopped.
import { context, propagation, SpanKind, trace } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { BasicTracerProvider } from "@opentelemetry/sdk-trace-base";
import amqp from "amqplib";

// Real spans with ids, sent nowhere. To send them to the collector the bridge sends its spans to,
// `npm install @opentelemetry/exporter-trace-otlp-http@0.223.1` (the SDK 2.12.1 release), set
// OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4318) and make the provider with
//   new BasicTracerProvider({ spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter())] })
// (BatchSpanProcessor from @opentelemetry/sdk-trace-base, OTLPTraceExporter from the exporter).
const provider = new BasicTracerProvider();
trace.setGlobalTracerProvider(provider);
propagation.setGlobalPropagator(new W3CTraceContextPropagator()); // `traceparent`, `tracestate`
const tracer = trace.getTracer("pusher-bridge-example");

// `<trace id> parent <producer span id> span <span id>`, or `(new)` without a parent.
function continuation(parent, span) {
  const ids = span.spanContext();
  const producer = trace.getSpanContext(parent);
  const via = producer ? `parent ${producer.spanId}` : "(new)";
  return `${ids.traceId} ${via} span ${ids.spanId}`;
}

const url = process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f";
const exchange = process.env.EXCHANGE ?? "pusher.events";
const queue = process.env.QUEUE ?? "node-amqp-example";
const binding = process.env.BINDING ?? "pusher.*.client_event.#";
const limit = Number(process.env.MAX_MESSAGES ?? "0");
const REMEMBER = 100_000;

const conn = await amqp.connect(url);
const ch = await conn.createChannel();
// Bounded in time and size, so an example left behind does not grow for ever.
await ch.assertQueue(queue, {
  durable: true,
  expires: Number(process.env.QUEUE_EXPIRES ?? "86400") * 1000,
  maxLength: Number(process.env.QUEUE_MAX_LENGTH ?? "100000"),
});
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
      // The bridge's producer span, from the message's headers (none: a new trace).
      const parent = propagation.extract(context.active(), msg.properties.headers ?? {});
      const span = tracer.startSpan(
        `process ${queue}`,
        {
          kind: SpanKind.CONSUMER,
          attributes: { "messaging.system": "rabbitmq", "messaging.message.id": id },
        },
        parent,
      );
      try {
        const event = JSON.parse(msg.content.toString("utf8"));
        console.log(
          JSON.stringify({
            id,
            routing_key: msg.fields.routingKey,
            app_id: event.app_id,
            event: event.name,
            channel: event.channel,
            redelivered: msg.fields.redelivered,
            trace: continuation(parent, span),
          }),
        );
      } finally {
        span.end();
      }
      handled += 1;
    }
    ch.ack(msg);
    if (limit && handled >= limit) done();
  });
});
await ch.close();
await conn.close();
await provider.shutdown(); // flushes an exporter, when there is one
