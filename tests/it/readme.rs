//! The README's claims that code can check: its configuration reference is a valid config that
//! names every key with its default, its metrics table lists exactly the exported families, its
//! command table lists exactly the binary's commands and flags, and its Rust examples compile.

use std::collections::BTreeSet;
use std::process::Command;

use pusher_bridge::config::Settings;

// The README's Rust examples, compiled here; `rust_examples_are_the_compiled_ones` checks that the
// README holds them verbatim.
#[expect(dead_code, reason = "the snippet's functions are compiled, not called")]
#[path = "../snippets/nats_consumer.rs"]
mod nats_consumer;

#[expect(dead_code, reason = "the snippet's functions are compiled, not called")]
#[path = "../snippets/amqp_consumer.rs"]
mod amqp_consumer;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The text from `heading` to the next `## ` heading.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no `{heading}` section"))
        + 1;
    let rest = &text[start..];
    let end = rest[heading.len()..]
        .find("\n## ")
        .map_or(rest.len(), |i| i + heading.len() + 1);
    &rest[..end]
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

/// Every value the reference shows is the default (apps aside: they have none).
#[test]
fn configuration_reference_shows_the_defaults() {
    let block = toml_block_after(&readme(), "## Configuration");
    let mut s = Settings::from_toml(&block).expect("README config parses");
    assert_eq!(s.apps.len(), 1, "the reference shows one [[apps]] entry");
    s.apps.clear();
    assert_eq!(
        s.to_redacted_toml(),
        Settings::default().to_redacted_toml(),
        "a value in the README's configuration reference differs from the built-in default"
    );
}

/// Walks `want`, pushing every key path that `have` lacks.
fn missing_keys(want: &toml::Table, have: &toml::Table, path: &str, out: &mut Vec<String>) {
    for (key, value) in want {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match (value, have.get(key)) {
            (toml::Value::Table(w), Some(toml::Value::Table(h))) if !w.is_empty() => {
                missing_keys(w, h, &full, out)
            }
            (_, Some(_)) => {}
            (_, None) => out.push(full),
        }
    }
}

/// Every key of the settings appears in the reference: as a key, or (keys without a default)
/// as a commented-out example.
#[test]
fn configuration_reference_names_every_key() {
    let block = toml_block_after(&readme(), "## Configuration");
    let have: toml::Table = toml::from_str(&block).expect("README block is TOML");
    let want: toml::Table =
        toml::from_str(&Settings::default().to_redacted_toml()).expect("defaults as TOML");
    let mut missing = Vec::new();
    missing_keys(&want, &have, "", &mut missing);
    // A key that exists only to be refused when set (the reference says "no overrides").
    missing.retain(|k| k != "retention.dlq.overrides");
    assert!(
        missing.is_empty(),
        "keys missing from the README: {missing:?}"
    );
    // Optional keys have no default and are not serialised: the reference shows them commented.
    for key in [
        "max_webhook_age",
        "user",
        "password",
        "token",
        "creds_file",
        "tls_ca_file",
    ] {
        assert!(
            block.contains(&format!("# {key} = ")),
            "optional key {key} missing from the README"
        );
    }
}

#[test]
fn shipped_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pusher-bridge.toml");
    let s = Settings::load(Some(std::path::Path::new(path))).expect("shipped config");
    assert_eq!(s.apps.len(), 1);
    // The quick start's log is the default one: async-nats's per-attempt lines left out.
    assert_eq!(s.log.level, Settings::default().log.level);
}

#[test]
fn metrics_table_lists_every_exported_family() {
    let text = readme();
    let section = section(&text, "## Metrics");
    for name in pusher_bridge::metrics::EXPORTED_NAMES {
        assert!(
            section.contains(&format!("`{name}`")),
            "{name} not in README"
        );
    }
    // And nothing else: every family in the table is exported.
    for row in section
        .lines()
        .filter(|l| l.starts_with("| `pusher_bridge_"))
    {
        let name = row[3..].split('`').next().unwrap_or_default();
        assert!(
            pusher_bridge::metrics::EXPORTED_NAMES.contains(&name),
            "the README's metrics table lists {name}, which is not exported"
        );
    }
}

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pusher-bridge"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run pusher-bridge --help");
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The subcommand names of a `--help` output (`help` aside).
fn subcommands(help: &str) -> Vec<String> {
    let Some(start) = help.find("Commands:\n") else {
        return Vec::new();
    };
    help[start + "Commands:\n".len()..]
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags of a `--help` output's option lines (`--help` and `--version` aside).
fn flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| *w != "--help" && *w != "--version")
        .map(str::to_string)
        .collect()
}

/// The README's command table: (command path, flags) per row.
fn readme_commands() -> Vec<(String, BTreeSet<String>)> {
    let text = readme();
    section(&text, "## Command line")
        .lines()
        .filter_map(|l| l.strip_prefix("| `pusher-bridge "))
        .map(|row| {
            let usage = row.split('`').next().unwrap_or_default();
            let path: Vec<&str> = usage
                .split_whitespace()
                .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                .filter(|w| !w.starts_with('-'))
                .collect();
            let flags = usage
                .split(|c: char| c.is_whitespace() || "[]|".contains(c))
                .filter(|w| w.starts_with("--"))
                .map(str::to_string)
                .collect();
            (path.join(" "), flags)
        })
        .collect()
}

#[test]
fn command_table_matches_the_binary() {
    let rows = readme_commands();
    let mut binary = BTreeSet::new();
    for name in subcommands(&help(&[])) {
        let nested = subcommands(&help(&[name.as_str()]));
        if nested.is_empty() {
            binary.insert(name);
        } else {
            binary.extend(nested.into_iter().map(|n| format!("{name} {n}")));
        }
    }
    let documented: BTreeSet<String> = rows.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        documented, binary,
        "README command table vs `pusher-bridge --help`"
    );
    for path in &binary {
        let args: Vec<&str> = path.split(' ').collect();
        let real = flags(&help(&args));
        let shown: BTreeSet<String> = rows
            .iter()
            .filter(|(p, _)| p == path)
            .flat_map(|(_, f)| f.iter().cloned())
            .collect();
        assert_eq!(shown, real, "flags of `pusher-bridge {path}`");
    }
}

#[test]
fn rust_examples_are_the_compiled_ones() {
    let text = readme();
    for (file, code) in [
        (
            "tests/snippets/nats_consumer.rs",
            include_str!("../snippets/nats_consumer.rs"),
        ),
        (
            "tests/snippets/amqp_consumer.rs",
            include_str!("../snippets/amqp_consumer.rs"),
        ),
    ] {
        assert!(
            text.contains(&format!("```rust\n{code}```\n")),
            "the README does not hold {file} verbatim in a ```rust block"
        );
    }
}

/// The README's per app retention example is a valid config (with its apps added) and means what
/// the README says it means.
#[test]
fn per_app_retention_example_means_what_the_readme_says() {
    use pusher_bridge::sweeper::Target;
    use pusher_bridge::sweeper::policy::{Retention, RuleKind};
    use std::time::Duration;
    let text = readme();
    let block = toml_block_after(section(&text, "## Retention"), "**Per app.**");
    let apps = "[[apps]]\nid = \"123456\"\nkey = \"a\"\nsecret = \"s\"\n\
                [[apps]]\nid = \"654321\"\nkey = \"b\"\nsecret = \"s\"\n\
                [[apps]]\nid = \"777777\"\nkey = \"c\"\nsecret = \"s\"\n";
    let s = Settings::from_toml(&format!("{apps}{block}")).expect("the example parses");
    let events = Retention::for_target(&s, Target::Events);
    let (hour, day) = (Duration::from_secs(3600), Duration::from_secs(86_400));
    let rule = |app: &str, event: &str| events.rule_of(Some(app), Some(event));
    assert_eq!(
        rule("123456", "client_event"),
        Some((hour, RuleKind::AppEvent))
    );
    assert_eq!(
        rule("123456", "member_added"),
        Some((day * 30, RuleKind::App))
    );
    assert_eq!(rule("654321", "client_event"), None);
    assert_eq!(rule("777777", "client_event"), Some((day, RuleKind::Event)));
    assert_eq!(
        rule("777777", "member_added"),
        Some((day * 7, RuleKind::Default))
    );
    let dlq = Retention::for_target(&s, Target::Dlq);
    assert_eq!(
        dlq.rule_of(Some("123456"), None),
        Some((day * 90, RuleKind::App))
    );
    assert_eq!(
        dlq.rule_of(Some("654321"), None),
        Some((day * 30, RuleKind::Default))
    );
    // Without its apps the example is refused, naming the key.
    let err = Settings::from_toml(&block).unwrap_err().to_string();
    assert!(err.contains("retention.events.apps.\"123456\""), "{err}");
}
