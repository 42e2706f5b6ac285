//! Credentials written into `broker.nats.url` (`nats://user:password@host`,
//! `nats://token@host`). async-nats parses such URLs but never sends their user info, so a
//! server with authorization would refuse the connection; the bridge reads the credentials
//! itself and passes them as connect options.

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
        let rest = &url.trim()[url.trim().find("://")? + 3..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        let userinfo = &authority[..authority.rfind('@')?];
        if userinfo.is_empty() {
            return None;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
