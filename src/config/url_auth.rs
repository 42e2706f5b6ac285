//! User info in URLs (`scheme://user:password@host`, `scheme://token@host`), read once: the
//! NATS credentials, the password put into `broker.amqp.url`, the URLs shown redacted
//! ([`redact_url`]) and the log mask all split a server URL with [`split_user_info`], so their
//! readings cannot drift.
//!
//! async-nats parses credentials written into `broker.nats.url` but never sends them, so a
//! server with authorization would refuse the connection; the bridge reads them itself
//! ([`url_credentials`]) and passes them as connect options.

/// Where the user info of a URL ends: the clients and the log mask need different answers.
pub(crate) enum Reading {
    /// As the clients read it: a scheme is required, the authority ends at the first `/`, `?`
    /// or `#`, and the last `@` inside it ends the user info. Empty user info (`amqp://@h`) is
    /// none: a URL parser reads the same empty user name from it as from `amqp://h`.
    Client,
    /// As the masks read it (redacted URLs, the log mask): the scheme is optional
    /// (`user:pass@host`), the last `@` of the whole URL ends the user info, white space opening
    /// it (a list's `a@h, b@h`) left out. Greedy on purpose: a password holding an unescaped
    /// `/`, `?` or `@` is hidden whole; hiding too much is safe, hiding too little leaks a secret.
    Mask,
}

/// Where the authority of `url` starts: after `scheme://`, where a `://` counts only after a
/// scheme (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`; white space before it
/// allowed): in `u:a://b@h` or `u:p@h/?r=http://x` it is part of the password or the path.
pub(crate) fn authority_start(url: &str) -> Option<usize> {
    let at = url.find("://")?;
    let head = url[..at].trim_start();
    let scheme = head.starts_with(|c: char| c.is_ascii_alphabetic())
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    scheme.then_some(at + 3)
}

/// One server URL (one entry of a comma-separated list) split around its user info: what
/// comes before it, the user info, and the rest from its `@` on. `None` without user info (and,
/// read as a client, without a scheme or with empty user info).
pub(crate) fn split_user_info(url: &str, reading: Reading) -> Option<(&str, &str, &str)> {
    let greedy = matches!(reading, Reading::Mask);
    let start = authority_start(url).or(greedy.then_some(0))?;
    let ends: &[char] = if greedy { &[] } else { &['/', '?', '#'] };
    let rest = &url[start..];
    let at = start + rest[..rest.find(ends).unwrap_or(rest.len())].rfind('@')?;
    let info = &url[start..at];
    let info = if greedy { info.trim_start() } else { info };
    (greedy || !info.is_empty()).then(|| (&url[..at - info.len()], info, &url[at..]))
}

/// User info found in a NATS URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@` (user info without a colon).
    Token(String),
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPassword(user, _) => write!(f, "UserPassword({user:?}, \"***\")"),
            Self::Token(_) => f.write_str("Token(\"***\")"),
        }
    }
}

/// The user info of the first server in `urls` (comma-separated) that has one, percent-decoded.
pub(crate) fn url_credentials(urls: &str) -> Option<UrlCredentials> {
    urls.split(',').find_map(|url| {
        let (_, userinfo, _) = split_user_info(url, Reading::Client)?;
        Some(match userinfo.split_once(':') {
            Some((user, password)) => {
                UrlCredentials::UserPassword(percent_decode(user), percent_decode(password))
            }
            None => UrlCredentials::Token(percent_decode(userinfo)),
        })
    })
}

/// Decodes `%XX` escapes (a password may hold `@`, `:` or `/` only in escaped form); invalid
/// escapes are kept as they are. Also what the log mask decodes secrets with
/// (`crate::logging`), since a URL password reaches the clients decoded.
pub(crate) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Replaces the password of every `[scheme://]user:password@host` in `url` (comma-separated
/// server lists included) with `***`, `token@host` with `***@host`; read greedily
/// ([`Reading::Mask`]), so a password holding `/`, `?` or `@` is hidden whole.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| match split_user_info(part, Reading::Mask) {
            Some((before, userinfo, rest)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{before}{user}:***{rest}"),
                // A lone token (`nats://token@host`) is itself the secret.
                None => format!("{before}***{rest}"),
            },
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_readings_split_one_url_around_its_user_info() {
        use Reading::{Client, Mask};
        // (url, as a client reads it, as the mask reads it)
        let cases = [
            ("nats://u:p@h:1", Some(("nats://", "u:p", "@h:1"))),
            ("nats://tok@h:1", Some(("nats://", "tok", "@h:1"))),
            ("nats://h:1", None),
            ("amqp://u:p@ss@h", Some(("amqp://", "u:p@ss", "@h"))),
            ("", None),
        ];
        for (url, both) in cases {
            assert_eq!(split_user_info(url, Client), both, "{url}");
            assert_eq!(split_user_info(url, Mask), both, "{url}");
        }
        let cases = [
            // An unescaped `/` or `?` ends the authority for a client, not for the mask.
            (
                "amqp://u:pa/ss@h/%2f",
                None,
                Some(("amqp://", "u:pa/ss", "@h/%2f")),
            ),
            ("amqp://u:p?w@h", None, Some(("amqp://", "u:p?w", "@h"))),
            ("amqp://u:p#w@h", None, Some(("amqp://", "u:p#w", "@h"))),
            // An `@` after the authority: the mask hides more.
            ("nats://h:1/x@y", None, Some(("nats://", "h:1/x", "@y"))),
            // Empty user info: none for a client, nothing to hide for the mask.
            ("nats://@h:1", None, Some(("nats://", "", "@h:1"))),
            (
                "nats://u:p@h:1/x@y",
                Some(("nats://", "u:p", "@h:1/x@y")),
                Some(("nats://", "u:p@h:1/x", "@y")),
            ),
            // No scheme: only the mask reads one.
            ("u:p@h:1", None, Some(("", "u:p", "@h:1"))),
            ("tok@h", None, Some(("", "tok", "@h"))),
            // Entries of a list with spaces: the mask leaves the space out of the user info.
            (" tok@h:2", None, Some((" ", "tok", "@h:2"))),
            (
                " nats://u:p@h",
                Some((" nats://", "u:p", "@h")),
                Some((" nats://", "u:p", "@h")),
            ),
            (
                "nats:// u:p@h",
                Some(("nats://", " u:p", "@h")),
                Some(("nats:// ", "u:p", "@h")),
            ),
            (" ", None, None),
        ];
        for (url, client, mask) in cases {
            assert_eq!(split_user_info(url, Client), client, "{url}");
            assert_eq!(split_user_info(url, Mask), mask, "{url}");
        }
    }

    #[test]
    fn the_parts_are_the_whole_url() {
        for list in [
            "nats://a:1, tok@h:2,, v:p@w/d@h3 ,amqp://u:p?@h/%2f",
            "nats://@h:1",
        ] {
            for url in list.split(',') {
                for reading in [Reading::Client, Reading::Mask] {
                    if let Some((before, user_info, rest)) = split_user_info(url, reading) {
                        assert_eq!(format!("{before}{user_info}{rest}"), url);
                        assert!(rest.starts_with('@'), "{url}");
                    }
                }
            }
        }
    }

    #[test]
    fn user_password_token_and_none() {
        assert_eq!(
            url_credentials("nats://bridge:s3cret@127.0.0.1:4222"),
            Some(UrlCredentials::UserPassword(
                "bridge".into(),
                "s3cret".into()
            ))
        );
        assert_eq!(
            url_credentials("nats://t0ken@nats:4222"),
            Some(UrlCredentials::Token("t0ken".into()))
        );
        assert_eq!(url_credentials("nats://127.0.0.1:4222"), None);
        assert_eq!(url_credentials("nats://@h:1"), None);
        assert_eq!(url_credentials("127.0.0.1:4222"), None);
    }

    #[test]
    fn first_server_with_user_info_and_escapes() {
        assert_eq!(
            url_credentials("nats://a:1, nats://u:p%40ss%3Aw%2Fd@b:2/x@y"),
            Some(UrlCredentials::UserPassword("u".into(), "p@ss:w/d".into()))
        );
        assert_eq!(
            url_credentials("tls://tok%zz@h:1"),
            Some(UrlCredentials::Token("tok%zz".into()))
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = url_credentials("nats://u:hunter2@h:1").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = url_credentials("nats://hunter2@h:1").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn redact_url_handles_tokens_and_lists() {
        assert_eq!(redact_url("nats://tok@h:1"), "nats://***@h:1");
        assert_eq!(
            redact_url("nats://a:b@h:1,nats://h2:2"),
            "nats://a:***@h:1,nats://h2:2"
        );
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
        assert_eq!(redact_url("u:p4ss@h:1"), "u:***@h:1");
        assert_eq!(redact_url("tok3n@h:1, v:pw@h2"), "***@h:1, v:***@h2");
        assert_eq!(redact_url("amqp://u:pa/ss@h/%2f"), "amqp://u:***@h/%2f");
        assert_eq!(redact_url("amqp://u:p@ss@h"), "amqp://u:***@h");
        // A `://` that follows no scheme is part of the password or the path.
        assert_eq!(redact_url("u:p@h/?r=http://x"), "u:***@h/?r=http://x");
        assert_eq!(redact_url("u:a://b@h"), "u:***@h");
        assert_eq!(redact_url(" nats+tls://u:p@h"), " nats+tls://u:***@h");
    }
}
