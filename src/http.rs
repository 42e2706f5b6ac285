//! The HTTP side: routes, request limits, the webhook's key lookup and signature check (by
//! [`crate::webhook`]), and the one place where a refusal ([`RequestError`]) becomes a status
//! code and a metric outcome.
//!
//! Routes: `POST <webhook_path>`, `GET /metrics`, `GET /healthz`, `GET /readyz` (with
//! `server.admin_listen`, the webhook path on `listen` and the rest there, see [`Routes`]).
//! Request headers
//! must arrive within `server.header_read_timeout` and the body within
//! `server.body_read_timeout`; the body limit is enforced while reading. At most
//! `server.max_connections` connections are served at once; more wait to be accepted.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::bridge::{Accepted, Bridge, BridgeError};
use crate::broker::BrokerStatus;
use crate::metrics::Outcome;
use crate::metrics::exposition::Format;
use crate::telemetry::WebhookSpan;
use crate::webhook::AuthError;

/// Why a webhook request was refused: what only HTTP can see (method, headers, reading the
/// body), or the pipeline's own refusal.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not a POST.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Content type is not JSON.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// Body over `server.max_body_bytes`.
    #[error("body too large")]
    TooLarge,
    /// The body did not arrive within `server.body_read_timeout`.
    #[error("body not received in time")]
    BodyTimeout,
    /// The connection failed while the body was read.
    #[error("bad request: cannot read body: {0}")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The authentic webhook's refusal by the pipeline, or the key / signature check's.
    #[error(transparent)]
    Webhook(#[from] BridgeError),
}

impl From<AuthError> for RequestError {
    fn from(e: AuthError) -> Self {
        RequestError::Webhook(e.into())
    }
}

/// Status code and metric outcome of each refusal: the whole mapping, in one place.
pub fn status_of(e: &RequestError) -> (StatusCode, Outcome) {
    use BridgeError as W;
    match e {
        RequestError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, Outcome::BadRequest),
        RequestError::UnsupportedMediaType => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Outcome::UnsupportedMediaType,
        ),
        RequestError::TooLarge | RequestError::Webhook(W::TooManyEvents(_)) => {
            (StatusCode::PAYLOAD_TOO_LARGE, Outcome::TooLarge)
        }
        RequestError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, Outcome::BadRequest),
        RequestError::Webhook(W::Unauthorized(_)) => {
            (StatusCode::UNAUTHORIZED, Outcome::Unauthorized)
        }
        RequestError::BodyRead(_) | RequestError::Webhook(W::BadRequest(_)) => {
            (StatusCode::BAD_REQUEST, Outcome::BadRequest)
        }
        RequestError::Webhook(W::NotDurable { .. } | W::Stopped { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, Outcome::Unavailable)
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Resp {
    respond(status, "application/json", value.to_string())
}

/// Listens on `addr` with a listen backlog of `max_connections`: at `server.max_connections`
/// the next clients wait in the kernel's accept queue (see `serve_with_state`), so the queue
/// must hold a burst of that size. The default (128, the standard library's) cut a burst of
/// 1,500 connects at about 630 held connections. The kernel caps the backlog at
/// `net.core.somaxconn` (a warning says so when that is lower).
pub fn bind(addr: std::net::SocketAddr, max_connections: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let backlog = u32::try_from(max_connections.max(128)).unwrap_or(u32::MAX);
    if let Some(cap) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|cap| *cap < backlog)
    {
        tracing::warn!(
            max_connections,
            somaxconn = cap,
            "net.core.somaxconn caps the listen backlog below server.max_connections: a burst of connects beyond it is refused by the kernel"
        );
    }
    socket.listen(backlog)
}

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// Everything: the webhook path, the probes, `/metrics` and the state API
    /// (`server.admin_listen` unset).
    All,
    /// The webhook path alone (`server.listen` beside an admin listener): what Pusher must
    /// reach, and nothing else.
    Webhook,
    /// The probes, `/metrics` and the state API (`server.admin_listen`), not the webhook path.
    Admin,
}

/// Serves HTTP on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for up to `server.shutdown_grace`.
pub async fn serve(listener: TcpListener, bridge: Arc<Bridge>, shutdown: impl Future<Output = ()>) {
    serve_with_state(listener, bridge, None, Routes::All, shutdown).await;
}

/// [`serve`] of `routes`, plus the channel-state query API (`/apps/...`) when `state` is given
/// and `routes` include it.
pub(crate) async fn serve_with_state(
    listener: TcpListener,
    bridge: Arc<Bridge>,
    state: Option<crate::state::api::SharedApi>,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let header_timeout = bridge.settings().server.header_read_timeout;
    let grace = bridge.settings().server.shutdown_grace;
    let max_connections = bridge.settings().server.max_connections;
    warn_if_few_file_descriptors(max_connections);
    // As mini-redis does: a permit before each accept, held by the connection's task. At the
    // limit the next client waits in the listen backlog instead of being refused.
    let connections = Arc::new(Semaphore::new(max_connections));
    let mut last_full_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if last_full_warning.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY) {
                    last_full_warning = Some(Instant::now());
                    tracing::warn!(
                        max_connections,
                        "server.max_connections reached: new connections wait until one ends"
                    );
                }
                tokio::select! {
                    permit = connections.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // Never closed; stop serving rather than spin if it were.
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let bridge = bridge.clone();
                let state = state.clone();
                let service = service_fn(move |req| {
                    let bridge = bridge.clone();
                    let state = state.clone();
                    async move {
                        Ok::<_, Infallible>(route(req, &bridge, state.as_deref(), routes).await)
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight webhooks");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

/// At most one "max_connections reached" warning per this long (a flood would repeat it).
const FULL_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// File descriptors kept for everything but client connections (broker, spool, stdio).
const RESERVED_FDS: u64 = 64;

/// Warns when the process may run out of file descriptors before `server.max_connections`
/// (accept would then fail instead of connections waiting for a permit).
fn warn_if_few_file_descriptors(max_connections: usize) {
    let Some(soft) = open_files_limit() else {
        return;
    };
    if (max_connections as u64).saturating_add(RESERVED_FDS) > soft {
        tracing::warn!(
            max_connections,
            open_files_limit = soft,
            "server.max_connections is above the open-files limit (ulimit -n) less {RESERVED_FDS}: \
             raise the limit or lower server.max_connections"
        );
    }
}

/// The soft `Max open files` of this process (Linux `/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn route(
    req: Request<Incoming>,
    bridge: &Arc<Bridge>,
    state: Option<&crate::state::StateApi>,
    routes: Routes,
) -> Resp {
    let path = req.uri().path();
    let webhook_path = path == bridge.settings().server.webhook_path;
    let served = match routes {
        Routes::All => true,
        Routes::Webhook => webhook_path,
        Routes::Admin => !webhook_path,
    };
    if !served {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    if webhook_path {
        return webhook(req, bridge).await;
    }
    if path.starts_with("/apps/") {
        let (status, body) = crate::state::api::http_answer(req.method(), req.uri(), state).await;
        return json(status, body);
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => match bridge.readiness() {
            Ok(()) => match bridge.broker().status() {
                BrokerStatus::Up => respond(StatusCode::OK, "text/plain", "ready\n"),
                // Ready (the spool takes the events), and why the broker does not.
                status => respond(
                    StatusCode::OK,
                    "text/plain",
                    format!(
                        "ready; events go to the spool while the broker is not up: {}\n",
                        status.describe(bridge.settings().broker.kind, None)
                    ),
                ),
            },
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            let format = Format::of_accept(
                req.headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            respond(
                StatusCode::OK,
                format.content_type(),
                bridge.metrics().encode_as(format),
            )
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `application/json` or any `application/*+json`, parameters allowed, any case.
fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let media = value.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
        || (media.len() > 17
            && media[..12].eq_ignore_ascii_case("application/")
            && media[media.len() - 5..].eq_ignore_ascii_case("+json"))
}

async fn webhook(req: Request<Incoming>, bridge: &Arc<Bridge>) -> Resp {
    let started = Instant::now();
    let mut app_label: Option<Arc<str>> = None;
    // `[tracing]`: the request's server span (None when off or not sampled; off, the headers
    // are not even looked up).
    let tracer = bridge.tracer();
    let span = if tracer.is_on() {
        tracer.webhook(
            req.headers().get("traceparent").map(HeaderValue::as_bytes),
            req.headers().get("tracestate").map(HeaderValue::as_bytes),
        )
    } else {
        None
    };
    let result = accept_webhook(req, bridge, &mut app_label, span.as_ref()).await;
    let resp = answer(bridge, result, app_label.as_deref(), started);
    if let Some(span) = span {
        span.end(
            &bridge.settings().server.webhook_path,
            resp.status().as_u16(),
            app_label.as_deref(),
        );
    }
    resp
}

/// The answer to a webhook, counted in the metrics and logged when refused.
fn answer(
    bridge: &Arc<Bridge>,
    result: Result<Accepted, RequestError>,
    app_label: Option<&str>,
    started: Instant,
) -> Resp {
    let app_id = app_label.unwrap_or("unknown");
    let metrics = bridge.metrics();
    metrics
        .webhook_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(accepted) => {
            metrics.webhook(app_id, Outcome::Accepted);
            // Only an answer with spooled events says why the broker did not take them.
            let broker = (accepted.spooled > 0).then(|| bridge.broker().status());
            respond(
                StatusCode::OK,
                "application/json",
                accepted_body(&accepted, broker.as_ref()),
            )
        }
        Err(e) => {
            let (status, outcome) = status_of(&e);
            metrics.webhook(app_id, outcome);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(app_id, error = %e, "webhook refused");
            } else {
                tracing::warn!(app_id, status = status.as_u16(), error = %e, "webhook refused");
            }
            let mut body = serde_json::json!({ "error": e.to_string() });
            if let RequestError::Webhook(BridgeError::NotDurable { .. }) = &e {
                // Refused because neither the broker nor the spool took the events: say why
                // the broker did not, as a spooled answer does.
                broker_keys(&mut body, &bridge.broker().status());
            }
            let mut resp = json(status, body);
            if status == StatusCode::METHOD_NOT_ALLOWED {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            if status == StatusCode::SERVICE_UNAVAILABLE {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            resp
        }
    }
}

/// `{"published":n,"dead_lettered":n,"spooled":n}`, written directly (this is the answer to
/// every accepted webhook; a `serde_json::Value` would allocate a map for it). With `broker`
/// (events were spooled), why the broker did not take them follows the counts:
/// `"broker":"<token>"` ([`BrokerStatus::token`]) and, when the client or broker said why,
/// `"broker_error":"<its words>"`.
fn accepted_body(a: &Accepted, broker: Option<&BrokerStatus>) -> String {
    use std::fmt::Write;
    let mut body = String::with_capacity(64);
    // Writing into a String cannot fail.
    let _ = write!(
        body,
        "{{\"published\":{},\"dead_lettered\":{},\"spooled\":{}",
        a.published, a.dead_lettered, a.spooled
    );
    if let Some(status) = broker {
        let _ = write!(body, ",\"broker\":\"{}\"", status.token());
        if let Some(words) = status.error() {
            // Escaped as JSON: the words are the client's or the broker's.
            let _ = write!(body, ",\"broker_error\":{}", serde_json::Value::from(words));
        }
    }
    body.push('}');
    body
}

/// Adds `"broker"` and `"broker_error"` (as in [`accepted_body`]) to a refusal's body.
fn broker_keys(body: &mut serde_json::Value, status: &BrokerStatus) {
    if let Some(map) = body.as_object_mut() {
        map.insert("broker".into(), status.token().into());
        if let Some(words) = status.error() {
            map.insert("broker_error".into(), words.into());
        }
    }
}

async fn accept_webhook(
    req: Request<Incoming>,
    bridge: &Arc<Bridge>,
    app_label: &mut Option<Arc<str>>,
    span: Option<&WebhookSpan>,
) -> Result<Accepted, RequestError> {
    if req.method() != Method::POST {
        return Err(RequestError::MethodNotAllowed);
    }
    let headers = req.headers();
    if !is_json(headers.get(header::CONTENT_TYPE)) {
        return Err(RequestError::UnsupportedMediaType);
    }
    let server = &bridge.settings().server;
    let max = server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(RequestError::TooLarge);
    }
    let key = headers.get("x-pusher-key").cloned();
    let signature = headers.get("x-pusher-signature").cloned();
    let limited = Limited::new(req.into_body(), usize::try_from(max).unwrap_or(usize::MAX));
    let body = match tokio::time::timeout(server.body_read_timeout, limited.collect()).await {
        Err(_) => return Err(RequestError::BodyTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(RequestError::TooLarge);
        }
        Ok(Err(e)) => return Err(RequestError::BodyRead(e)),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let app = bridge
        .apps()
        .app_of(key.as_ref().map(HeaderValue::as_bytes))?
        .clone();
    *app_label = Some(app.app_id.clone());
    let signature = signature.as_ref().map(HeaderValue::as_bytes);
    Ok(bridge.handle_traced(&app, signature, &body, span).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        let ok = |s: &'static str| is_json(Some(&HeaderValue::from_static(s)));
        assert!(ok("application/json"));
        assert!(ok("application/json; charset=utf-8"));
        assert!(ok("Application/JSON;charset=UTF-8"));
        assert!(ok("application/vnd.pusher+json"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/jsonx"));
        assert!(!ok("application/x-www-form-urlencoded"));
        assert!(!is_json(None));
    }

    #[test]
    fn accepted_body_is_the_json_it_was() {
        let a = Accepted {
            published: 3,
            dead_lettered: 1,
            spooled: 0,
        };
        let body = accepted_body(&a, None);
        assert_eq!(body, r#"{"published":3,"dead_lettered":1,"spooled":0}"#);
        let spooled = Accepted {
            published: 0,
            dead_lettered: 0,
            spooled: 2,
        };
        let refused = BrokerStatus::Refused("nats: \"authorization\" violation".into());
        let body = accepted_body(&spooled, Some(&refused));
        assert!(
            body.starts_with(r#"{"published":0,"dead_lettered":0,"spooled":2,"broker":"refused""#),
            "the counts come first, in their order: {body}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["broker_error"], "nats: \"authorization\" violation");
        let v: serde_json::Value =
            serde_json::from_str(&accepted_body(&spooled, Some(&BrokerStatus::Connecting)))
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"published": 0, "dead_lettered": 0, "spooled": 2, "broker": "connecting"})
        );
    }

    #[test]
    fn every_error_has_its_status() {
        let cases = [
            (RequestError::MethodNotAllowed, 405),
            (RequestError::UnsupportedMediaType, 415),
            (RequestError::TooLarge, 413),
            (BridgeError::TooManyEvents(1000).into(), 413),
            (RequestError::BodyTimeout, 408),
            (AuthError::SignatureMismatch.into(), 401),
            (RequestError::BodyRead("x".into()), 400),
            (
                BridgeError::from(crate::webhook::PayloadError::TimeNotNumber).into(),
                400,
            ),
            (
                BridgeError::NotDurable {
                    events: 1,
                    source: crate::spool::SpoolError::Closed,
                }
                .into(),
                503,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(status_of(&e).0.as_u16(), code, "{e}");
        }
    }
}
