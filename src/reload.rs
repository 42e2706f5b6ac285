//! Reload on SIGHUP: the binary re-reads the config file, the environment and every `*_file`
//! ([`Settings::load`]) and hands the result here. `[[apps]]` (added, removed, rotated keys and
//! secrets) and `log.level` take effect at once, without dropping a connection or a webhook in
//! flight; any other key that changed is named in one warning as needing a restart. A
//! configuration that does not load or validate leaves the running one in place and says why.
//! Counted as Prometheus counts its own reloads.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bridge::Bridge;
use crate::config::{ConfigError, Settings};
use crate::shutdown::Shutdown;

/// What the binary loaded on a SIGHUP.
pub type Loaded = Result<Settings, ConfigError>;

/// Applies each loaded configuration as it arrives, until `shutdown` (or until the sender is
/// gone: no more reloads).
pub(crate) async fn run(
    bridge: Arc<Bridge>,
    mut loads: mpsc::Receiver<Loaded>,
    mut shutdown: Shutdown,
) {
    // What is in force: the start's settings, with the apps and level of each reload applied.
    let mut running = bridge.settings().clone();
    loop {
        let loaded = tokio::select! {
            () = shutdown.wait() => return,
            loaded = loads.recv() => loaded,
        };
        let Some(loaded) = loaded else { return };
        apply(&bridge, &mut running, loaded);
    }
}

/// Applies one reload to `bridge`; `running` is what is in force, updated with what changed.
pub(crate) fn apply(bridge: &Bridge, running: &mut Settings, loaded: Loaded) {
    let metrics = bridge.metrics();
    let new = match loaded {
        Ok(new) => new,
        Err(e) => {
            metrics.config_reloaded(false);
            tracing::error!(error = %e, "the configuration did not reload: the running one stays in force");
            return;
        }
    };
    let restart = needs_restart(running, &new);
    bridge.app_keys().replace(&new.apps);
    metrics.init_app_series(&new.apps);
    running.apps = new.apps.clone();
    match crate::logging::reload(&new) {
        Ok(crate::logging::Level::Applied) => running.log.level = new.log.level.clone(),
        Ok(crate::logging::Level::Overridden) => {
            tracing::info!("RUST_LOG is set: it replaces log.level, as at start-up");
        }
        Err(e) => tracing::warn!(error = %e, level = %new.log.level, "log.level did not change"),
    }
    if !restart.is_empty() {
        tracing::warn!(
            keys = %restart.join(", "),
            "these keys changed, and take effect only at a restart"
        );
    }
    metrics.config_reloaded(true);
    tracing::info!(
        apps = running.apps.len(),
        level = %running.log.level,
        "configuration reloaded"
    );
}

/// The keys, other than `apps` and `log.level`, whose values differ between `running` and
/// `new` (dotted paths, as the interface names them).
pub(crate) fn needs_restart(running: &Settings, new: &Settings) -> Vec<String> {
    let comparable = |s: &Settings| {
        let mut s = s.clone();
        s.apps.clear();
        s.log.level.clear();
        toml::Value::try_from(&s).unwrap_or(toml::Value::Boolean(false))
    };
    let mut keys = Vec::new();
    differing("", &comparable(running), &comparable(new), &mut keys);
    // Secrets serialise as `***`: compare them as they are.
    let (a, b) = (&running.broker, &new.broker);
    let secrets = [
        (
            "broker.nats.url",
            a.nats.url.expose() != b.nats.url.expose(),
        ),
        (
            "broker.nats.password",
            a.nats.password.as_ref().map(|p| p.expose())
                != b.nats.password.as_ref().map(|p| p.expose()),
        ),
        (
            "broker.nats.token",
            a.nats.token.as_ref().map(|p| p.expose()) != b.nats.token.as_ref().map(|p| p.expose()),
        ),
        (
            "broker.amqp.url",
            a.amqp.url.expose() != b.amqp.url.expose(),
        ),
        (
            "state.nats_url",
            running.state.nats_url.as_ref().map(|u| u.expose())
                != new.state.nats_url.as_ref().map(|u| u.expose()),
        ),
    ];
    for (key, changed) in secrets {
        if changed && !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    keys.sort();
    keys
}

/// Collects the dotted paths of the leaves that differ between `a` and `b` under `path`.
fn differing(path: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let names: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for name in names {
                let key = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                match (x.get(name), y.get(name)) {
                    (Some(p), Some(q)) => differing(&key, p, q, out),
                    _ => out.push(key),
                }
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_other_than_apps_and_the_level_need_a_restart() {
        let a = Settings::from_toml(
            "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n[log]\nlevel = \"info\"\n",
        )
        .unwrap();
        let b = Settings::from_toml(
            "[[apps]]\nid = \"2\"\nkey = \"k2\"\nsecret = \"t\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        assert!(needs_restart(&a, &b).is_empty());
        let c = Settings::from_toml(
            "[server]\nmax_body_bytes = 5\n[broker.nats]\nurl = \"nats://u:other@h:4222\"\n[spool]\ndir = \"elsewhere\"\n",
        )
        .unwrap();
        assert_eq!(
            needs_restart(&a, &c),
            ["broker.nats.url", "server.max_body_bytes", "spool.dir"]
        );
    }
}
