//! Checks of values that parse but cannot work, each refusal naming its key
//! ([`ConfigError::Invalid`]); run by [`Settings::load`] and [`Settings::from_toml`].

use std::time::Duration;

use super::{
    BrokerKind, ConfigError, OTLP_ENDPOINT_KEY, RetentionMethod, Settings, invalid, servers,
};
use crate::message::is_subject_token;

impl Settings {
    /// Checks values that parse but cannot work.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        if let Some(admin) = self.admin_addr()?
            && admin == listen
            && admin.port() != 0
        {
            return Err(invalid(
                "server.admin_listen",
                "must differ from server.listen (unset it to serve everything on listen)",
            ));
        }
        let path = &self.server.webhook_path;
        if !path.starts_with('/') {
            return Err(invalid("server.webhook_path", "must start with `/`"));
        }
        if ["/metrics", "/healthz", "/readyz"].contains(&path.as_str()) {
            return Err(invalid(
                "server.webhook_path",
                "clashes with a built-in path",
            ));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        if self.server.max_events_per_webhook == 0 {
            return Err(invalid(
                "server.max_events_per_webhook",
                "must be greater than 0",
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be greater than 0"));
        }
        let t = &self.tracing;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(invalid("tracing.sample_ratio", "must be between 0 and 1"));
        }
        // The key is checked here; a URL from the environment (set for every container of a
        // namespace, perhaps) is checked where tracing starts, which then warns and stays off
        // rather than keep the bridge from starting.
        if let Some((url, OTLP_ENDPOINT_KEY)) = t.traces_url_from() {
            usable_traces_url(&url).map_err(|why| invalid(OTLP_ENDPOINT_KEY, why))?;
        }
        let mut keys = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            if app.id.is_empty() {
                return Err(invalid(format!("apps[{i}].id"), "must not be empty"));
            }
            if app.key.is_empty() {
                return Err(invalid(format!("apps[{i}].key"), "must not be empty"));
            }
            if app.secret.expose().is_empty() {
                return Err(invalid(
                    format!("apps[{i}].secret"),
                    format!("must not be empty (or name a file in apps[{i}].secret_file)"),
                ));
            }
            if !keys.insert(app.key.as_str()) {
                return Err(invalid(
                    format!("apps[{i}].key"),
                    "the same key is configured twice",
                ));
            }
        }
        let prefix = &self.broker.subject_prefix;
        if !prefix.split('.').all(is_subject_token) {
            return Err(invalid(
                "broker.subject_prefix",
                "must be one or more non-empty dot-separated tokens without `*`, `>` or spaces",
            ));
        }
        for (key, name) in [
            ("broker.nats.stream", &self.broker.nats.stream),
            ("broker.nats.dlq_stream", &self.broker.nats.dlq_stream),
        ] {
            if !is_subject_token(name) || name.contains(['.', '/', '\\']) {
                return Err(invalid(
                    key,
                    "stream names must be non-empty without `.`, `*`, `>`, slashes or spaces",
                ));
            }
        }
        if self.broker.nats.user.is_some() != self.broker.nats.password.is_some() {
            return Err(invalid(
                "broker.nats.password",
                "broker.nats.user and broker.nats.password go together",
            ));
        }
        if !(1..=5).contains(&self.broker.nats.replicas) {
            return Err(invalid(
                "broker.nats.replicas",
                "must be 1 to 5 (JetStream's limit)",
            ));
        }
        if self.broker.kind == BrokerKind::Nats
            && let Err(e) = servers::server_addrs(self.broker.nats.url.expose())
        {
            return Err(invalid("broker.nats.url", e.to_string()));
        }
        // Checked here, not only when connecting, so `check-config` and every command refuse a
        // bad list alike, before anything starts.
        if self.broker.kind == BrokerKind::Amqp
            && let Err(e) = servers::amqp_nodes(&self.broker.amqp.url)
        {
            return Err(invalid("broker.amqp.url", e.to_string()));
        }
        if self.state.enabled
            && let Some(url) = &self.state.nats_url
            && let Err(e) = servers::server_addrs(url.expose())
        {
            return Err(invalid("state.nats_url", e.to_string()));
        }
        if self.broker.nats.stream == self.broker.nats.dlq_stream {
            return Err(invalid(
                "broker.nats.dlq_stream",
                "must differ from broker.nats.stream",
            ));
        }
        for (key, name) in [
            ("broker.amqp.exchange", &self.broker.amqp.exchange),
            ("broker.amqp.queue", &self.broker.amqp.queue),
            ("broker.amqp.dlq_exchange", &self.broker.amqp.dlq_exchange),
            ("broker.amqp.dlq_queue", &self.broker.amqp.dlq_queue),
        ] {
            if name.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
            // AMQP short strings: longer names cannot be sent at all.
            if name.len() > 255 {
                return Err(invalid(key, "must be at most 255 bytes"));
            }
        }
        if self.broker.amqp.connection_name.is_empty() {
            return Err(invalid("broker.amqp.connection_name", "must not be empty"));
        }
        if self.broker.amqp.exchange == self.broker.amqp.dlq_exchange {
            return Err(invalid(
                "broker.amqp.dlq_exchange",
                "must differ from broker.amqp.exchange",
            ));
        }
        for (key, d) in [
            ("broker.publish_timeout", self.broker.publish_timeout),
            ("broker.response_budget", self.broker.response_budget),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("retention.events.interval", self.retention.events.interval),
            ("retention.dlq.interval", self.retention.dlq.interval),
            ("retention.events.max_age", self.retention.events.max_age),
            ("retention.dlq.max_age", self.retention.dlq.max_age),
            ("retention.lease_ttl", self.retention.lease_ttl),
            ("spool.drain_interval", self.spool.drain_interval),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.broker.max_in_flight == 0 {
            return Err(invalid("broker.max_in_flight", "must be greater than 0"));
        }
        if self.broker.amqp.channels == 0 {
            return Err(invalid("broker.amqp.channels", "must be greater than 0"));
        }
        if self.spool.max_bytes == 0 {
            return Err(invalid("spool.max_bytes", "must be greater than 0"));
        }
        for name in self.retention.events.overrides.keys() {
            if name.is_empty() || name == "*" || name == ">" || name.contains(char::is_whitespace) {
                return Err(invalid(
                    format!("retention.events.overrides.{name}"),
                    "must be an event name: not empty, not `*` or `>`, without spaces",
                ));
            }
        }
        for (name, age) in &self.retention.events.overrides {
            if age.is_zero() {
                return Err(invalid(
                    format!("retention.events.overrides.{name}"),
                    "must be greater than 0 (0 would purge every such event on each run)",
                ));
            }
        }
        if self.spool.segment_bytes == 0 {
            return Err(invalid("spool.segment_bytes", "must be greater than 0"));
        }
        self.validate_state()?;
        if !self.retention.dlq.overrides.is_empty() {
            return Err(invalid(
                "retention.dlq.overrides",
                "per-event overrides apply to retention.events only",
            ));
        }
        self.validate_app_retention()?;
        for (key, t) in [
            ("retention.events.method", &self.retention.events),
            ("retention.dlq.method", &self.retention.dlq),
        ] {
            if t.method == RetentionMethod::MessageTtl && self.broker.kind != BrokerKind::Nats {
                return Err(invalid(
                    key,
                    "\"message_ttl\" needs broker.kind = \"nats\" (NATS 2.11 or newer): RabbitMQ has no per-message TTL the bridge can set; use \"sweep\"",
                ));
            }
        }
        Ok(())
    }

    /// `[retention.<target>.apps."<id>"]`: ids of `[[apps]]`, positive ages, event names as
    /// for the target's overrides, and no per event overrides on the dead letters.
    fn validate_app_retention(&self) -> Result<(), ConfigError> {
        for (target, t) in [
            ("events", &self.retention.events),
            ("dlq", &self.retention.dlq),
        ] {
            for (id, app) in &t.apps {
                let key = format!("retention.{target}.apps.\"{id}\"");
                if !self.apps.iter().any(|a| &a.id == id) {
                    return Err(invalid(key, "is not the id of any [[apps]] entry"));
                }
                if app.max_age.is_some_and(|d| d.is_zero()) {
                    return Err(invalid(format!("{key}.max_age"), "must be greater than 0"));
                }
                if target == "dlq" && !app.overrides.is_empty() {
                    return Err(invalid(
                        format!("{key}.overrides"),
                        "per-event overrides apply to retention.events only",
                    ));
                }
                for (name, age) in &app.overrides {
                    if name.is_empty()
                        || name == "*"
                        || name == ">"
                        || name.contains(char::is_whitespace)
                    {
                        return Err(invalid(
                            format!("{key}.overrides.{name}"),
                            "must be an event name: not empty, not `*` or `>`, without spaces",
                        ));
                    }
                    if age.is_zero() {
                        return Err(invalid(
                            format!("{key}.overrides.{name}"),
                            "must be greater than 0 (0 would purge every such event on each run)",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks of `[state]`.
    fn validate_state(&self) -> Result<(), ConfigError> {
        let s = &self.state;
        let bucket_ok = !s.bucket.is_empty()
            && s.bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !bucket_ok {
            return Err(invalid(
                "state.bucket",
                "must be non-empty and hold only A-Z a-z 0-9 _ -",
            ));
        }
        let durable_ok = !s.durable.is_empty()
            && s.durable
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !durable_ok {
            return Err(invalid(
                "state.durable",
                "must be non-empty and hold only A-Z a-z 0-9 _ -",
            ));
        }
        if s.tombstone_ttl < Duration::from_secs(600) {
            return Err(invalid(
                "state.tombstone_ttl",
                "must be at least 10m: Pusher retries webhooks for 5 minutes",
            ));
        }
        if s.sweep_interval.is_zero() {
            return Err(invalid("state.sweep_interval", "must be greater than 0"));
        }
        Ok(())
    }
}

/// Whether the exporter can send to `url`, or why not.
pub(crate) fn usable_traces_url(url: &str) -> Result<(), &'static str> {
    match url.parse::<hyper::Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => Ok(()),
        Ok(u) if u.scheme_str() == Some("https") => Err(
            "https is not supported: send to an OpenTelemetry Collector over http (it forwards to https endpoints)",
        ),
        _ => Err("must be an http:// URL with a host"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueType;

    #[test]
    fn zero_overrides_are_rejected() {
        let err = Settings::from_toml("[retention.events.overrides]\nclient_event = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("retention.events.overrides.client_event"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Settings::from_toml("[broker.nats]\nstream = \"a.b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.nats.stream"), "{err}");
        let err = Settings::from_toml("[server]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn a_nats_server_list_is_checked_without_showing_its_password() {
        let ok = Settings::from_toml(
            "[broker.nats]\nurl = \"nats://a:1, nats://b:2,nats://c:3\"\nreplicas = 3\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let err = Settings::from_toml("[broker.nats]\nurl = \"nats://u:hunter2@a:1,nats://b:x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.nats.url"), "{err}");
        assert!(err.contains("server 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Settings::from_toml("[broker.nats]\nreplicas = 0\n").is_err());
        assert!(Settings::from_toml("[broker.nats]\nreplicas = 7\n").is_err());
        let q = Settings::from_toml("[broker.amqp]\nqueue_type = \"quorum\"\n").unwrap();
        assert_eq!(q.broker.amqp.queue_type, QueueType::Quorum);
        assert!(Settings::from_toml("[broker.amqp]\nqueue_type = \"mirrored\"\n").is_err());
    }

    #[test]
    fn an_amqp_node_list_is_checked_at_load_without_showing_its_password() {
        let amqp = |url: &str| {
            Settings::from_toml(&format!(
                "[broker]\nkind = \"amqp\"\n[broker.amqp]\nurl = \"{url}\"\n"
            ))
        };
        let s = amqp("amqp://u:pw1@h1:5672/%2f, amqp://u:pw2@h2:5672/%2f,amqps://u:pw3@h3/%2f")
            .expect("a list of three nodes");
        let shown = s.to_redacted_toml();
        assert!(
            shown.contains(
                "url = \"amqp://u:***@h1:5672/%2f, amqp://u:***@h2:5672/%2f,amqps://u:***@h3/%2f\""
            ),
            "{shown}"
        );
        for pw in ["pw1", "pw2", "pw3"] {
            assert!(
                !shown.contains(pw) && !format!("{s:?}").contains(pw),
                "{shown}"
            );
        }
        for (bad, words) in [
            ("amqp://u:hunter2@h1/%2f,nats://u:hunter2@h2:4222", "URL 2"),
            (
                "amqp://u:hunter2@h1/%2f,amqp://u:hunter2@h2/prod",
                "same vhost",
            ),
            (
                "amqp://u:hunter2@h1/%2f,amqp://u:hunter2@h1/%2f",
                "same node",
            ),
            (" , ", "names no URL"),
        ] {
            let e = amqp(bad).unwrap_err().to_string();
            assert!(e.contains("broker.amqp.url") && e.contains(words), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        // Only the broker in use is checked (as for broker.nats.url).
        assert!(Settings::from_toml("[broker.amqp]\nurl = \"nats://h\"\n").is_ok());
    }

    #[test]
    fn the_state_nats_url_is_checked_at_load_like_the_brokers() {
        let err = Settings::from_toml(
            "[state]\nenabled = true\nnats_url = \"nats://u:hunter2@a:1,nats://b:x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("state.nats_url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(Settings::from_toml("[state]\nnats_url = \"nats://a:1,nats://b:2\"\n").is_ok());
    }

    #[test]
    fn nats_user_needs_a_password() {
        let err = Settings::from_toml("[broker.nats]\nuser = \"bridge\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.nats.password"), "{err}");
        assert!(Settings::from_toml("[broker.nats]\nuser = \"u\"\npassword = \"p\"\n").is_ok());
    }

    #[test]
    fn override_names_must_be_event_names() {
        let err = Settings::from_toml("[retention.events.overrides]\n\">\" = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.events.overrides"), "{err}");
    }
}
