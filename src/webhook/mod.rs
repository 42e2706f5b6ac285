//! The Pusher webhook itself: which app sent it and whether it is authentic ([`auth`]: key
//! lookup, HMAC-SHA256 over the raw body), what events it carries ([`parse`](mod@parse)), and
//! the messages and dead letters they become ([`prepare`](mod@prepare)). [`crate::http`] calls
//! the lookup (`AppRegistry::app_of`); [`crate::bridge`] checks the signature
//! ([`AppKey::check`]) and calls the rest.
//!
//! Parsing borrows from the raw body: each event's JSON text is kept byte for byte (key order,
//! unknown fields, value types) and only `name` and `channel` are looked at. The message body is
//! then that text with `"app_id"` and `"time_ms"` spliced in, never a re-serialisation.

pub mod auth;
pub mod parse;
pub mod prepare;

pub(crate) use auth::check_age;
pub use auth::{AppKey, AppRegistry, Apps, AuthError};
pub use parse::{EventHead, MAX_CHANNEL_CHARS, PayloadError, Webhook, event_head, parse};
pub(crate) use prepare::prepare;
pub use prepare::{body_suffix, message_body};

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::config::{AppSettings, Secret};

    fn app(id: &str, secret: &str) -> AppKey {
        let reg = AppRegistry::new(&[AppSettings {
            id: id.into(),
            key: "k".into(),
            secret: Secret::new(secret),
            secret_file: None,
        }]);
        let key = reg.get("k").unwrap();
        AppKey {
            app_id: key.app_id.clone(),
            key: key.key.clone(),
            mac: key.mac.clone(),
            body_suffix_head: key.body_suffix_head.clone(),
        }
    }

    #[test]
    fn signature_good_tampered_wrong_key_bad_hex() {
        let a = app("1", "app-secret");
        let body = br#"{"time_ms":1,"events":[]}"#;
        let sig = a.sign(body);
        assert!(a.verify(body, sig.as_bytes()));
        assert!(a.verify(body, sig.to_uppercase().as_bytes()));
        assert!(!a.verify(br#"{"time_ms":2,"events":[]}"#, sig.as_bytes()));
        let other = app("1", "other-secret");
        assert!(!other.verify(body, sig.as_bytes()));
        let mut non_hex = sig.clone().into_bytes();
        non_hex[0] = b'z';
        assert!(!a.verify(body, &non_hex));
        assert!(!a.verify(body, &sig.as_bytes()[..62]));
        assert!(!a.verify(body, format!("{sig}00").as_bytes()));
        assert!(!a.verify(body, b""));
        assert!(!a.verify(body, "é".repeat(32).as_bytes()));
    }

    #[test]
    fn sockudo_fixtures_verify_and_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/sockudo-webhooks");
        let mut seen = 0;
        for i in 1..=5 {
            let path = dir.join(format!("0{i}.json"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let a = app(v["app_id"].as_str().unwrap(), v["secret"].as_str().unwrap());
            let body = v["raw_body"].as_str().unwrap().as_bytes();
            let sig = v["headers"]["x-pusher-signature"].as_str().unwrap();
            assert!(a.verify(body, sig.as_bytes()), "fixture {i}");
            let hook = parse(body, 100).unwrap();
            for e in &hook.events {
                let head = event_head(e).unwrap();
                let out = message_body(e, &head, &body_suffix(&a, hook.time_ms));
                let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
                let orig: serde_json::Value = serde_json::from_str(e.get()).unwrap();
                for (k, val) in orig.as_object().unwrap() {
                    assert_eq!(&got[k], val);
                }
                assert_eq!(got["app_id"], "app-id");
                assert_eq!(got["time_ms"].as_u64().unwrap().to_string(), hook.time_ms);
            }
            seen += 1;
        }
        assert_eq!(seen, 5, "fixtures missing in {}", dir.display());
    }

    #[test]
    fn every_event_type_keeps_its_fields_and_types() {
        let a = app("123456", "s");
        let body = br#"{"time_ms":1700000000000,"extra":true,"events":[
            {"name":"channel_occupied","channel":"c1"},
            {"name":"channel_vacated","channel":"c1"},
            {"name":"member_added","channel":"presence-r","user_id":"u1"},
            {"name":"member_removed","channel":"presence-r","user_id":"u1"},
            {"name":"client_event","channel":"private-a.b","event":"client-x","data":"{\"a\":1}","socket_id":"1.2","user_id":"u"},
            {"name":"cache_miss","channel":"cache-x","data":"{}"},
            {"name":"subscription_count","channel":"c","subscription_count":5},
            {"name":"member_updated","channel":"presence-r","future":[1,2.5,null,{"x":false}]}
        ]}"#;
        let hook = parse(body, 100).unwrap();
        assert_eq!(hook.events.len(), 8);
        let suffix = body_suffix(&a, hook.time_ms);
        for e in &hook.events {
            let head = event_head(e).unwrap();
            let out: serde_json::Value =
                serde_json::from_slice(&message_body(e, &head, &suffix)).unwrap();
            let orig: serde_json::Value = serde_json::from_str(e.get()).unwrap();
            for (k, v) in orig.as_object().unwrap() {
                assert_eq!(&out[k], v, "{k}");
            }
            assert_eq!(out["app_id"], "123456");
            assert_eq!(out["time_ms"], 1_700_000_000_000u64);
        }
        let sc = event_head(hook.events[6]).unwrap();
        let out: serde_json::Value =
            serde_json::from_slice(&message_body(hook.events[6], &sc, &suffix)).unwrap();
        assert!(out["subscription_count"].is_number());
    }

    #[test]
    fn body_splice_keeps_bytes_and_handles_empty_objects() {
        let a = app("1", "s");
        let suffix = body_suffix(&a, "5");
        let e: &RawValue = serde_json::from_str(r#"{"channel":"c", "name":"n","x":1.50}"#).unwrap();
        let head = event_head(e).unwrap();
        assert_eq!(
            String::from_utf8(message_body(e, &head, &suffix)).unwrap(),
            r#"{"channel":"c", "name":"n","x":1.50,"app_id":"1","time_ms":5}"#
        );
        let reserved: &RawValue =
            serde_json::from_str(r#"{"channel":"c","name":"n","app_id":"evil","time_ms":0}"#)
                .unwrap();
        let head = event_head(reserved).unwrap();
        assert!(head.has_reserved_keys);
        let out: serde_json::Value =
            serde_json::from_slice(&message_body(reserved, &head, &suffix)).unwrap();
        assert_eq!(out["app_id"], "1");
        assert_eq!(out["time_ms"], 5);
    }

    #[test]
    fn malformed_payloads_and_events() {
        assert!(parse(b"not json", 100).is_err());
        assert!(parse(br#"{"events":[]}"#, 100).is_err());
        assert!(parse(br#"{"time_ms":1}"#, 100).is_err());
        assert!(parse(br#"{"time_ms":"1","events":[]}"#, 100).is_err());
        assert!(parse(br#"{"time_ms":1,"events":{}}"#, 100).is_err());
        assert!(parse(br#"[1]"#, 100).is_err());
        let hook = parse(
            br#"{"time_ms":1.5e3,"events":[1,"x",{"name":"a"},{"channel":"c"},{"name":2,"channel":"c"},{"name":"a","channel":"a b"},{"name":"a","channel":"x>"},{"name":"","channel":"c"}]}"#,
            100,
        )
        .unwrap();
        assert_eq!(hook.time_ms, "1.5e3");
        for e in hook.events {
            assert!(event_head(e).is_err(), "{}", e.get());
        }
    }

    #[test]
    fn names_longer_than_pusher_allows_and_deep_events_are_malformed() {
        let event = |channel: &str, extra: &str| {
            format!(r#"{{"name":"member_added","channel":"{channel}"{extra}}}"#)
        };
        let ok = |text: String| {
            let e: &RawValue = serde_json::from_str(Box::leak(text.into_boxed_str())).unwrap();
            event_head(e).map(|_| ())
        };
        assert!(ok(event(&"é".repeat(200), "")).is_ok());
        assert!(
            ok(event(&"c".repeat(201), ""))
                .unwrap_err()
                .contains("longer than 200")
        );
        assert!(ok(event(&".".repeat(1340), "")).is_err());
        let user = |id: &str| event("presence-r", &format!(r#","user_id":"{id}""#));
        assert!(ok(user(&"u".repeat(200))).is_ok());
        assert!(ok(user(&"u".repeat(201))).unwrap_err().contains("user_id"));
        assert!(ok(event("presence-r", r#","user_id":12345"#)).is_ok());
        let nested = |n: usize| format!(r#","x":{}"\"[{{"{}"#, "[".repeat(n), "]".repeat(n));
        assert!(ok(event("c", &nested(31))).is_ok());
        assert!(
            ok(event("c", &nested(32)))
                .unwrap_err()
                .contains("nested deeper")
        );
    }

    #[test]
    fn the_events_array_stops_at_the_limit() {
        let body = |n: usize| {
            let events = vec![r#"{"name":"a","channel":"c"}"#; n].join(",");
            format!(r#"{{"events":[{events}],"time_ms":1,"other":{{"events":1}}}}"#)
        };
        assert_eq!(parse(body(3).as_bytes(), 3).unwrap().events.len(), 3);
        assert!(matches!(
            parse(body(4).as_bytes(), 3),
            Err(PayloadError::TooManyEvents { max: 3 })
        ));
        // Syntax errors after the limit are not reached: still 413, not 400.
        assert!(matches!(
            parse(br#"{"time_ms":1,"events":[1,2,3,4,"#, 3),
            Err(PayloadError::TooManyEvents { .. })
        ));
        assert!(matches!(
            parse(br#"{"time_ms":1,"events":[],"events":[]}"#, 3),
            Err(PayloadError::Shape(_))
        ));
        assert!(matches!(
            parse(br#"{"time_ms":1,"events":[]} x"#, 3),
            Err(PayloadError::Shape(_))
        ));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let e: &RawValue =
            serde_json::from_str(r#"{"name":"client_event","channel":"private-\u0061"}"#).unwrap();
        assert_eq!(event_head(e).unwrap().channel, "private-a");
    }
}
