//! Realistic signed webhooks: every event type Pusher sends, 80 % one event per webhook and 20 %
//! batches of 2 to 5, every body unique.
//!
//! Uniqueness without fields Pusher never sends: webhook number `seq` gets
//! `time_ms = start_ms + seq / CHANNELS` and its first event's channel number `seq % CHANNELS`,
//! so no two bodies of a run share both. Distinct bodies mean distinct message ids, so JetStream's
//! duplicate window drops nothing and "every event stored" can be checked by counting.

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Channels per channel family (also the time_ms step, see the module doc).
const CHANNELS: u64 = 4096;

/// A small deterministic PRNG (xorshift64*), one per connection: no dependency, no locking.
pub struct Rng(u64);

impl Rng {
    /// Seeded; a zero seed is replaced (xorshift has no zero state).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    /// Next pseudo-random number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One signed webhook, ready to post.
pub struct Signed {
    /// The raw body.
    pub body: Bytes,
    /// Lowercase hex HMAC-SHA256 of the body.
    pub signature: String,
    /// Events in the body.
    pub events: u32,
}

/// Builds and signs webhooks for one app.
#[derive(Clone)]
pub struct Generator {
    mac: Hmac<Sha256>,
    start_ms: u64,
}

/// The event types and their share (per mille) of the mix: every documented type, plus
/// `member_updated` for an unknown name passing through.
const MIX: [(&str, u64); 8] = [
    ("client_event", 300),
    ("member_added", 140),
    ("member_removed", 140),
    ("channel_occupied", 100),
    ("channel_vacated", 100),
    ("subscription_count", 120),
    ("cache_miss", 80),
    ("member_updated", 20),
];

impl Generator {
    /// For the app whose secret is `secret`; `start_ms` is the run's base time.
    pub fn new(secret: &str, start_ms: u64) -> Self {
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes keys of any size");
        Self { mac, start_ms }
    }

    /// Webhook number `seq` (unique per run), its other choices from `rng`.
    pub fn webhook(&self, seq: u64, rng: &mut Rng) -> Signed {
        let events = if rng.below(100) < 80 {
            1
        } else {
            2 + rng.below(4) as u32
        };
        let mut body = String::with_capacity(96 + 160 * events as usize);
        body.push_str("{\"time_ms\":");
        push_u64(&mut body, self.start_ms + seq / CHANNELS);
        body.push_str(",\"events\":[");
        for i in 0..events {
            if i > 0 {
                body.push(',');
            }
            let channel = if i == 0 {
                seq % CHANNELS
            } else {
                rng.below(CHANNELS)
            };
            push_event(&mut body, pick(rng), channel, rng);
        }
        body.push_str("]}");
        let mut mac = self.mac.clone();
        mac.update(body.as_bytes());
        Signed {
            signature: hex::encode(mac.finalize().into_bytes()),
            body: Bytes::from(body),
            events,
        }
    }
}

fn pick(rng: &mut Rng) -> &'static str {
    let mut r = rng.below(1000);
    for (name, share) in MIX {
        if r < share {
            return name;
        }
        r -= share;
    }
    MIX[0].0
}

fn push_u64(s: &mut String, n: u64) {
    use std::fmt::Write;
    let _ = write!(s, "{n}");
}

/// One event object of type `name` on channel number `ch` (its family fits the type; one in
/// sixteen channel names has a `.`, which the subject must escape).
fn push_event(s: &mut String, name: &str, ch: u64, rng: &mut Rng) {
    let dotted = ch % 16 == 7;
    let family = match name {
        "member_added" | "member_removed" | "member_updated" => "presence-room-",
        "client_event" if ch.is_multiple_of(3) => "presence-room-",
        "client_event" => "private-chat-",
        "cache_miss" => "cache-prices-",
        _ if ch.is_multiple_of(2) => "public-news-",
        _ => "private-encrypted-cache-feed-",
    };
    s.push_str("{\"name\":\"");
    s.push_str(name);
    s.push_str("\",\"channel\":\"");
    s.push_str(family);
    push_u64(s, ch);
    if dotted {
        s.push_str(".eu");
    }
    s.push('"');
    let user = rng.below(100_000);
    match name {
        "member_added" | "member_removed" => {
            s.push_str(",\"user_id\":\"user-");
            push_u64(s, user);
            s.push('"');
        }
        "member_updated" => {
            s.push_str(",\"user_id\":\"user-");
            push_u64(s, user);
            s.push_str("\",\"user_info\":{\"name\":\"User ");
            push_u64(s, user);
            s.push_str("\",\"online\":true,\"score\":");
            push_u64(s, rng.below(1000));
            s.push_str(".5}");
        }
        "client_event" => {
            s.push_str(",\"event\":\"client-typing\",\"data\":\"{\\\"text\\\":\\\"message ");
            push_u64(s, rng.next() % 1_000_000_007);
            s.push_str("\\\",\\\"typing\\\":true}\",\"socket_id\":\"");
            push_u64(s, 100_000 + rng.below(900_000));
            s.push('.');
            push_u64(s, 100_000 + rng.below(900_000));
            s.push('"');
            if family == "presence-room-" {
                s.push_str(",\"user_id\":\"user-");
                push_u64(s, user);
                s.push('"');
            }
        }
        "cache_miss" => s.push_str(",\"data\":\"{}\""),
        "subscription_count" => {
            s.push_str(",\"subscription_count\":");
            push_u64(s, 1 + rng.below(5000));
        }
        _ => {}
    }
    s.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_unique_valid_and_mixed() {
        let g = Generator::new("s", 1_700_000_000_000);
        let mut rng = Rng::new(7);
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        let (mut singles, mut total) = (0, 0);
        for seq in 0..20_000 {
            let w = g.webhook(seq, &mut rng);
            assert!(seen.insert(w.body.clone()));
            let v: serde_json::Value = serde_json::from_slice(&w.body).unwrap();
            let events = v["events"].as_array().unwrap();
            assert_eq!(events.len() as u32, w.events);
            assert!((1..=5).contains(&events.len()));
            for e in events {
                names.insert(e["name"].as_str().unwrap().to_string());
            }
            singles += usize::from(w.events == 1);
            total += 1;
        }
        assert_eq!(names.len(), MIX.len());
        let share = singles as f64 / total as f64;
        assert!((0.77..0.83).contains(&share), "{share}");
    }
}
