//! Where each event goes: `<subject_prefix>.<app_id>.<event name>.<channel>`, the same string
//! as NATS subject and AMQP routing key, and the deterministic message id.
//!
//! Every token is escaped so it stays exactly one token: `%` becomes `%25` and `.` becomes `%2E`;
//! nothing else changes (interface page). The message id hashes the app id and the raw body once
//! per webhook and appends the event's position, so a redelivered webhook yields the same ids.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

/// Escapes one subject token: `%` → `%25`, `.` → `%2E`.
pub(crate) fn escape_token(token: &str) -> Cow<'_, str> {
    if !token.contains(['%', '.']) {
        return Cow::Borrowed(token);
    }
    let mut out = String::with_capacity(token.len() + 8);
    for c in token.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Reverses [`escape_token`] (for tools that show subjects to people).
pub(crate) fn unescape_token(token: &str) -> String {
    token.replace("%2E", ".").replace("%25", "%")
}

/// `<prefix>.<app_id>.<event>.<channel>` with each token escaped.
pub fn subject(prefix: &str, app_id: &str, event: &str, channel: &str) -> String {
    let (a, e, c) = (
        escape_token(app_id),
        escape_token(event),
        escape_token(channel),
    );
    let mut s = String::with_capacity(prefix.len() + a.len() + e.len() + c.len() + 3);
    s.push_str(prefix);
    for t in [&a, &e, &c] {
        s.push('.');
        s.push_str(t);
    }
    s
}

/// Subject prefix of dead letters on NATS: `<prefix>_dlq`, so the DLQ stream's subjects never
/// overlap the events stream's `<prefix>.>`.
pub fn dlq_prefix(prefix: &str) -> String {
    format!("{prefix}_dlq")
}

/// Subject / routing key of a dead letter: `<prefix>_dlq.<app_id>.<reason>`.
pub fn dlq_subject(prefix: &str, app_id: &str, reason: &str) -> String {
    format!(
        "{}.{}.{}",
        dlq_prefix(prefix),
        escape_token(app_id),
        escape_token(reason)
    )
}

/// The per-webhook part of message ids: 32 hex characters of SHA-256 over app id and body.
pub fn webhook_digest(app_id: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(app_id.as_bytes());
    h.update([0u8]);
    h.update(body);
    let digest = h.finalize();
    hex::encode(&digest[..16])
}

/// Message id of the event at `index` of the webhook with `digest`: `<digest>-<index>`.
pub fn message_id(digest: &str, index: usize) -> String {
    let mut id = String::with_capacity(digest.len() + 1 + 20);
    id.push_str(digest);
    id.push('-');
    push_decimal(&mut id, index);
    id
}

/// Appends `n` in decimal (what `format!` would write, without its formatting machinery: this
/// runs once per event).
fn push_decimal(out: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[start..] {
        out.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_from_the_interface() {
        assert_eq!(
            subject("pusher", "123456", "member_added", "presence-room-1"),
            "pusher.123456.member_added.presence-room-1"
        );
        assert_eq!(
            subject("pusher", "123456", "channel_occupied", "private-a.b"),
            "pusher.123456.channel_occupied.private-a%2Eb"
        );
    }

    #[test]
    fn every_allowed_channel_character_but_dot_is_unchanged() {
        let allowed = "ABCXYZabcxyz0123456789_-=@,;#";
        assert_eq!(escape_token(allowed), allowed);
        assert!(matches!(escape_token(allowed), Cow::Borrowed(_)));
        assert_eq!(escape_token("a.b.c"), "a%2Eb%2Ec");
        assert_eq!(escape_token("100%"), "100%25");
        assert_eq!(escape_token("%2E"), "%252E");
        assert_eq!(escape_token("."), "%2E");
    }

    #[test]
    fn escaping_is_one_token_and_reversible() {
        for raw in ["a.b", "%2E", "%.%", "x%25.y", "private-encrypted-cache-a.b"] {
            let e = escape_token(raw);
            assert!(!e.contains('.'));
            assert_eq!(unescape_token(&e), raw);
        }
        let s = subject("pusher", "1.2", "x.y", "c.d");
        assert_eq!(s.split('.').count(), 4);
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let d1 = webhook_digest("1", b"body");
        assert_eq!(d1, webhook_digest("1", b"body"));
        assert_ne!(d1, webhook_digest("2", b"body"));
        assert_ne!(d1, webhook_digest("1", b"body2"));
        assert_eq!(d1.len(), 32);
        assert_ne!(message_id(&d1, 0), message_id(&d1, 1));
        for i in [0, 7, 10, 99, 12_345, usize::MAX] {
            assert_eq!(message_id(&d1, i), format!("{d1}-{i}"));
        }
    }

    #[test]
    fn dlq_subjects_do_not_overlap_events() {
        let s = dlq_subject("pusher", "1", "malformed");
        assert_eq!(s, "pusher_dlq.1.malformed");
        assert!(!s.starts_with("pusher."));
    }
}
