//! The README's claims that code can check: its configuration reference is a valid config with
//! the interface's defaults, and its metrics table lists exactly the exported families.

use pusher_bridge::config::Settings;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The first ```toml block after `heading`.
fn toml_block_after(text: &str, heading: &str) -> String {
    let start = text.find(heading).expect("heading");
    let rest = &text[start..];
    let open = rest.find("```toml\n").expect("toml block") + "```toml\n".len();
    let close = rest[open..].find("```").expect("block end");
    rest[open..open + close].to_string()
}

#[test]
fn configuration_reference_is_a_valid_config() {
    let block = toml_block_after(&readme(), "## Configuration");
    let s = Settings::from_toml(&block).expect("README config parses");
    let d = Settings::default();
    assert_eq!(s.server.listen, d.server.listen);
    assert_eq!(s.server.max_body_bytes, d.server.max_body_bytes);
    assert_eq!(s.broker.publish_timeout, d.broker.publish_timeout);
    assert_eq!(
        s.broker.nats.duplicate_window,
        d.broker.nats.duplicate_window
    );
    assert_eq!(s.retention.lease_ttl, d.retention.lease_ttl);
    assert_eq!(s.spool.segment_bytes, d.spool.segment_bytes);
}

#[test]
fn shipped_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pusher-bridge.toml");
    let s = Settings::load(Some(std::path::Path::new(path))).expect("shipped config");
    assert_eq!(s.apps.len(), 1);
}

#[test]
fn metrics_table_lists_every_exported_family() {
    let text = readme();
    let section = &text[text.find("## Metrics").expect("metrics section")..];
    for name in pusher_bridge::metrics::EXPORTED_NAMES {
        assert!(
            section.contains(&format!("`{name}`")),
            "{name} not in README"
        );
    }
}
