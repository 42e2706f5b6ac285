//! A property test of the webhook parser, fed what a hostile sender with a valid secret could
//! sign: arbitrary bytes, arbitrary JSON, and webhook-shaped JSON with arbitrary events. Each
//! input must give one of the documented answers (200 with every event published or
//! `malformed`, 400, 413) without a panic, and parsing it must allocate no more than a small
//! multiple of its size (a counting allocator measures the peak).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use pusher_bridge::bridge::BridgeError;
use pusher_bridge::config::{AppSettings, Secret};
use pusher_bridge::webhook::{self, AppRegistry};
use serde_json::Value;

/// The global allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MAX_EVENTS: usize = 50;

/// What the bridge answers for `body` (its signature being right), as the HTTP status, and
/// the bytes allocated at the peak while deciding it (parse, route, build every message).
fn answer(body: &[u8]) -> (u16, usize) {
    let registry = AppRegistry::new(&[AppSettings {
        id: "123456".into(),
        key: "k".into(),
        secret: Secret::new("s"),
        secret_file: None,
    }]);
    let Some(app) = registry.get("k") else {
        unreachable!("the app was just configured")
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let status = match webhook::parse(body, MAX_EVENTS) {
        Err(e) => pusher_bridge::http::status_of(&BridgeError::from(e).into()).0,
        Ok(hook) => {
            assert!(hook.events.len() <= MAX_EVENTS);
            let suffix = webhook::body_suffix(app, hook.time_ms);
            for event in &hook.events {
                match webhook::event_head(event) {
                    // Routable: the message body is a JSON object with the bridge's fields.
                    Ok(head) => {
                        let out = webhook::message_body(event, &head, &suffix);
                        let v: Value = serde_json::from_slice(&out).expect("a JSON message body");
                        assert_eq!(v["app_id"], "123456", "{}", event.get());
                        assert!(head.channel.chars().count() <= webhook::MAX_CHANNEL_CHARS);
                    }
                    // Malformed: dead-lettered with its reason; the webhook is still 200.
                    Err(reason) => assert!(!reason.is_empty()),
                }
            }
            hyper::StatusCode::OK
        }
    };
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (status.as_u16(), peak)
}

fn check(body: &[u8]) -> Result<(), TestCaseError> {
    let (status, peak) = answer(body);
    prop_assert!([200, 400, 413].contains(&status), "status {status}");
    // Borrowed parsing: event references, message bodies (each about its event's size) and
    // error texts. A few times the body plus a constant, never a function of its nesting.
    let bound = 8 * body.len() + 64 * 1024;
    prop_assert!(
        peak <= bound,
        "{peak} bytes allocated for a {}-byte body",
        body.len()
    );
    Ok(())
}

/// Arbitrary JSON, keys biased towards the ones the parser looks at.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("time_ms".to_string()),
        Just("events".to_string()),
        Just("name".to_string()),
        Just("channel".to_string()),
        Just("user_id".to_string()),
        Just("app_id".to_string()),
        "\\PC{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
        "[a-z*>. ]{0,300}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `{"time_ms": <json>, "events": [<json>...]}` with 0 to 60 events (the limit is 50).
fn webhook_shaped() -> impl Strategy<Value = Value> {
    (
        prop_oneof![any::<u64>().prop_map(Value::from), json()],
        prop::collection::vec(json(), 0..60),
    )
        .prop_map(|(time_ms, events)| serde_json::json!({"time_ms": time_ms, "events": events}))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&body)?;
    }

    #[test]
    fn arbitrary_json(v in json()) {
        check(v.to_string().as_bytes())?;
    }

}

proptest! {
    // Larger inputs (up to 60 events each): fewer cases keep the test near a second.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn webhook_shaped_json(v in webhook_shaped()) {
        let body = v.to_string();
        check(body.as_bytes())?;
        let events = v["events"].as_array().map_or(0, Vec::len);
        let (status, _) = answer(body.as_bytes());
        if v["time_ms"].is_number() {
            prop_assert_eq!(status, if events > MAX_EVENTS { 413 } else { 200 });
        }
    }
}

#[test]
fn deep_nesting_is_a_malformed_event_not_a_stack_overflow() {
    let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
    for event in [
        format!("{open}{close}"),
        format!(r#"{{"name":"a","channel":"c","x":{open}{close}}}"#),
    ] {
        let body = format!(r#"{{"time_ms":1,"events":[{event}]}}"#);
        assert_eq!(answer(body.as_bytes()).0, 200);
        let hook = webhook::parse(body.as_bytes(), MAX_EVENTS).unwrap();
        assert!(webhook::event_head(hook.events[0]).is_err());
    }
}

#[test]
fn a_packed_body_stops_at_the_limit() {
    let packed = format!(
        r#"{{"time_ms":1,"events":[{}]}}"#,
        vec!["{}"; 200_000].join(",")
    );
    let (status, peak) = answer(packed.as_bytes());
    assert_eq!(status, 413);
    // MAX_EVENTS references and one error text, nothing per event of the 200,000.
    assert!(peak < 16 * 1024, "{peak} bytes");
}
