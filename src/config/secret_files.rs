//! Secrets from files: each secret key has a `_file` twin naming a file that holds the value,
//! as Kubernetes mounts a Secret (one file per key) and Docker its secrets. The files are read
//! when the configuration is loaded (at start-up and on every reload), one trailing newline
//! trimmed (`echo` and most editors add one). Setting a key and its twin is an error naming
//! both: which one wins would be a guess.

use std::path::Path;

use super::url_auth::{Reading, authority_start, split_user_info};
use super::{ConfigError, Secret, SecretUrl, Settings, invalid};

/// The value of the secret file `path` (for the key `key`), one trailing newline trimmed.
fn read(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Secret::new(value))
}

/// Refuses a key set beside its `_file` twin.
fn not_both(key: &str, inline: bool, file: bool) -> Result<(), ConfigError> {
    if inline && file {
        return Err(invalid(
            format!("{key}_file"),
            format!("set {key} or {key}_file, not both"),
        ));
    }
    Ok(())
}

impl Settings {
    /// Reads every `*_file` secret into its key: `apps[].secret_file`,
    /// `broker.nats.password_file`, `broker.nats.token_file`, and `broker.amqp.password_file`
    /// (put into each URL of `broker.amqp.url` as its password).
    pub(crate) fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        for (i, app) in self.apps.iter_mut().enumerate() {
            let key = format!("apps[{i}].secret");
            if let Some(path) = &app.secret_file {
                not_both(&key, !app.secret.expose().is_empty(), true)?;
                app.secret = read(&format!("{key}_file"), path)?;
            }
        }
        let nats = &mut self.broker.nats;
        if let Some(path) = &nats.password_file {
            not_both("broker.nats.password", nats.password.is_some(), true)?;
            nats.password = Some(read("broker.nats.password_file", path)?);
        }
        if let Some(path) = &nats.token_file {
            not_both("broker.nats.token", nats.token.is_some(), true)?;
            nats.token = Some(read("broker.nats.token_file", path)?);
        }
        let amqp = &mut self.broker.amqp;
        if let Some(path) = &amqp.password_file {
            let password = read("broker.amqp.password_file", path)?;
            amqp.url = with_password(&amqp.url, password.expose())?;
        }
        Ok(())
    }
}

/// `urls` (comma-separated) with `password` as the password of each: every URL must name its
/// user (`amqp://user@host/vhost`), and none may carry a password already.
fn with_password(urls: &SecretUrl, password: &str) -> Result<SecretUrl, ConfigError> {
    const KEY: &str = "broker.amqp.password_file";
    let encoded =
        percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let mut out = Vec::new();
    // Blank entries are skipped, as the list's parser skips them (`servers::amqp_nodes`).
    for url in urls
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        if authority_start(url).is_none() {
            return Err(invalid(KEY, "broker.amqp.url has no scheme (amqp://)"));
        }
        let Some((scheme, user, rest)) = split_user_info(url, Reading::Client) else {
            return Err(invalid(
                KEY,
                "broker.amqp.url must name the user the password is for (amqp://user@host/vhost)",
            ));
        };
        if user.contains(':') {
            return Err(invalid(
                KEY,
                "set the password in broker.amqp.url or broker.amqp.password_file, not both",
            ));
        }
        out.push(format!("{scheme}{user}:{encoded}{rest}"));
    }
    Ok(SecretUrl::new(out.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile_path::Path {
        tempfile_path::write(text)
    }

    /// A file that removes itself.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> Path {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "pb-secret-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::write(&p, text).expect("secret file");
            Path(p)
        }
    }

    fn toml_path(p: &tempfile_path::Path) -> String {
        p.0.display().to_string()
    }

    #[test]
    fn each_twin_is_read_with_one_newline_trimmed() {
        let secret = file("app-secret\n");
        let pass = file("nats pass\r\n");
        let token = file("tok\n\n");
        let amqp = file("p@ss:/w\n");
        let s = Settings::from_toml(&format!(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret_file = \"{}\"\n\
             [broker.nats]\nuser = \"u\"\npassword_file = \"{}\"\ntoken_file = \"{}\"\n\
             [broker.amqp]\nurl = \"amqp://guest@h1:5672/%2f, amqps://guest@h2/v\"\npassword_file = \"{}\"\n",
            toml_path(&secret),
            toml_path(&pass),
            toml_path(&token),
            toml_path(&amqp)
        ))
        .expect("loads");
        assert_eq!(s.apps[0].secret.expose(), "app-secret");
        assert_eq!(
            s.broker.nats.password.as_ref().map(Secret::expose),
            Some("nats pass")
        );
        // Only one newline is trimmed.
        assert_eq!(
            s.broker.nats.token.as_ref().map(Secret::expose),
            Some("tok\n")
        );
        assert_eq!(
            s.broker.amqp.url.expose(),
            "amqp://guest:p%40ss%3A%2Fw@h1:5672/%2f,amqps://guest:p%40ss%3A%2Fw@h2/v"
        );
        assert!(!format!("{s:?}").contains("p%40ss"));
    }

    #[test]
    fn a_key_and_its_twin_together_are_refused_naming_both() {
        let f = file("x\n");
        let cases = [
            format!(
                "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nsecret_file = \"{}\"\n",
                toml_path(&f)
            ),
            format!(
                "[broker.nats]\nuser = \"u\"\npassword = \"p\"\npassword_file = \"{}\"\n",
                toml_path(&f)
            ),
            format!(
                "[broker.nats]\ntoken = \"t\"\ntoken_file = \"{}\"\n",
                toml_path(&f)
            ),
        ];
        for (toml, key) in cases.iter().zip([
            "apps[0].secret",
            "broker.nats.password",
            "broker.nats.token",
        ]) {
            let e = Settings::from_toml(toml).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{key}_file")) && e.contains(&format!("set {key} or")),
                "{e}"
            );
        }
        let e = Settings::from_toml(&format!(
            "[broker.amqp]\nurl = \"amqp://u:inline@h/%2f\"\npassword_file = \"{}\"\n",
            toml_path(&f)
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("broker.amqp.password_file"), "{e}");
        assert!(!e.contains("inline"), "a password in an error: {e}");
    }

    #[test]
    fn every_url_must_name_the_user_the_password_is_for() {
        // An empty user (`amqp://@h`) names none: the AMQP client would log in as `guest` with
        // the file's password.
        let f = file("pw\n");
        for url in ["amqp://h/%2f", "amqp://@h/%2f", "amqp://u@h1, amqp://@h2"] {
            let e = Settings::from_toml(&format!(
                "[broker.amqp]\nurl = \"{url}\"\npassword_file = \"{}\"\n",
                toml_path(&f)
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("must name the user"), "{url}: {e}");
        }
        // A `://` that follows no scheme is no scheme.
        for url in ["h/%2f", "u:a://b@h/%2f"] {
            let e = Settings::from_toml(&format!(
                "[broker.amqp]\nurl = \"{url}\"\npassword_file = \"{}\"\n",
                toml_path(&f)
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("has no scheme"), "{url}: {e}");
        }
    }

    #[test]
    fn a_missing_or_empty_file_names_its_key_and_path() {
        let e = Settings::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret_file = \"/nonexistent/pb-secret\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("apps[0].secret_file") && e.contains("/nonexistent/pb-secret"),
            "{e}"
        );
        let empty = file("\n");
        let e = Settings::from_toml(&format!(
            "[broker.nats]\ntoken_file = \"{}\"\n",
            toml_path(&empty)
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("broker.nats.token_file") && e.contains("empty"),
            "{e}"
        );
        let e = Settings::from_toml(&format!(
            "[broker.amqp]\nurl = \"amqp://h/%2f\"\npassword_file = \"{}\"\n",
            toml_path(&empty)
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("broker.amqp.password_file"), "{e}");
    }
}
