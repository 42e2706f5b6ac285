// A durable JetStream consumer of pusher-bridge events, with nats.js (`nats` on npm).
//
// Reads the events stream through a durable consumer with a subject filter, prints one JSON line
// per event and acknowledges it after processing, so a restart resumes where it stopped.
//
// Each event is processed in an OpenTelemetry consumer span that continues the bridge's trace: its
// `trace` field is `<trace id> parent <the bridge's producer span id> span <its own id>`, or
// `<trace id> (new) span <id>` for a message without `traceparent` (the bridge's tracing is off).
//
//   NATS_URL=nats://127.0.0.1:4222 STREAM=PUSHER_EVENTS \
//   SUBJECT='pusher.*.member_added.>' DURABLE=node-nats-example node nats_consumer.mjs
//
// DURABLE names the consumer (default `node-nats-example`, no other example's). Consumers that
// share a durable name share its events, each event going to one of them (a work queue); give
// each reader that must see every event a name of its own. The server deletes the consumer once
// nobody has pulled from it for INACTIVE_THRESHOLD seconds (default 86400, a day; a later run
// then starts again from the stream's first event); `nats consumer rm PUSHER_EVENTS <DURABLE>`
// deletes it at once.
//
// MAX_MESSAGES=n stops after n events (the test suite uses it); by default it runs until stopped.
import { context, propagation, SpanKind, trace } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { BasicTracerProvider } from "@opentelemetry/sdk-trace-base";
import { AckPolicy, connect, nanos } from "nats";

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

// nats.js headers (a MsgHdrs, or none) as the propagator reads them.
const natsHeaders = {
  keys: (h) => (h ? [...h.keys()] : []),
  get: (h, key) => h?.get(key) || undefined,
};

const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
const stream = process.env.STREAM ?? "PUSHER_EVENTS";
const subject = process.env.SUBJECT ?? "pusher.*.member_added.>";
const durable = process.env.DURABLE ?? "node-nats-example";
const inactive = Number(process.env.INACTIVE_THRESHOLD ?? "86400");
const limit = Number(process.env.MAX_MESSAGES ?? "0");

const nc = await connect({ servers: url.split(",") });
const jsm = await nc.jetstreamManager();
// Creates the durable consumer, or finds it with its position when it exists. The inactive
// threshold keeps an abandoned example from holding its consumer for ever.
await jsm.consumers.add(stream, {
  durable_name: durable,
  ack_policy: AckPolicy.Explicit,
  filter_subject: subject,
  inactive_threshold: nanos(inactive * 1000),
});
const consumer = await nc.jetstream().consumers.get(stream, durable);
const messages = await consumer.consume({ max_messages: 100 });
let seen = 0;
for await (const m of messages) {
  // The bridge's producer span, from the message's headers (none: a new trace).
  const parent = propagation.extract(context.active(), m.headers, natsHeaders);
  const span = tracer.startSpan(
    `process ${stream}`,
    {
      kind: SpanKind.CONSUMER,
      attributes: { "messaging.system": "nats", "messaging.destination.name": stream },
    },
    parent,
  );
  try {
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
        trace: continuation(parent, span),
      }),
    );
    m.ack();
  } finally {
    span.end();
  }
  seen += 1;
  if (limit && seen >= limit) break;
}
await nc.drain();
await provider.shutdown(); // flushes an exporter, when there is one
