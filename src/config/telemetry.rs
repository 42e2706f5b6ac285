//! `[tracing]`: OpenTelemetry spans over OTLP/HTTP, and the `OTEL_*` environment variables that
//! stand in for `tracing.otlp_endpoint` when it is unset.

use serde::{Deserialize, Serialize};

use super::SecretUrl;

/// `[tracing]`: spans over OTLP/HTTP, so a consumer's trace continues the webhook's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// OTLP/HTTP base URL (`http://otel-collector:4318`): spans go to `<it>/v1/traces`.
    /// Unset: `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) when the
    /// environment sets it, else tracing is off.
    /// A password, token or key in it is shown as `***` (check-config, logs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<SecretUrl>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of new traces recorded (0 to 1); a request's own `traceparent` decides for it.
    pub sample_ratio: f64,
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: the OTLP base URL (spans go to `<it>/v1/traces`), honoured
/// when `tracing.otlp_endpoint` is unset, as every OpenTelemetry SDK does.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The key of the endpoint, as [`TracingSettings::traces_url_from`] names it: the one source
/// that is checked when the configuration loads (the environment's is checked where tracing
/// starts).
pub(crate) const OTLP_ENDPOINT_KEY: &str = "tracing.otlp_endpoint";
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full traces URL, used as it is.
pub const OTLP_TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// `OTEL_EXPORTER_OTLP_PROTOCOL` / `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`: the exporter speaks
/// `http/json` (and a Collector's OTLP/HTTP port takes it beside `http/protobuf`); `grpc`
/// names a port it cannot talk to.
const OTLP_PROTOCOL_ENVS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];

impl TracingSettings {
    /// Where spans go: `otlp_endpoint` + `/v1/traces`, else the environment's OpenTelemetry
    /// variables; `None`: tracing is off.
    pub fn traces_url(&self) -> Option<String> {
        self.traces_url_from().map(|(url, _)| url)
    }

    /// [`TracingSettings::traces_url`] and what set it: the key, or the variable's name. The
    /// environment counts only while it does not turn OpenTelemetry off
    /// (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`).
    pub fn traces_url_from(&self) -> Option<(String, &'static str)> {
        let base = |b: &str| format!("{}/v1/traces", b.trim_end_matches('/'));
        if let Some(e) = &self.otlp_endpoint {
            return Some((base(e.expose()), OTLP_ENDPOINT_KEY));
        }
        let env = |k| {
            std::env::var(k)
                .ok()
                .filter(|v: &String| !v.trim().is_empty())
        };
        let off = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
        if off {
            return None;
        }
        env(OTLP_TRACES_ENDPOINT_ENV)
            .map(|u| (u, OTLP_TRACES_ENDPOINT_ENV))
            .or_else(|| env(OTLP_ENDPOINT_ENV).map(|b| (base(&b), OTLP_ENDPOINT_ENV)))
    }
}

/// Why the environment's endpoint cannot be used by the exporter for its protocol: it names
/// gRPC (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` first, as the SDKs read them). The key
/// `tracing.otlp_endpoint` is always OTLP/HTTP.
pub(crate) fn env_protocol_unusable() -> Option<&'static str> {
    OTLP_PROTOCOL_ENVS
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .filter(|p| p.trim().eq_ignore_ascii_case("grpc"))
        .map(|_| "the protocol is grpc: the exporter speaks OTLP/HTTP (http/json) only")
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "pusher-bridge".into(),
            sample_ratio: 1.0,
        }
    }
}
