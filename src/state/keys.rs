//! KV key layout and the reversible escape of its tokens.
//!
//! NATS KV keys allow only `A-Z a-z 0-9 - _ = / .`, with `.` separating tokens, while channel
//! names and user ids may hold `@ , ; .` (and app ids anything). Each token is escaped so it is
//! exactly one key token: every byte outside `A-Z a-z 0-9 - _ /` becomes `=XX` (two upper-case
//! hex digits of the byte, `=` itself included: `=3D`), and the empty string becomes `=`.
//! Escaping works per character, so the escape of a prefix is a prefix of the escape.
//!
//! Layout (bucket `state.bucket`):
//! - `<app_id>.channels.<channel>`: the channel's record ([`super::merge::ChannelRecord`]).
//! - `<app_id>.members.<channel>.<user_id>`: one presence member
//!   ([`super::merge::MemberRecord`]).
//!
//! So `nats kv watch PUSHER_STATE '123456.members.presence-room=2E1.>'` follows one channel's
//! members, `'*.channels.>'` every channel of every app.

/// Token of the channel records.
pub const CHANNELS: &str = "channels";
/// Token of the member records.
pub(crate) const MEMBERS: &str = "members";

fn keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/')
}

/// Escapes one token (see the module doc).
pub fn escape(token: &str) -> String {
    if token.is_empty() {
        return "=".to_string();
    }
    let mut out = String::with_capacity(token.len() + 8);
    for &b in token.as_bytes() {
        if keeps(b) {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Reverses [`escape`]; `None` for text [`escape`] cannot produce.
pub(crate) fn unescape(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'=' {
            let hex = token.get(i + 1..i + 3)?;
            if hex.bytes().any(|h| h.is_ascii_lowercase()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if keeps(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Key of a channel's record.
pub(crate) fn channel_key(app_id: &str, channel: &str) -> String {
    format!("{}.{CHANNELS}.{}", escape(app_id), escape(channel))
}

/// Key of one member of a presence channel.
pub(crate) fn member_key(app_id: &str, channel: &str, user_id: &str) -> String {
    format!(
        "{}.{MEMBERS}.{}.{}",
        escape(app_id),
        escape(channel),
        escape(user_id)
    )
}

/// Filter (relative to the bucket) of every channel record of an app.
pub(crate) fn channels_filter(app_id: &str) -> String {
    format!("{}.{CHANNELS}.>", escape(app_id))
}

/// Filter of every member record of one channel.
pub(crate) fn members_filter(app_id: &str, channel: &str) -> String {
    format!("{}.{MEMBERS}.{}.>", escape(app_id), escape(channel))
}

/// What a key names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// `<app>.channels.<channel>`.
    Channel {
        /// App id.
        app_id: String,
        /// Channel name.
        channel: String,
    },
    /// `<app>.members.<channel>.<user>`.
    Member {
        /// App id.
        app_id: String,
        /// Channel name.
        channel: String,
        /// User id.
        user_id: String,
    },
}

/// Parses a key of the layout (`None` for keys that are not the bridge's).
pub fn parse(key: &str) -> Option<Parsed> {
    let mut tokens = key.split('.');
    let app_id = unescape(tokens.next()?)?;
    let kind = tokens.next()?;
    let channel = unescape(tokens.next()?)?;
    match (kind, tokens.next(), tokens.next()) {
        (CHANNELS, None, _) => Some(Parsed::Channel { app_id, channel }),
        (MEMBERS, Some(user), None) => Some(Parsed::Member {
            app_id,
            channel,
            user_id: unescape(user)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_kv_token(t: &str) -> bool {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'/'))
    }

    #[test]
    fn escape_round_trips_and_stays_one_token() {
        for s in [
            "presence-room-1",
            "private-a.b",
            "a@b,c;d.e=f",
            "=3D",
            "",
            "#server-to-user-7",
            "ünïcødé ✓",
            "x/y",
            "%2E",
        ] {
            let e = escape(s);
            assert!(valid_kv_token(&e), "{s:?} -> {e:?}");
            assert_eq!(unescape(&e).as_deref(), Some(s), "{e}");
        }
        assert_eq!(escape("private-a.b"), "private-a=2Eb");
        assert_eq!(escape("a=b"), "a=3Db");
        assert_eq!(escape("u@x,y;z"), "u=40x=2Cy=3Bz");
    }

    #[test]
    fn escape_of_a_prefix_is_a_prefix() {
        let name = "presence-a.b@c";
        for i in 0..name.len() {
            assert!(escape(name).starts_with(&escape(&name[..i])) || i == 0);
        }
    }

    #[test]
    fn unescape_refuses_what_escape_never_writes() {
        for bad in ["a.b", "=", "=4", "=zz", "=2e", "a b", "=FF"] {
            if bad == "=" {
                continue;
            }
            assert_eq!(unescape(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_parse_back() {
        let k = member_key("123", "presence-a.b", "u.1@x");
        assert_eq!(k, "123.members.presence-a=2Eb.u=2E1=40x");
        assert_eq!(
            parse(&k),
            Some(Parsed::Member {
                app_id: "123".into(),
                channel: "presence-a.b".into(),
                user_id: "u.1@x".into()
            })
        );
        assert_eq!(
            parse(&channel_key("1", "c;d")),
            Some(Parsed::Channel {
                app_id: "1".into(),
                channel: "c;d".into()
            })
        );
        assert_eq!(parse("1.other.x"), None);
        assert_eq!(parse("1.channels.x.y"), None);
    }
}
