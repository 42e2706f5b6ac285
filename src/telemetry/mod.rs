//! Tracing with OpenTelemetry (`[tracing]`, off by default): one server span per webhook
//! (continuing the request's W3C `traceparent` when it has one), one producer span per
//! published event as its child, and each event's message carrying its producer span's
//! `traceparent` (and `tracestate`) in its headers, so a consumer that extracts the context
//! continues the trace. Events published later (the drainer) get a producer span of their
//! own, a child of the one they were spooled under and linked to it.
//!
//! Off, a [`Tracer`] is `None` inside: each call is one branch, nothing is allocated.
//! Spans carry no secret, body or user data: the app id, event name, message id, stream or
//! exchange, the HTTP method, path and status (not the subject: it holds the channel name,
//! which may name a user).

use std::sync::Arc;
use std::time::SystemTime;

pub(crate) mod context;
pub(crate) mod export;

use self::context::{SpanContext, SpanId, TraceId};
use self::export::{Attr, Export, Kind, Recorder, SpanData};
use crate::config::{BrokerKind, Settings};
use crate::message::{Message, TraceContext};
use crate::metrics::Metrics;

/// Starts and ends the bridge's spans; cheap to clone.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<Inner>>);

struct Inner {
    recorder: Recorder,
    /// A root trace is sampled when the low 8 bytes of its id are at most this.
    bound: u64,
    /// `messaging.system`.
    system: &'static str,
    /// `messaging.destination.name`: the events stream or exchange.
    destination: String,
}

impl Tracer {
    /// Off: records nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// The tracer of `settings` and its export task (`None`: tracing is off, or its URL is
    /// not one the exporter can reach, which [`Settings::load`] refuses earlier).
    pub(crate) fn new(settings: &Settings, metrics: Arc<Metrics>) -> (Self, Option<Arc<Export>>) {
        let Some((url, from)) = settings.tracing.traces_url_from() else {
            return (Self::off(), None);
        };
        let from_env = from != crate::config::OTLP_ENDPOINT_KEY;
        let unusable = crate::config::usable_traces_url(&url).err().or_else(|| {
            from_env
                .then(crate::config::env_protocol_unusable)
                .flatten()
        });
        if let Some(why) = unusable {
            // Only the environment gets here (the key is refused when the config loads).
            tracing::warn!(variable = from, why, "tracing stays off");
            return (Self::off(), None);
        }
        let Ok(url) = url.parse::<hyper::Uri>() else {
            return (Self::off(), None);
        };
        let (recorder, export) =
            export::channel(url, settings.tracing.service_name.clone(), metrics);
        let ratio = settings.tracing.sample_ratio.clamp(0.0, 1.0);
        let (system, destination) = match settings.broker.kind {
            BrokerKind::Amqp => ("rabbitmq", settings.broker.amqp.exchange.clone()),
            _ => ("nats", settings.broker.nats.stream.clone()),
        };
        let inner = Inner {
            recorder,
            // `as` saturates: 1.0 is every trace.
            bound: (ratio * u64::MAX as f64) as u64,
            system,
            destination,
        };
        (Self(Some(Arc::new(inner))), Some(export))
    }

    /// Whether spans are recorded.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The span of one webhook request: a child of the request's `traceparent` when it has a
    /// valid one (sampled as it says), else a new trace sampled by `tracing.sample_ratio`.
    /// `None` when tracing is off or the trace is not sampled.
    pub(crate) fn webhook(
        &self,
        traceparent: Option<&[u8]>,
        tracestate: Option<&[u8]>,
    ) -> Option<WebhookSpan> {
        let inner = self.0.as_ref()?;
        let parent = text(traceparent).and_then(|t| SpanContext::parse(t, text(tracestate)));
        let (trace_id, parent_span, sampled, tracestate) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.sampled, p.tracestate),
            None => {
                let id = TraceId::random();
                (id, None, id.low() <= inner.bound, None)
            }
        };
        sampled.then(|| WebhookSpan {
            inner: inner.clone(),
            ctx: SpanContext {
                trace_id,
                span_id: SpanId::random(),
                sampled: true,
                tracestate,
            },
            parent: parent_span,
            start: SystemTime::now(),
        })
    }

    /// Producer spans for events published again later (the spool drainer): each message that
    /// carries a context gets a new span, its child and linked to it, and carries the new
    /// span's context instead. Messages without one, and everything when tracing is off, are
    /// left as they are.
    pub(crate) fn republish(
        &self,
        messages: &mut [Message],
        name: &str,
    ) -> Vec<Option<ProducerSpan>> {
        let Some(inner) = &self.0 else {
            return messages.iter().map(|_| None).collect();
        };
        messages
            .iter_mut()
            .map(|m| {
                let old = m
                    .trace
                    .as_ref()
                    .and_then(|t| SpanContext::parse(&t.traceparent, t.tracestate.as_deref()))?;
                let span =
                    ProducerSpan::start(inner, &old, m, name, vec![(old.trace_id, old.span_id)]);
                m.trace = Some(Box::new(span.carried()));
                Some(span)
            })
            .collect()
    }
}

/// A header value as text (`None` when it is not UTF-8).
fn text(v: Option<&[u8]>) -> Option<&str> {
    v.and_then(|b| std::str::from_utf8(b).ok())
}

/// A webhook request's span, open until [`WebhookSpan::end`].
pub(crate) struct WebhookSpan {
    inner: Arc<Inner>,
    ctx: SpanContext,
    parent: Option<SpanId>,
    start: SystemTime,
}

impl WebhookSpan {
    /// One producer span per message, children of this span; each message carries its own
    /// span's context from now on.
    pub(crate) fn producers(&self, messages: &mut [Message]) -> Vec<ProducerSpan> {
        messages
            .iter_mut()
            .map(|m| {
                let span = ProducerSpan::start(&self.inner, &self.ctx, m, "publish", Vec::new());
                m.trace = Some(Box::new(span.carried()));
                span
            })
            .collect()
    }

    /// Ends the span with the answer's `status` and, once known, the app.
    pub(crate) fn end(self, path: &str, status: u16, app_id: Option<&str>) {
        let mut attributes = vec![
            ("http.request.method", Attr::Str("POST".into())),
            ("url.path", Attr::Str(path.to_string())),
            ("http.response.status_code", Attr::Int(i64::from(status))),
        ];
        if let Some(app) = app_id {
            attributes.push(("pusher.app_id", Attr::Str(app.to_string())));
        }
        self.inner.recorder.record(SpanData {
            name: format!("POST {path}"),
            kind: Kind::Server,
            trace_id: self.ctx.trace_id,
            span_id: self.ctx.span_id,
            parent: self.parent,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            links: Vec::new(),
            error: (status >= 500).then(|| format!("answered {status}")),
        });
    }
}

/// One message's producer span, open until [`ProducerSpan::end`].
pub(crate) struct ProducerSpan {
    inner: Arc<Inner>,
    ctx: SpanContext,
    parent: SpanId,
    start: SystemTime,
    name: String,
    attributes: Vec<(&'static str, Attr)>,
    links: Vec<(TraceId, SpanId)>,
}

impl ProducerSpan {
    fn start(
        inner: &Arc<Inner>,
        parent: &SpanContext,
        m: &Message,
        operation: &str,
        links: Vec<(TraceId, SpanId)>,
    ) -> Self {
        Self {
            inner: inner.clone(),
            ctx: SpanContext {
                trace_id: parent.trace_id,
                span_id: SpanId::random(),
                sampled: true,
                tracestate: parent.tracestate.clone(),
            },
            parent: parent.span_id,
            start: SystemTime::now(),
            name: format!("{operation} {}", inner.destination),
            attributes: vec![
                ("messaging.system", Attr::Str(inner.system.to_string())),
                ("messaging.operation.type", Attr::Str("send".into())),
                (
                    "messaging.destination.name",
                    Attr::Str(inner.destination.clone()),
                ),
                ("messaging.message.id", Attr::Str(m.msg_id.clone())),
                ("pusher.app_id", Attr::Str(m.app_id.to_string())),
                ("pusher.event", Attr::Str(m.event.clone())),
            ],
            links,
        }
    }

    /// The context the message carries: this span's.
    fn carried(&self) -> TraceContext {
        TraceContext {
            traceparent: self.ctx.traceparent(),
            tracestate: self.ctx.tracestate.clone(),
        }
    }

    /// Ends the span with where the event went (`published`, `dead_lettered`, `spooled`).
    pub(crate) fn end(mut self, outcome: &'static str) {
        self.attributes
            .push(("pusher.outcome", Attr::Str(outcome.to_string())));
        self.inner.recorder.record(SpanData {
            name: self.name,
            kind: Kind::Producer,
            trace_id: self.ctx.trace_id,
            span_id: self.ctx.span_id,
            parent: Some(self.parent),
            start: self.start,
            end: SystemTime::now(),
            attributes: self.attributes,
            links: self.links,
            error: (outcome == "dead_lettered").then(|| "dead-lettered".to_string()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_checked_and_spans_go_to_v1_traces() {
        let s =
            Settings::from_toml("[tracing]\notlp_endpoint = \"http://collector:4318/\"\n").unwrap();
        assert_eq!(
            s.tracing.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        for (toml, words) in [
            (
                "otlp_endpoint = \"https://api.vendor.io\"",
                "https is not supported",
            ),
            ("otlp_endpoint = \"collector:4318\"", "http:// URL"),
            ("sample_ratio = 1.5", "between 0 and 1"),
        ] {
            let e = Settings::from_toml(&format!("[tracing]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("tracing.") && e.contains(words), "{e}");
        }
    }

    #[test]
    fn ratio_sampling_decides_by_the_trace_id_and_a_parent_decides_for_itself() {
        let metrics = Arc::new(Metrics::new());
        let mut s = Settings::default();
        s.tracing.otlp_endpoint = Some(crate::config::SecretUrl::new("http://127.0.0.1:1"));
        s.tracing.sample_ratio = 0.0;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (never, _) = Tracer::new(&s, metrics.clone());
        assert!((0..100).all(|_| never.webhook(None, None).is_none()));
        let sampled_parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(never.webhook(Some(sampled_parent), None).is_some());
        s.tracing.sample_ratio = 1.0;
        let (always, _) = Tracer::new(&s, metrics);
        assert!((0..100).all(|_| always.webhook(None, None).is_some()));
        let unsampled_parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert!(always.webhook(Some(unsampled_parent), None).is_none());
        assert!(Tracer::off().webhook(Some(sampled_parent), None).is_none());
    }
}
