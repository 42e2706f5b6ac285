//! A real OTLP/HTTP receiver for the tracing tests: takes `POST /v1/traces` with the JSON
//! encoding, as an OpenTelemetry Collector does, and keeps every span it decoded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One decoded span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    pub name: String,
    pub kind: u64,
    pub attributes: BTreeMap<String, String>,
    pub links: Vec<(String, String)>,
    /// `service.name` of its resource.
    pub service: String,
}

/// The receiver, listening until dropped.
pub struct Receiver {
    pub port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
    /// Raw request bodies, to check what never goes into a span.
    pub bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(v: &serde_json::Value) -> String {
    if let Some(s) = v["stringValue"].as_str() {
        return s.to_string();
    }
    if let Some(s) = v["intValue"].as_str() {
        return s.to_string();
    }
    v["intValue"].to_string()
}

fn decode(body: &str) -> Vec<Span> {
    let v: serde_json::Value = serde_json::from_str(body).expect("OTLP/JSON");
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| text(&a["value"]))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(Span {
                    trace_id: s["traceId"].as_str().unwrap_or_default().to_string(),
                    span_id: s["spanId"].as_str().unwrap_or_default().to_string(),
                    parent: s["parentSpanId"]
                        .as_str()
                        .filter(|p| !p.is_empty())
                        .map(str::to_string),
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    kind: s["kind"].as_u64().unwrap_or(0),
                    attributes: s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            (
                                a["key"].as_str().unwrap_or_default().to_string(),
                                text(&a["value"]),
                            )
                        })
                        .collect(),
                    links: s["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| {
                            (
                                l["traceId"].as_str().unwrap_or_default().to_string(),
                                l["spanId"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                    service: service.clone(),
                });
            }
        }
    }
    out
}

impl Receiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (spans.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, b) = (s.clone(), b.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, b) = (s.clone(), b.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let is_json = req
                                .headers()
                                .get("content-type")
                                .is_some_and(|c| c.as_bytes().starts_with(b"application/json"));
                            let body = req.into_body().collect().await.map(|c| c.to_bytes());
                            let status = match body {
                                Ok(body) if path == "/v1/traces" && is_json => {
                                    let text = String::from_utf8_lossy(&body).into_owned();
                                    s.lock().unwrap().extend(decode(&text));
                                    b.lock().unwrap().push(text);
                                    200
                                }
                                _ => 400,
                            };
                            let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            spans,
            bodies,
            task,
        }
    }

    /// The base URL (`tracing.otlp_endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The spans received so far once `done` says they are all there (waits up to 10 s).
    pub async fn spans_until(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        for _ in 0..500 {
            let spans = self.spans.lock().unwrap().clone();
            if done(&spans) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.spans.lock().unwrap().clone()
    }
}
