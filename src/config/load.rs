//! Where the settings come from and how they are read: the file ([`resolve_path`]), defaults <
//! TOML < `PUSHER_BRIDGE_*` environment ([`Settings::load`]), and figment's errors reworded to
//! name the key and the source but never the value.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};

use super::{ConfigError, Settings};

/// Prefix of the environment variables that override file keys.
pub(crate) const ENV_PREFIX: &str = "PUSHER_BRIDGE_";
/// Environment variable naming the config file (not itself a config key).
pub(crate) const CONFIG_ENV: &str = "PUSHER_BRIDGE_CONFIG";
/// The config file used when neither `--config` nor `$PUSHER_BRIDGE_CONFIG` names one.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "config/pusher-bridge.toml";

/// Which file the settings come from: `--config`, else `$PUSHER_BRIDGE_CONFIG`, else
/// `config/pusher-bridge.toml` when it exists, else none (built-in defaults).
pub fn resolve_path(cli: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = cli {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_PATH);
    default.exists().then_some(default)
}

/// A figment error as [`ConfigError::Load`], naming the key, the source (file or environment
/// variable) and, for syntax errors, the line and column, but never the value: the value may
/// be a secret (a malformed `PUSHER_BRIDGE_APPS`, a TOML line `secret = "...` missing its quote).
fn load_error(error: figment::Error) -> ConfigError {
    let described: Vec<String> = error.into_iter().map(|e| describe(&e)).collect();
    ConfigError::Load(described.join("; "))
}

fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let what = match &e.kind {
        Kind::Message(m) => without_source_lines(m),
        Kind::InvalidType(actual, expected) => {
            format!(
                "invalid type: found {}, expected {expected}",
                kind_of(actual)
            )
        }
        Kind::InvalidValue(actual, expected) => {
            format!(
                "invalid value: found {}, expected {expected}",
                kind_of(actual)
            )
        }
        Kind::Unsupported(actual) => format!("unsupported type {}", kind_of(actual)),
        // Lengths, field names, integer ranges, and the value of an enum key (`broker.kind`,
        // `log.format`: a closed set of words, never a secret): shown as they help.
        other => other.to_string(),
    };
    let mut out = what;
    if !e.path.is_empty() {
        out.push_str(&format!(": `{}`", e.path.join(".")));
    }
    match &e.metadata {
        // figment names the provider `PUSHER_BRIDGE_` environment variable(s): name the one.
        Some(m) if m.name.contains("environment") => {
            let var: Vec<String> = e
                .path
                .iter()
                .take_while(|p| !p.chars().all(|c| c.is_ascii_digit()))
                .map(|p| p.to_ascii_uppercase())
                .collect();
            out.push_str(&format!(
                " in environment variable {ENV_PREFIX}{}",
                var.join("__")
            ));
            if let Some(hint) = env_toml_hint(e) {
                out.push_str(": ");
                out.push_str(&hint);
            }
        }
        Some(m) => {
            out.push_str(&format!(" in {}", m.name));
            if let Some(source) = &m.source {
                out.push_str(&format!(" {source}"));
            }
        }
        None => {}
    }
    out
}

/// What to write instead, for an environment value that should have been a list or a table:
/// figment reads environment values as TOML and takes one that does not parse (JSON's
/// `"id":"1"`, say) as a plain string, so the error alone ("found a string") does not say why.
/// Names the format with an example, never the value (`PUSHER_BRIDGE_APPS` holds secrets).
fn env_toml_hint(e: &figment::Error) -> Option<String> {
    use figment::error::{Actual, Kind};
    let Kind::InvalidType(Actual::Str(_), expected) = &e.kind else {
        return None;
    };
    if !["sequence", "map", "struct"]
        .iter()
        .any(|w| expected.contains(w))
    {
        return None;
    }
    let example = if e.path.first().is_some_and(|p| p == "apps") {
        r#"PUSHER_BRIDGE_APPS='[{id="123456",key="app-key",secret="app-secret"}]'"#
    } else {
        r#"a list as ["a","b"], a table as {key="value"}"#
    };
    Some(format!(
        "the value is read as TOML, not JSON (inline tables: key = value, not \"key\": value), \
         e.g. {example}"
    ))
}

/// A TOML syntax error without the excerpt of the file it quotes (`3 | secret = "...`,
/// `  |   ^`): the position (`line 3, column 10`) and the reason stay.
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let t = line
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|') && !line.trim().is_empty()
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// What kind of value was found, without the value.
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit => "unit",
        Actual::Option => "an option",
        Actual::Seq => "a sequence",
        Actual::Map => "a map",
        _ => "another type",
    }
}

impl Settings {
    /// Loads defaults < `file` < environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                // `PUSHER_BRIDGE_CONFIG` names the file and is no key; the name arrives in the
                // environment's case, so compare without it.
                .filter(|k| !k.as_str().eq_ignore_ascii_case("config")),
        );
        let mut settings: Settings = figment.extract().map_err(load_error)?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses a TOML string (no environment): for tests and embedded configs.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut settings: Settings = Figment::from(Toml::string(text))
            .extract()
            .map_err(load_error)?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlistn = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn load_errors_name_the_key_but_never_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"hunter2-secret\nx = 1\n",
        )
        .unwrap();
        let e = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        std::fs::write(
            &path,
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = 12345678\n",
        )
        .unwrap();
        let e = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(!e.contains("12345678"), "{e}");
        assert!(e.contains("apps") && e.contains("secret"), "{e}");
        let e = Settings::from_toml("[server]\nmax_body_bytes = \"hunter2\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("hunter2") && e.contains("server.max_body_bytes"),
            "{e}"
        );
    }
}
