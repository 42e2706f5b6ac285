//! Channel-state helpers: settings with `[state]` on and a unique bucket, Pusher-signed queries
//! of the state API, polling until an answer holds, state events as webhook JSON, clean-up.

use std::time::Duration;

use pusher_bridge::config::{BrokerKind, Settings};

use super::{APP_ID, APP_KEY, APP_SECRET, TestApp, cleanup, jetstream_ctx, nats_url, sign, unique};

/// Settings for one state test against `kind`: unique streams / queues and bucket.
pub fn state_settings(kind: BrokerKind) -> Settings {
    let mut s = super::settings_for(kind);
    s.state.enabled = true;
    s.state.bucket = unique("ST");
    s
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `path?query` signed as Pusher's SDKs sign a GET: `auth_*` plus `params`, sorted, HMAC of
/// `GET\n<path>\n<query>`.
pub fn signed(path: &str, params: &[(&str, &str)], key: &str, secret: &str, ts: i64) -> String {
    let ts = ts.to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("auth_key", key),
        ("auth_timestamp", ts.as_str()),
        ("auth_version", "1.0"),
    ];
    all.extend_from_slice(params);
    all.sort();
    let query: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let query = query.join("&");
    let signature = sign(secret, format!("GET\n{path}\n{query}").as_bytes());
    format!("{path}?{query}&auth_signature={signature}")
}

/// A correctly signed query of the test app: (status, JSON body).
pub async fn query(app: &TestApp, path: &str, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let target = signed(path, params, APP_KEY, APP_SECRET, now_secs());
    let answer = app.get(&target).await;
    let body = serde_json::from_str(&answer.body).unwrap_or(serde_json::Value::Null);
    (answer.status.as_u16(), body)
}

/// `/apps/<APP_ID>/...`.
pub fn app_path(rest: &str) -> String {
    format!("/apps/{APP_ID}{rest}")
}

/// Polls the signed query until `ok` holds on a 200 body (panics with the last answer after
/// `within`).
pub async fn wait_for(
    app: &TestApp,
    path: &str,
    params: &[(&str, &str)],
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = query(app, path, params).await;
        if status == 200 && ok(&body) {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{path} {params:?} never satisfied the check; last answer {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sorted user ids of a `/users` answer.
pub fn user_ids(body: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = body["users"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// `channel_occupied` / `channel_vacated` as event JSON.
pub fn occupancy(channel: &str, occupied: bool) -> String {
    let name = if occupied {
        "channel_occupied"
    } else {
        "channel_vacated"
    };
    serde_json::json!({ "name": name, "channel": channel }).to_string()
}

/// `member_added` / `member_removed` as event JSON.
pub fn member(channel: &str, user: &str, added: bool) -> String {
    let name = if added {
        "member_added"
    } else {
        "member_removed"
    };
    serde_json::json!({ "name": name, "channel": channel, "user_id": user }).to_string()
}

/// `subscription_count` as event JSON.
pub fn count(channel: &str, n: u64) -> String {
    serde_json::json!({ "name": "subscription_count", "channel": channel, "subscription_count": n })
        .to_string()
}

/// A webhook body of `events` (event JSON texts) at `time_ms`.
pub fn body(time_ms: u64, events: &[String]) -> String {
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    super::webhook_body(time_ms, &refs)
}

/// Deletes the test's streams / queues, the state bucket and the AMQP state queue.
pub async fn cleanup_state(kind: BrokerKind, settings: &Settings) {
    cleanup(kind, settings).await;
    let js = jetstream_ctx(&nats_url()).await;
    let _ = js
        .delete_stream(format!("KV_{}", settings.state.bucket))
        .await;
    if kind == BrokerKind::Amqp {
        super::delete_queue(&pusher_bridge::state::applier::amqp::queue_name(settings)).await;
    }
}
