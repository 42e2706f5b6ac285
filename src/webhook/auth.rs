//! Which app sent a webhook and whether it is authentic: the key lookup, the HMAC-SHA256 over
//! the raw body (compared in constant time), and the `max_webhook_age` refusal.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::Webhook;
use crate::config::AppSettings;
use crate::message::{now_ms, parse_time_ms};

type HmacSha256 = Hmac<Sha256>;

/// One configured app key, with its HMAC state keyed once at start-up.
pub struct AppKey {
    /// The app id the key belongs to (several keys may share one id while rotating).
    pub app_id: Arc<str>,
    /// The key (token), for logs and metrics.
    pub key: String,
    /// HMAC-SHA256 already keyed with the secret; cloned per request.
    pub(super) mac: HmacSha256,
    /// `,"app_id":"<id>","time_ms":` as JSON text, built once.
    pub(crate) body_suffix_head: String,
}

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKey")
            .field("app_id", &self.app_id)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl AppKey {
    /// Whether `signature` (hex, as sent in `X-Pusher-Signature`) is HMAC-SHA256 of `body` under
    /// this key's secret. Never panics; compares in constant time.
    pub(crate) fn verify(&self, body: &[u8], signature: &[u8]) -> bool {
        let mut expected = [0u8; 32];
        if signature.len() != 64 || hex::decode_to_slice(signature, &mut expected).is_err() {
            return false;
        }
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    }

    /// Checks `X-Pusher-Signature` (surrounding whitespace ignored) over the raw body.
    pub fn check(&self, signature: Option<&[u8]>, body: &[u8]) -> Result<(), AuthError> {
        let signature = signature.ok_or(AuthError::SignatureMissing)?;
        if self.verify(body, signature.trim_ascii()) {
            Ok(())
        } else {
            Err(AuthError::SignatureMismatch)
        }
    }

    /// The hex signature Pusher would send for `body` (used by `send-test` and tests).
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The app keys in force, swapped whole when a reload (SIGHUP) changes `[[apps]]`: each
/// request takes the registry of its moment ([`Apps::current`]), so a webhook in flight is
/// checked against one consistent set of keys.
#[derive(Debug)]
pub struct Apps(RwLock<Arc<AppRegistry>>);

impl Apps {
    /// The keys of `apps`.
    pub fn new(apps: &[AppSettings]) -> Self {
        Self(RwLock::new(Arc::new(AppRegistry::new(apps))))
    }

    /// The registry in force now.
    pub fn current(&self) -> Arc<AppRegistry> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts the keys of `apps` in force (added, removed, rotated keys and secrets).
    pub(crate) fn replace(&self, apps: &[AppSettings]) {
        let fresh = Arc::new(AppRegistry::new(apps));
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }
}

/// All configured keys, looked up by `X-Pusher-Key`.
#[derive(Debug, Default)]
pub struct AppRegistry {
    by_key: HashMap<String, Arc<AppKey>>,
}

impl AppRegistry {
    /// Builds the registry from `[[apps]]`.
    pub fn new(apps: &[AppSettings]) -> Self {
        let by_key = apps
            .iter()
            .map(|a| {
                let app_id: Arc<str> = Arc::from(a.id.as_str());
                let mac = <HmacSha256 as KeyInit>::new_from_slice(a.secret.expose().as_bytes())
                    // HMAC accepts keys of any length; this cannot fail.
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any size"));
                let body_suffix_head = format!(
                    ",\"app_id\":{},\"time_ms\":",
                    serde_json::Value::String(a.id.clone())
                );
                let key = AppKey {
                    app_id,
                    key: a.key.clone(),
                    mac,
                    body_suffix_head,
                };
                (a.key.clone(), Arc::new(key))
            })
            .collect();
        Self { by_key }
    }

    /// The key entry for `X-Pusher-Key`, if configured.
    pub fn get(&self, key: &str) -> Option<&Arc<AppKey>> {
        self.by_key.get(key)
    }

    /// Whether `app_id` has a key here.
    pub(crate) fn has_app(&self, app_id: &str) -> bool {
        self.by_key.values().any(|k| &*k.app_id == app_id)
    }

    /// The app of `X-Pusher-Key` (surrounding whitespace ignored), before its signature is
    /// checked: a refused webhook of a known key is counted under its app id.
    pub(crate) fn app_of(&self, key: Option<&[u8]>) -> Result<&Arc<AppKey>, AuthError> {
        let key = key.ok_or(AuthError::KeyMissing)?;
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| self.get(k.trim()))
            .ok_or(AuthError::UnknownKey)
    }

    /// Whether no app is configured (every webhook would be refused).
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Why a webhook is not authentic (answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `X-Pusher-Key` header.
    #[error("X-Pusher-Key missing")]
    KeyMissing,
    /// `X-Pusher-Key` is not a configured key.
    #[error("unknown X-Pusher-Key")]
    UnknownKey,
    /// No `X-Pusher-Signature` header.
    #[error("X-Pusher-Signature missing")]
    SignatureMissing,
    /// The signature is not the HMAC of the body under the key's secret.
    #[error("X-Pusher-Signature does not match")]
    SignatureMismatch,
    /// `time_ms` is older than `server.max_webhook_age` (a replayed capture).
    #[error("webhook time_ms is too old")]
    TooOld,
}

/// Refuses a webhook whose `time_ms` is older than `max_age` (`server.max_webhook_age`).
pub(crate) fn check_age(hook: &Webhook<'_>, max_age: Option<Duration>) -> Result<(), AuthError> {
    let Some(max_age) = max_age else {
        return Ok(());
    };
    // Not a number or negative: as old as can be.
    let sent = parse_time_ms(hook.time_ms).unwrap_or(0);
    if now_ms().saturating_sub(sent) > max_age.as_millis() as u64 {
        return Err(AuthError::TooOld);
    }
    Ok(())
}
