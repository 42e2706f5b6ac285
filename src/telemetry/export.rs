//! Spans out over OTLP/HTTP, in batches, as JSON (`application/json`, the encoding the OTLP
//! specification defines beside protobuf; the OpenTelemetry Collector, Jaeger, Tempo and
//! Honeycomb take it). Recording a span never waits: it goes into a bounded queue, and a span
//! that does not fit is dropped and counted. One background task sends the queue in batches;
//! an unreachable or slow collector costs that task time, never a webhook its answer, and
//! never more memory than the queue.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

use super::context::{SpanId, TraceId};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Spans waiting to be sent, at most: about 1 KiB each.
pub(crate) const QUEUE: usize = 8192;
/// Spans per export request, at most.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the last round at shutdown may take, all batches together.
const FINAL_ROUND: Duration = Duration::from_secs(1);
/// At most one warning about failed exports this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// OpenTelemetry's span kinds that the bridge records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The webhook request.
    Server,
    /// One message handed to the broker.
    Producer,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Attr {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// One finished span.
#[derive(Clone, Debug)]
pub(crate) struct SpanData {
    /// What the span did (`POST <path>`, `<operation> <destination>`), as a trace viewer lists it.
    pub name: String,
    /// Server (a webhook) or producer (a published event).
    pub kind: Kind,
    /// The trace it belongs to.
    pub trace_id: TraceId,
    /// Its own id, which the messages it produced carry in their `traceparent`.
    pub span_id: SpanId,
    /// The span it runs under (the caller's, or the webhook's), if any.
    pub parent: Option<SpanId>,
    /// When it began.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// OpenTelemetry's semantic attributes (`messaging.*`, `http.*`, the bridge's own).
    pub attributes: Vec<(&'static str, Attr)>,
    /// Spans this one follows from (a drained event's: the producer span it was spooled under).
    pub links: Vec<(TraceId, SpanId)>,
    /// Set when the span's work failed.
    pub error: Option<String>,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

impl SpanData {
    /// The span as OTLP/JSON writes it (ids in hex, 64-bit numbers as strings).
    fn to_json(&self) -> Value {
        let attributes: Vec<Value> = self
            .attributes
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Attr::Str(s) => json!({ "stringValue": s }),
                    Attr::Int(n) => json!({ "intValue": n.to_string() }),
                };
                json!({ "key": k, "value": value })
            })
            .collect();
        let mut span = json!({
            "traceId": self.trace_id.hex(),
            "spanId": self.span_id.hex(),
            "name": self.name,
            "kind": match self.kind { Kind::Server => 2, Kind::Producer => 4 },
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(self.end),
            "attributes": attributes,
            "status": match &self.error {
                None => json!({ "code": 1 }),
                Some(message) => json!({ "code": 2, "message": message }),
            },
        });
        if let Some(parent) = &self.parent {
            span["parentSpanId"] = json!(parent.hex());
        }
        if !self.links.is_empty() {
            span["links"] = self
                .links
                .iter()
                .map(|(t, s)| json!({ "traceId": t.hex(), "spanId": s.hex() }))
                .collect();
        }
        span
    }
}

/// The body of one export request.
pub(crate) fn request_body(service_name: &str, spans: &[SpanData]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": service_name } },
                { "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } },
            ]},
            "scopeSpans": [{
                "scope": { "name": "pusher-bridge", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(SpanData::to_json).collect::<Vec<_>>(),
            }],
        }],
    })
}

/// Where finished spans go: the queue of the export task.
#[derive(Clone)]
pub(crate) struct Recorder {
    tx: mpsc::Sender<SpanData>,
    metrics: Arc<Metrics>,
}

impl Recorder {
    /// Queues `span`, or drops and counts it when the queue is full (the collector is away or
    /// slower than the spans): never waits.
    pub(crate) fn record(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.trace_spans_dropped("queue_full", 1);
        }
    }
}

/// The export task's half: the queue's receiver (behind a lock, so the supervisor can start
/// the task again after a panic) and where to send.
pub(crate) struct Export {
    rx: Mutex<mpsc::Receiver<SpanData>>,
    url: hyper::Uri,
    /// `url` as the log shows it: user info and query left out (they may hold a key).
    shown_url: String,
    service_name: String,
    metrics: Arc<Metrics>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A recorder and its export task, sending to `url`.
pub(crate) fn channel(
    url: hyper::Uri,
    service_name: String,
    metrics: Arc<Metrics>,
) -> (Recorder, Arc<Export>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let recorder = Recorder {
        tx,
        metrics: metrics.clone(),
    };
    let shown_url = format!(
        "{}://{}{}",
        url.scheme_str().unwrap_or("http"),
        url.host().unwrap_or_default(),
        url.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + url.path();
    let export = Export {
        rx: Mutex::new(rx),
        shown_url,
        url,
        service_name,
        metrics,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    (recorder, Arc::new(export))
}

impl Export {
    /// Sends batches until `shutdown`, then what is queued (one last try, within
    /// [`FINAL_ROUND`]).
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut rx = self.rx.lock().await;
        let mut warned: Option<tokio::time::Instant> = None;
        // The batch in hand when the shutdown came: it goes in the last round.
        let mut rest = Vec::new();
        loop {
            let mut batch = Vec::new();
            let first = tokio::select! {
                () = shutdown.wait() => None,
                span = rx.recv() => span,
            };
            let Some(first) = first else { break };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < BATCH {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    () = shutdown.wait() => break,
                    span = rx.recv() => match span {
                        Some(span) => batch.push(span),
                        None => break,
                    },
                }
            }
            if shutdown.is_triggered() {
                rest = batch;
                break;
            }
            // A shutdown does not wait for a collector that does not answer (the batch is
            // tried once more in the last round).
            tokio::select! {
                () = self.send(&batch, &mut warned) => {}
                () = shutdown.wait() => {
                    rest = batch;
                    break;
                }
            }
        }
        // Shutting down: what is queued goes in one last round, within FINAL_ROUND at most
        // (the drainer and the broker's close must not wait for a collector that is gone).
        while let Ok(span) = rx.try_recv() {
            rest.push(span);
        }
        let last = async {
            for chunk in rest.chunks(BATCH) {
                self.send(chunk, &mut warned).await;
            }
        };
        let _ = tokio::time::timeout(FINAL_ROUND, last).await;
    }

    /// One export request; a failure drops the batch (counted, and said once a minute).
    async fn send(&self, batch: &[SpanData], warned: &mut Option<tokio::time::Instant>) {
        let n = batch.len() as u64;
        match self.export(batch).await {
            Ok(()) => self.metrics.trace_spans_exported(n),
            Err(why) => {
                self.metrics.trace_spans_dropped("export_failed", n);
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    *warned = Some(tokio::time::Instant::now());
                    tracing::warn!(url = %self.shown_url, error = %why, spans = n, "cannot export spans to the OTLP collector; they are dropped (one line a minute at most)");
                }
            }
        }
    }

    async fn export(&self, batch: &[SpanData]) -> Result<(), String> {
        let body = request_body(&self.service_name, batch).to_string();
        let req = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(EXPORT_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {}", answer.status()))
        }
    }
}
