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

// ---------------------------------------------------------------------------------------------
// The commands a user types (issue 22): each is run here, or checked against what it names.

/// The indented code lines of `text` (Markdown's indented code blocks), without the indent.
fn code_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("    "))
        .filter(|l| !l.starts_with(' ') && !l.is_empty())
        .collect()
}

/// A command line's words as `sh` reads them (single quotes only, as the README writes them),
/// up to a `#` comment.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut started) = (false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                started = true;
            }
            '#' if !quoted && !started => break,
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(word);
    }
    out
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on `port`.
fn listening_addresses(port: u16) -> BTreeSet<String> {
    let port = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = cols.get(1)?.split_once(':')?;
            (p == port && cols.get(3) == Some(&"0A")).then(|| addr.to_string())
        })
        .collect()
}

/// The quick start's `nats-server` command, run as written (plus a free port and a store of
/// its own): it listens on 127.0.0.1 only, as its comment says, with JetStream on. The checks
/// around it hold too: `ss` finds a server on 4222, Debian's unit is named as the README names
/// it and runs without JetStream, the Docker variant publishes on 127.0.0.1 only, and the
/// words quoted from `send-test` for a NATS without JetStream are the ones it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_nats_commands_do_what_their_comments_say() {
    let text = readme();
    let quick = section(&text, "## Quick start");
    let line = code_lines(quick)
        .into_iter()
        .find(|l| l.starts_with("nats-server "))
        .expect("the quick start starts nats-server");
    assert!(
        line.contains("# 127.0.0.1:4222 only, JetStream on"),
        "{line}"
    );
    let args = words(line);
    assert!(!args.contains(&"-p".to_string()), "the default port, 4222");
    let port = crate::common::free_port();
    let store = tempfile::tempdir().unwrap();
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let _server = Killed(
        Command::new(bin)
            .args(&args[1..])
            .args(["-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs"),
    );
    let mut addresses = BTreeSet::new();
    for _ in 0..100 {
        addresses = listening_addresses(port);
        if !addresses.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let loopback: BTreeSet<String> = ["0100007F".to_string()].into();
    let loopback_be: BTreeSet<String> = ["7F000001".to_string()].into();
    assert!(
        addresses == loopback || addresses == loopback_be,
        "`{line}` listens on {addresses:?}, not 127.0.0.1 only"
    );
    // JetStream answers its API (the account info request; a server without it: no responders).
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    let info = client
        .request("$JS.API.INFO", "".into())
        .await
        .expect("JetStream is on");
    let info = String::from_utf8_lossy(&info.payload);
    assert!(
        info.contains("account_info_response") && !info.contains("\"error\""),
        "{info}"
    );

    assert!(
        code_lines(quick).contains(
            &"ss -ltnp | grep 4222                 # does a server listen on 4222 already?"
        ),
        "the quick start checks for a server on 4222"
    );
    if crate::common::nats_url() == "nats://127.0.0.1:4222" {
        let ss = Command::new("sh")
            .args(["-c", "ss -ltnp | grep 4222"])
            .output();
        if let Some(out) = ss.ok().filter(|o| o.status.success()) {
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(out.contains("127.0.0.1:4222"), "{out}");
        }
    }
    assert!(quick.contains("`systemctl is-active nats-server`"));
    assert!(quick.contains("`sudo systemctl disable --now nats-server`"));
    let unit = "/lib/systemd/system/nats-server.service";
    if let Ok(unit) = std::fs::read_to_string(unit) {
        // Debian's service: its config file, and no JetStream in it.
        let conf = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "-c").nth(1))
            .map(str::to_string)
            .expect("the unit names its config");
        let conf = std::fs::read_to_string(conf).unwrap_or_default();
        assert!(!conf.contains("jetstream"), "{conf}");
        assert!(!unit.contains("-js"), "{unit}");
    }
    assert!(quick.contains("`docker run -p 127.0.0.1:4222:4222 nats:2.15.1 -js`"));

    // What send-test says against a NATS without JetStream, quoted as it prints it.
    let quoted = quick
        .split("`why: JetStream off")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .map(|rest| format!("why: JetStream off{rest}").replace('\n', " "))
        .expect("the quick start quotes send-test's JetStream-off line");
    let no_js =
        crate::common::NatsServer::start_without_jetstream(crate::common::free_port()).await;
    let mut s = crate::common::nats_settings();
    s.broker.nats.url = pusher_bridge::config::SecretUrl::new(no_js.url());
    let mut bridge = crate::common::process::BridgeProcess::start(
        &["serve"],
        crate::common::process::settings_env(&s),
    );
    bridge.wait_healthy().await;
    let out = crate::common::process::run(&["send-test"], &bridge.env).await;
    assert_eq!(out.code, 3, "{out:?}");
    let said = out
        .stdout
        .lines()
        .find(|l| l.starts_with("why: "))
        .unwrap_or_default()
        .replace(&no_js.url(), "nats://127.0.0.1:4222");
    assert!(
        said.starts_with(&quoted),
        "README: {quoted}\nsend-test: {said}"
    );
    bridge.terminate().await;
}

/// The consumer examples' install commands are the ones `.ci/run` runs, into the directories
/// `.gitignore` leaves out, and every command runs an example from the venv they make.
#[test]
fn consumer_install_commands_are_the_ones_ci_runs() {
    let text = readme();
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.gitignore")).unwrap();
    let venv = ci
        .lines()
        .find_map(|l| l.strip_prefix("venv="))
        .expect(".ci/run names the venv");
    assert!(ignore.lines().any(|l| l == format!("/{venv}")), "{venv}");
    assert!(ci.contains("npm ci --prefix examples/node"));
    assert!(ignore.lines().any(|l| l == "/examples/node/node_modules"));
    let lines = code_lines(&text);
    let made: Vec<&&str> = lines.iter().filter(|l| l.contains(" -m venv")).collect();
    assert!(!made.is_empty(), "the README makes the venv");
    for l in made {
        assert_eq!(
            *l,
            &format!("python3 -m venv {venv}"),
            "the venv .ci/run makes"
        );
    }
    let pip = "/bin/pip install -r examples/python/requirements.txt";
    for l in lines.iter().filter(|l| l.contains("pip install")) {
        assert_eq!(*l, &format!("{venv}{pip}"));
    }
    // The Debian packages the quick start names for them are the ones .ci/run installs.
    let quick = section(&text, "## Quick start");
    for (package, installed_with) in [
        ("python3-venv", "apt_install python3 python3-venv"),
        ("nodejs npm", "apt_install nodejs npm"),
    ] {
        assert!(quick.contains(package), "{package}");
        assert!(ci.contains(installed_with), "{installed_with}");
    }
    for l in lines.iter().filter(|l| l.contains("npm ")) {
        assert_eq!(*l, "npm ci --prefix examples/node");
    }
    for l in lines
        .iter()
        .filter(|l| l.contains("examples/python/") && l.contains(".py"))
    {
        let program = words(l)
            .into_iter()
            .find(|w| !w.contains('='))
            .unwrap_or_default();
        assert_eq!(program, format!("{venv}/bin/python"), "{l}");
    }
}

/// The script a command runs (`examples/...` ending in `.py` or `.mjs`).
fn script_of(command: &[String]) -> Option<&String> {
    command
        .iter()
        .find(|w| w.starts_with("examples/") && (w.ends_with(".py") || w.ends_with(".mjs")))
}

/// The README's example commands (`[VAR=value ...] <python|node> examples/...`), each with its
/// words as written; the NATS stream and RabbitMQ names (`PUSHER_EVENTS`, `pusher.events`,
/// the `pusher` prefix) are this test's own, and each reads one event.
fn example_commands(text: &str) -> Vec<Vec<String>> {
    code_lines(text)
        .into_iter()
        .map(words)
        .filter(|w| {
            w.iter()
                .find(|w| !w.contains('='))
                .is_some_and(|p| p.ends_with("/bin/python") || p == "node")
        })
        .collect()
}

/// Every example command the README gives (the quick start's and the consumers section's) runs
/// as written against the real brokers and prints the first event its filter selects: among
/// them the NATS consumer in Node, and the venv where `.ci/run` makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_example_commands_run_as_written() {
    use crate::common::{TestApp, cleanup, settings_for, webhook_body};
    use crate::consumers::{Consumer, EVENTS, node, python, repo};
    use pusher_bridge::config::BrokerKind;
    let (Some(_), Some(_)) = (python(), node()) else {
        return;
    };
    let text = readme();
    let commands = example_commands(&text);
    let scripts: BTreeSet<String> = commands
        .iter()
        .filter_map(|c| script_of(c).cloned())
        .collect();
    for script in [
        "examples/python/nats_consumer.py",
        "examples/node/nats_consumer.mjs",
        "examples/python/amqp_consumer.py",
        "examples/node/amqp_consumer.mjs",
        "examples/python/cloudevents_consumer.py",
    ] {
        assert!(scripts.contains(script), "no README command runs {script}");
    }
    let quick = section(&text, "## Quick start");
    let quick_scripts: BTreeSet<String> = example_commands(quick)
        .iter()
        .filter_map(|c| script_of(c).cloned())
        .collect();
    assert_eq!(
        quick_scripts,
        BTreeSet::from([
            "examples/python/nats_consumer.py".to_string(),
            "examples/node/nats_consumer.mjs".to_string()
        ]),
        "the NATS quick start's consumers, in Python and Node"
    );

    let mut nats = settings_for(BrokerKind::Nats);
    let mut amqp = settings_for(BrokerKind::Amqp);
    nats.broker.cloudevents = true;
    amqp.broker.cloudevents = true;
    let nats_app = TestApp::spawn_ready(nats.clone()).await;
    let amqp_app = TestApp::spawn_ready(amqp.clone()).await;
    let mut running = Vec::new();
    let mut queues = Vec::new();
    // RabbitMQ consumers first: their queues must be bound before the events are published.
    for is_amqp in [true, false] {
        for command in &commands {
            let script = script_of(command).unwrap();
            let on_amqp = script.contains("amqp");
            if on_amqp != is_amqp {
                continue;
            }
            let program = command.iter().find(|w| !w.contains('=')).unwrap();
            let program = if program == "node" {
                std::path::PathBuf::from("node")
            } else {
                repo(program)
            };
            let s = if on_amqp { &amqp } else { &nats };
            let prefix = &s.broker.subject_prefix;
            let mut env: Vec<(&str, String)> = command
                .iter()
                .take_while(|w| w.contains('='))
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k, v.replacen("pusher.", &format!("{prefix}."), 1)))
                .collect();
            let filter = env
                .iter()
                .find(|(k, _)| *k == "SUBJECT" || *k == "BINDING")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| format!("{prefix}.>"));
            // A name of its own for each command: two commands of one script would otherwise
            // share its default name, and with it the events (a work queue).
            let queue = crate::common::unique("readme");
            queues.push(queue.clone());
            env.extend([
                ("NATS_URL", crate::common::nats_url()),
                ("STREAM", nats.broker.nats.stream.clone()),
                ("DURABLE", queue.clone()),
                ("AMQP_URL", crate::common::amqp_url()),
                ("EXCHANGE", amqp.broker.amqp.exchange.clone()),
                ("QUEUE", queue),
                ("MAX_MESSAGES", "1".into()),
            ]);
            if on_amqp && script.contains("cloudevents") {
                env.push(("BROKER", "amqp".into()));
            }
            let mut consumer = Consumer::start(&program, script, &env);
            if on_amqp {
                assert_eq!(consumer.next().await["ready"], true, "{command:?}");
            }
            // The event the filter selects first: its third token, or the first event.
            let event = match filter.split('.').nth(2) {
                Some(e) if !["*", ">", "#"].contains(&e) => e.to_string(),
                _ => "channel_occupied".to_string(),
            };
            running.push((command.clone(), consumer, event));
        }
        if is_amqp {
            for app in [&nats_app, &amqp_app] {
                let answer = app
                    .post_signed(&webhook_body(1_700_000_000_123, &EVENTS))
                    .await;
                assert_eq!(answer.status, 200, "{}", answer.body);
            }
        }
    }
    for (command, mut consumer, event) in running {
        println!("{command:?}");
        let line = consumer.next().await;
        let got = line["event"]
            .as_str()
            .map(str::to_string)
            .or_else(|| line["type"].as_str().map(|t| t.replace("com.pusher.", "")))
            .unwrap_or_default();
        assert_eq!(got, event, "{command:?}: {line}");
        consumer.finish().await;
    }
    let (conn, ch) = crate::common::amqp_channel().await;
    for q in &queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
    nats_app.stop().await;
    amqp_app.stop().await;
    cleanup(BrokerKind::Nats, &nats).await;
    cleanup(BrokerKind::Amqp, &amqp).await;
}

/// The `200` bodies the README quotes are the bridge's, key order included: `published`,
/// `dead_lettered`, `spooled`, then (spooled events) `broker` and `broker_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_200_bodies_are_what_the_bridge_answers() {
    use crate::common::{NatsServer, TestApp, free_port, settings_for, webhook_body};
    use pusher_bridge::config::BrokerKind;
    let text = readme();
    let answers = section(&text, "## HTTP answers on the webhook path");
    let quoted: Vec<&str> = answers
        .split('`')
        .filter(|q| q.starts_with(r#"{"published""#))
        .collect();
    assert_eq!(quoted.len(), 2, "{quoted:?}");

    let s = settings_for(BrokerKind::Nats);
    let app = TestApp::spawn_ready(s.clone()).await;
    let events = [
        r#"{"name":"channel_occupied","channel":"presence-a"}"#,
        r#"{"name":"member_added","channel":"presence-a","user_id":"u"}"#,
        r#"{"name":"member_added","user_id":"u"}"#,
    ];
    let answer = app
        .post_signed(&webhook_body(1_700_000_000_000, &events))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, quoted[0]);
    app.stop().await;
    crate::common::cleanup(BrokerKind::Nats, &s).await;

    let no_js = NatsServer::start_without_jetstream(free_port()).await;
    let mut s = settings_for(BrokerKind::Nats);
    s.broker.nats.url = pusher_bridge::config::SecretUrl::new(no_js.url());
    let app = TestApp::spawn(s.clone()).await;
    let mut last = String::new();
    for i in 0..200 {
        let body = webhook_body(
            1_700_000_000_000 + i,
            &[r#"{"name":"cache_miss","channel":"c"}"#],
        );
        let answer = app.post_signed(&body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        last = answer.body;
        if last.contains("jetstream_off") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last, quoted[1]);
    app.stop().await;
}
