//! The `pusher-bridge state channels` / `state members` commands: read the state bucket
//! directly (no running bridge needed), as the query API would answer.

use super::keys::Parsed;
use super::{StateError, StateStore, connect, kv_nats_settings};
use crate::broker::BrokerError;
use crate::config::Settings;

/// The app a command asks about: `--app`, else the first configured app.
pub fn app_or_first(settings: &Settings, app: Option<&str>) -> Option<String> {
    app.map(str::to_string)
        .or_else(|| settings.apps.first().map(|a| a.id.clone()))
}

async fn open(settings: &Settings) -> Result<StateStore, StateError> {
    let nats = kv_nats_settings(settings);
    let client = connect(&nats).await?;
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        StateStore::existing(client, &settings.state.bucket),
    )
    .await
    .map_err(|_| {
        StateError::from(BrokerError::connect_msg(format!(
            "no answer from {}",
            nats.url.redacted()
        )))
    })?
}

/// One line per occupied channel whose name starts with `prefix`:
/// `<channel> subscription_count=<n|?> [user_count=<n>]`, sorted by name.
pub async fn channel_lines(
    settings: &Settings,
    app_id: &str,
    prefix: &str,
) -> Result<Vec<String>, StateError> {
    let store = open(settings).await?;
    let mut lines = Vec::new();
    for stored in store.channels(app_id).await? {
        let Parsed::Channel { channel, .. } = stored.key else {
            continue;
        };
        if !stored.record.occupied || !channel.starts_with(prefix) {
            continue;
        }
        let count = stored
            .record
            .current_subscription_count()
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        let mut line = format!("{channel} subscription_count={count}");
        if channel.starts_with("presence-") {
            let users = store.present_members(app_id, &channel).await?;
            line.push_str(&format!(" user_count={}", users.len()));
        }
        lines.push(line);
    }
    lines.sort();
    Ok(lines)
}

/// The present members of `channel`, sorted.
pub async fn member_lines(
    settings: &Settings,
    app_id: &str,
    channel: &str,
) -> Result<Vec<String>, StateError> {
    open(settings).await?.present_members(app_id, channel).await
}
