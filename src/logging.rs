//! The log output: `tracing` lines on stdout, with every configured secret masked.
//!
//! The bridge's own log lines never carry a secret ([`crate::config::Secret`] prints `***`), but
//! the broker clients log what they are given: at `debug` async-nats prints its connect options
//! (`password: Some("...")`) and at `trace` lapin prints the AMQP frames, the SASL response with
//! the password included. Filtering their targets would also take away the lines needed to debug
//! a connection, so instead every formatted line goes through `Redactor`, which replaces each
//! secret of the settings, in each form a log line can hold it (as typed, percent-decoded,
//! escaped for `Debug` or JSON, as a list of byte values), with `***` before it is written.

use std::io::{self, Write};
use std::sync::{Arc, OnceLock, RwLock};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, Settings, url_auth};

/// The mask written in place of a secret.
const MASK: &str = "***";

/// Puts a new `log.level` in force (typed once per log format: erased here).
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload may change in the running subscriber: the level filter and the secrets the
/// mask knows.
struct Control {
    /// Puts a new `log.level` in force.
    set_level: SetLevel,
    /// The running mask.
    redactor: Redactor,
}

/// The running subscriber's [`Control`] (set once by [`init`]).
static CONTROL: OnceLock<Control> = OnceLock::new();

/// Starts the global `tracing` subscriber: `RUST_LOG` if set (else `log.level`), `log.format`,
/// secrets masked.
pub fn init(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL));
    // Colours only on a terminal: escape codes would litter `docker logs` and log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let redactor = Redactor::new(&secrets_of(settings));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(redactor.clone());
    let set_level: SetLevel = match settings.log.format {
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| set(&handle, level))
        }
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| set(&handle, level))
        }
    };
    let _ = CONTROL.set(Control {
        set_level,
        redactor,
    });
}

/// Puts `level` in force through a reload handle.
fn set<S>(
    handle: &tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
    level: &str,
) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())
}

/// Applies a reloaded configuration to the running log output: its secrets join the mask
/// (the old ones stay masked: a rotated secret may still be in a line) and `log.level` takes
/// effect, unless `RUST_LOG` is set, which replaces `log.level` as at start-up. Does nothing
/// before [`init`] (tests, tools).
pub(crate) fn reload(settings: &Settings) -> Result<Level, String> {
    let Some(control) = CONTROL.get() else {
        return Ok(Level::Applied);
    };
    control.redactor.add(&secrets_of(settings));
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(Level::Overridden);
    }
    (control.set_level)(&settings.log.level).map(|()| Level::Applied)
}

/// What a reload did with `log.level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// In force.
    Applied,
    /// `RUST_LOG` replaces it.
    Overridden,
}

/// Every secret in `settings`: app secrets, the NATS password and token, and the password or
/// token in each broker URL.
pub(crate) fn secrets_of(settings: &Settings) -> Vec<String> {
    let nats = &settings.broker.nats;
    let mut secrets: Vec<String> = settings
        .apps
        .iter()
        .map(|a| a.secret.expose().to_string())
        .chain(nats.password.iter().map(|p| p.expose().to_string()))
        .chain(nats.token.iter().map(|t| t.expose().to_string()))
        .collect();
    let urls = [
        Some(&nats.url),
        Some(&settings.broker.amqp.url),
        settings.state.nats_url.as_ref(),
        settings.tracing.otlp_endpoint.as_ref(),
    ];
    for url in urls.into_iter().flatten() {
        secrets.extend(url_secrets(url.expose()));
    }
    secrets
}

/// The password (or lone token) of each `[scheme://]userinfo@host` in a comma-separated list,
/// read as [`crate::config::redact_url`] reads it ([`url_auth::Reading::Mask`]).
fn url_secrets(url: &str) -> Vec<String> {
    url.split(',')
        .filter_map(|part| {
            let (_, userinfo, _) = url_auth::split_user_info(part, url_auth::Reading::Mask)?;
            Some(match userinfo.split_once(':') {
                // A password equal to its user name (a demo's `pusher:pusher`) protects
                // nothing the line does not show already; masking it would mask the name in
                // every line that holds it (the webhook path, the start-up line).
                Some((user, password)) if user == password => String::new(),
                Some((_, password)) => password.to_string(),
                None => userinfo.to_string(),
            })
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// The ways `secret` can appear in a log line.
fn forms(secret: &str) -> Vec<String> {
    let mut out = Vec::new();
    for s in [secret.to_string(), url_auth::percent_decode(secret)] {
        let debug = format!("{s:?}");
        out.push(debug[1..debug.len() - 1].to_string());
        let json = serde_json::Value::String(s.clone()).to_string();
        out.push(json[1..json.len() - 1].to_string());
        // `Debug` of a byte slice or vector: `[112, 97, 115, 115]`.
        let list: Vec<String> = s.bytes().map(|b| b.to_string()).collect();
        out.push(list.join(", "));
        out.push(s);
    }
    out
}

/// A [`MakeWriter`] for stdout that masks the secrets it was built with (and those a reload
/// added) in every line.
#[derive(Clone)]
pub(crate) struct Redactor {
    /// Every form of every secret, longest first (so a longer form is masked whole).
    forms: Arc<RwLock<Arc<[String]>>>,
}

/// RabbitMQ's default credentials: public, and masking them would also mask the user name
/// `guest` in every line that names it.
const PUBLIC_DEFAULTS: &[&str] = &["guest"];

/// Every form of every secret in `secrets`, longest first, plus the forms in `known`.
fn all_forms<'a>(secrets: impl Iterator<Item = &'a String>, known: &[String]) -> Vec<String> {
    let mut forms: Vec<String> = secrets
        .filter(|s| !s.is_empty() && !PUBLIC_DEFAULTS.contains(&s.as_str()))
        .flat_map(|s| forms(s))
        .filter(|f| !f.is_empty())
        .chain(known.iter().cloned())
        .collect();
    // Longest first; equal ones side by side, so a reload that names the same secrets again
    // adds nothing.
    forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    forms.dedup();
    forms
}

impl Redactor {
    /// Masks `secrets` (empty ones and public defaults ignored).
    pub fn new(secrets: &[String]) -> Self {
        Self {
            forms: Arc::new(RwLock::new(all_forms(secrets.iter(), &[]).into())),
        }
    }

    /// Masks `secrets` too.
    fn add(&self, secrets: &[String]) {
        let mut forms = self.forms.write().unwrap_or_else(|e| e.into_inner());
        *forms = all_forms(secrets.iter(), &forms).into();
    }

    /// `line` with every secret masked.
    pub(crate) fn redact(&self, line: &str) -> String {
        let forms = self.forms.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = line.to_string();
        for form in forms.iter() {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), MASK);
            }
        }
        out
    }
}

/// The writer of one log line.
pub(crate) struct RedactingWriter<'a> {
    redactor: &'a Redactor,
}

impl Write for RedactingWriter<'_> {
    /// The formatter hands over each event whole, so masking per call sees whole secrets.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = self.redactor.redact(&String::from_utf8_lossy(buf));
        io::stdout().lock().write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

impl<'a> MakeWriter<'a> for Redactor {
    type Writer = RedactingWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter { redactor: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppSettings, Secret, SecretUrl};

    #[test]
    fn every_form_of_every_secret_is_masked() {
        let mut s = Settings {
            apps: vec![AppSettings {
                id: "1".into(),
                key: "k".into(),
                secret: Secret::new("app-s3cret"),
                secret_file: None,
            }],
            ..Settings::default()
        };
        s.broker.nats.url = SecretUrl::new("nats://u:n%40tspw@h:1,tok3n@h2:2");
        s.broker.amqp.url = SecretUrl::new("amqp://guest:am\"qp@h/%2f");
        s.broker.nats.password = Some(Secret::new("pl4in"));
        let r = Redactor::new(&secrets_of(&s));
        for line in [
            "app-s3cret",
            r#"password: Some("n@tspw")"#,
            "nats://u:n%40tspw@h",
            "tok3n",
            r#"am\"qp"#,
            "[97, 109, 34, 113, 112]",
            "pl4in",
        ] {
            let out = r.redact(&format!("x {line} y"));
            assert!(out.contains(MASK), "{out}");
            for secret in [
                "s3cret", "n@tspw", "n%40tspw", "tok3n", "qp", "pl4in", "113, 112",
            ] {
                assert!(!out.contains(secret), "{out}");
            }
        }
        assert_eq!(r.redact("nothing here"), "nothing here");
    }

    #[test]
    fn a_reload_adds_new_secrets_and_keeps_the_old_without_growing() {
        let r = Redactor::new(&["old-secret".to_string()]);
        let count = || r.forms.read().unwrap().len();
        r.add(&["new-secret".to_string()]);
        let after_one = count();
        r.add(&["new-secret".to_string()]);
        r.add(&["old-secret".to_string(), "new-secret".to_string()]);
        assert_eq!(count(), after_one, "the same secrets again add nothing");
        assert_eq!(r.redact("old-secret new-secret"), "*** ***");
    }

    #[test]
    fn public_defaults_and_passwords_equal_to_their_user_stay_readable() {
        let mut s = Settings::default();
        s.broker.amqp.url = SecretUrl::new("amqp://guest:guest@h/%2f");
        s.broker.nats.url = SecretUrl::new("nats://pusher:pusher@h:4222");
        let r = Redactor::new(&secrets_of(&s));
        let line = "user=guest path=/pusher/webhooks";
        assert_eq!(r.redact(line), line);
    }
}
