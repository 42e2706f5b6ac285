//! The secret types: [`Secret`] (an app secret, a password) and [`SecretUrl`] (a URL that may
//! carry a password), whose `Debug` and `Serialize` never show the secret.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::url_auth::redact_url;

/// A secret string (an app secret, a password). Shown as `***` everywhere but [`Secret::expose`].
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value; used by tests and by code that builds settings by hand.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The real value, for the one place that needs it (signing, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A broker URL that may carry a password (`amqp://user:pass@host`). Shown with the password
/// replaced by `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The URL with its password, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`, for logs and `check-config`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    #[test]
    fn secrets_never_show() {
        let s = Settings::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"hunter2\"\n[broker.amqp]\nurl = \"amqp://u:pw123@h:5672/%2f\"\n[broker.nats]\nuser = \"u\"\npassword = \"natspw\"\n",
        )
        .unwrap();
        for text in [format!("{s:?}"), s.to_redacted_toml()] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("pw123"), "{text}");
            assert!(!text.contains("natspw"), "{text}");
        }
        assert!(s.to_redacted_toml().contains("amqp://u:***@h:5672/%2f"));
        assert_eq!(s.apps[0].secret.expose(), "hunter2");
    }
}
