//! Hostile input against the real binary, as a sender holding a valid app secret (or a buggy
//! Pusher-protocol server) would send it: a packed body beside normal webhooks, names longer
//! than Pusher allows, thousands of made-up event names, the connection limit, and secrets that
//! must not reach any log line (`RUST_LOG=trace`, password-protected NATS and RabbitMQ) or any
//! configuration error.

use std::time::{Duration, Instant};

use crate::common::process::{BridgeProcess, Env, post_signed, run, settings_env};
use crate::common::{
    APP_KEY, APP_SECRET, NatsServer, delete_streams, free_port, jetstream_ctx, nats_settings,
    stream_messages, unique, wait_stream_count, webhook_body,
};
use pusher_bridge::config::{SecretUrl, Settings};

/// One normal webhook (one event on `channel`).
fn normal(channel: &str) -> String {
    webhook_body(
        1_700_000_000_000,
        &[&format!(
            r#"{{"name":"channel_occupied","channel":"{channel}"}}"#
        )],
    )
}

/// Peak resident memory of `pid` in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

async fn started(s: &Settings, extra: &[(&str, &str)]) -> BridgeProcess {
    let mut env: Env = settings_env(s);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    bridge
}

/// Posts normal webhooks one after another until `stop` is set; each one's answer time.
fn normal_traffic(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    tokio::spawn(async move {
        let mut latencies = Vec::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            let answer =
                post_signed(port, APP_KEY, APP_SECRET, &normal(&format!("beside-{i}"))).await;
            let (code, body) = answer.expect("a normal webhook is answered");
            assert_eq!(code, 200, "{body}");
            assert!(body.contains(r#""published":1"#), "{body}");
            latencies.push(t.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_body_costs_what_its_size_costs_beside_normal_webhooks() {
    let s = nats_settings();
    let bridge = started(&s, &[]).await;
    let port = bridge.port;
    // 200,000 `{}` events: 600 KB, under max_body_bytes.
    let packed = format!(
        r#"{{"time_ms":1700000000000,"events":[{}]}}"#,
        vec!["{}"; 200_000].join(",")
    );
    assert!(packed.len() < 1_048_576);
    // One large event (900 KB of data) that is accepted: parsed off the async thread.
    let big_event = webhook_body(
        1_700_000_000_000,
        &[&format!(
            r#"{{"name":"client_event","channel":"private-big","event":"client-x","data":"{}"}}"#,
            "x".repeat(900_000)
        )],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beside = normal_traffic(port, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut packed_times = Vec::new();
    let mut big_times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (code, body) = post_signed(port, APP_KEY, APP_SECRET, &packed)
            .await
            .unwrap();
        packed_times.push(t.elapsed());
        assert_eq!(code, 413, "{body}");
        assert!(body.contains("max_events_per_webhook"), "{body}");
        let t = Instant::now();
        let (code, body) = post_signed(port, APP_KEY, APP_SECRET, &big_event)
            .await
            .unwrap();
        big_times.push(t.elapsed());
        assert_eq!(code, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let latencies = beside.await.unwrap();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    let peak = peak_rss_kib(bridge.pid().unwrap());
    eprintln!(
        "packed 413 in {packed_times:?}, 900 KB event in {big_times:?}; {} normal webhooks \
         beside, slowest {worst:?}; peak RSS {peak} KiB",
        latencies.len()
    );
    for t in &packed_times {
        assert!(*t < Duration::from_secs(1), "packed body answered in {t:?}");
    }
    assert!(latencies.len() >= 10, "{latencies:?}");
    // Debug build, shared machine: the old bridge made them wait ~3 s (and spooled them).
    assert!(worst < Duration::from_millis(100), "{latencies:?}");
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    let text = bridge.get("/metrics").await.unwrap().1;
    assert!(
        text.contains(
            r#"pusher_bridge_webhooks_received_total{app_id="123456",outcome="too_large"} 3"#
        ),
        "{text}"
    );
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    delete_streams(&js, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_longer_than_pusher_allows_are_malformed_and_block_nothing() {
    let s = nats_settings();
    let bridge = started(&s, &[]).await;
    let dots = ".".repeat(1_340);
    let long = "c".repeat(4_030);
    let user = "u".repeat(201);
    let at_limit = "a".repeat(200);
    let body = webhook_body(
        1_700_000_000_000,
        &[
            &format!(r#"{{"name":"channel_occupied","channel":"{dots}"}}"#),
            &format!(r#"{{"name":"channel_occupied","channel":"{long}"}}"#),
            &format!(r#"{{"name":"member_added","channel":"presence-r","user_id":"{user}"}}"#),
            &format!(r#"{{"name":"channel_occupied","channel":"{at_limit}"}}"#),
        ],
    );
    let (code, answer) = post_signed(bridge.port, APP_KEY, APP_SECRET, &body)
        .await
        .unwrap();
    assert_eq!(code, 200, "{answer}");
    assert!(
        answer.contains(r#""published":1"#) && answer.contains(r#""dead_lettered":3"#),
        "{answer}"
    );
    // Normal webhooks behind them are published at once, not spooled.
    for i in 0..5 {
        let (code, answer) = post_signed(
            bridge.port,
            APP_KEY,
            APP_SECRET,
            &normal(&format!("after-{i}")),
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{answer}");
        assert!(answer.contains(r#""published":1"#), "{answer}");
    }
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    let dead = stream_messages(&js, &s.broker.nats.dlq_stream, 3).await;
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(d.header("Pusher-Bridge-Reason"), Some("malformed"));
        assert!(
            d.header("Pusher-Bridge-Detail")
                .unwrap_or("")
                .contains("longer than 200")
        );
    }
    assert_eq!(
        wait_stream_count(&js, &s.broker.nats.stream, 6, Duration::from_secs(2)).await,
        6
    );
    delete_streams(&js, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_event_names_do_not_grow_metrics() {
    let s = nats_settings();
    let bridge = started(&s, &[]).await;
    let before = bridge.get("/metrics").await.unwrap().1;
    let tag = unique("n");
    for batch in 0..4 {
        let events: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"name":"made_up_{tag}_{batch}_{i}","channel":"c"}}"#))
            .collect();
        let refs: Vec<&str> = events.iter().map(String::as_str).collect();
        let body = webhook_body(1_700_000_000_000 + batch, &refs);
        let (code, answer) = post_signed(bridge.port, APP_KEY, APP_SECRET, &body)
            .await
            .unwrap();
        assert_eq!(code, 200, "{answer}");
        assert!(answer.contains(r#""published":1000"#), "{answer}");
    }
    let after = bridge.get("/metrics").await.unwrap().1;
    eprintln!(
        "/metrics: {} bytes before, {} after 4,000 names",
        before.len(),
        after.len()
    );
    // Counter values and histogram buckets change width, no series is added.
    assert!(
        after.len() < before.len() + 1024,
        "{} -> {}",
        before.len(),
        after.len()
    );
    assert!(
        after.contains(
            r#"pusher_bridge_events_published_total{app_id="123456",event="other"} 4000"#
        ),
        "{after}"
    );
    // The subject keeps the real name.
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    let stored = stream_messages(&js, &s.broker.nats.stream, 1).await;
    assert!(
        stored[0].subject.contains(&format!("made_up_{tag}_0_")),
        "{}",
        stored[0].subject
    );
    delete_streams(&js, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_instead_of_failing() {
    let s = nats_settings();
    let bridge = started(
        &s,
        &[
            ("PUSHER_BRIDGE_SERVER__MAX_CONNECTIONS", "2"),
            ("PUSHER_BRIDGE_SERVER__HEADER_READ_TIMEOUT", "30s"),
        ],
    )
    .await;
    // Two idle clients hold both permits.
    let a = tokio::net::TcpStream::connect(("127.0.0.1", bridge.port))
        .await
        .unwrap();
    let b = tokio::net::TcpStream::connect(("127.0.0.1", bridge.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let port = bridge.port;
    let waiting = tokio::spawn(async move {
        let t = Instant::now();
        let answer = post_signed(port, APP_KEY, APP_SECRET, &normal("waited")).await;
        (answer, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served beside two at the limit"
    );
    drop(a);
    let (answer, waited) = waiting.await.unwrap();
    let (code, body) = answer.expect("the waiting webhook is answered once a connection ends");
    assert_eq!(code, 200, "{body}");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    drop(b);
    let out = bridge.stdout();
    assert_eq!(
        out.matches("server.max_connections reached").count(),
        1,
        "{out}"
    );
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    delete_streams(&js, &s).await;
}

/// Asserts that `password` is nowhere in the bridge's output.
fn assert_never_printed(bridge: &BridgeProcess, password: &str) -> String {
    let out = format!("{}{}", bridge.stdout(), bridge.stderr());
    let bytes = password
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(!out.contains(password), "the password reached the log");
    assert!(
        !out.contains(&bytes),
        "the password's bytes reached the log"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_nats_password_at_trace() {
    let password = format!("pw-{}", unique("nats"));
    let server =
        NatsServer::start_with_args(free_port(), &["--user", "bridge", "--pass", &password]).await;
    for in_url in [false, true] {
        let mut s = nats_settings();
        let mut extra = vec![("RUST_LOG", "trace")];
        if in_url {
            s.broker.nats.url = SecretUrl::new(format!(
                "nats://bridge:{password}@127.0.0.1:{}",
                server.port
            ));
        } else {
            s.broker.nats.url = SecretUrl::new(server.url());
            extra.push(("PUSHER_BRIDGE_BROKER__NATS__USER", "bridge"));
            extra.push(("PUSHER_BRIDGE_BROKER__NATS__PASSWORD", &password));
        }
        let mut bridge = started(&s, &extra).await;
        let (code, body) = post_signed(bridge.port, APP_KEY, APP_SECRET, &normal("c"))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""published":1"#), "{body}");
        assert_eq!(bridge.terminate().await, Some(0));
        let out = assert_never_printed(&bridge, &password);
        // The client did log its connection at trace: the CONNECT it wrote (async-nats masks
        // `pass` there itself) and, for a URL with credentials, the URL with the password in
        // plain text, which the bridge's mask turned into `***`.
        assert!(
            out.lines()
                .any(|l| l.contains("async_nats") && l.contains("CONNECT")),
            "async-nats' CONNECT is not in the trace output (in_url = {in_url})"
        );
        if in_url {
            assert!(
                out.lines()
                    .any(|l| l.contains("async_nats") && l.contains(r#"password: Some("***")"#)),
                "async-nats' server URL is not in the trace output"
            );
        }
        let _ = std::fs::remove_dir_all(&s.spool.dir);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_amqp_password_at_trace() {
    let id = unique("hostile");
    let (vhost, user, password) = (format!("vh-{id}"), format!("u-{id}"), format!("pw-{id}"));
    tokio::task::spawn_blocking({
        let (vhost, user, password) = (vhost.clone(), user.clone(), password.clone());
        move || {
            rabbitmqctl(&["add_vhost", &vhost]);
            rabbitmqctl(&["add_user", &user, &password]);
            rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
        }
    })
    .await
    .unwrap();
    let s = nats_settings();
    let url = format!("amqp://{user}:{password}@127.0.0.1:5672/{vhost}");
    let mut bridge = started(
        &s,
        &[
            ("RUST_LOG", "trace"),
            ("PUSHER_BRIDGE_BROKER__KIND", "amqp"),
            ("PUSHER_BRIDGE_BROKER__AMQP__URL", &url),
        ],
    )
    .await;
    let (code, body) = post_signed(bridge.port, APP_KEY, APP_SECRET, &normal("c"))
        .await
        .unwrap();
    let terminated = bridge.terminate().await;
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["delete_vhost", &vhost]);
        rabbitmqctl(&["delete_user", &user]);
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&s.spool.dir);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""published":1"#), "{body}");
    assert_eq!(terminated, Some(0));
    let out = assert_never_printed(&bridge, &password);
    // lapin logged the login frame (the SASL PLAIN response, `\0user\0password` as a byte
    // list); the password's bytes there are masked.
    assert!(
        out.lines().any(|l| l.contains("lapin")
            && l.contains("response: LongString(")
            && l.contains("***")),
        "lapin's login frame is not in the trace output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_never_print_the_value() {
    let secret = format!("s3cret-{}", unique("cfg"));
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let cases: Vec<(Vec<String>, Env, &str)> = vec![
        // A TOML syntax error on the secret's own line (the closing quote missing).
        (
            vec![
                "--config".into(),
                file(
                    "a.toml",
                    format!("[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"{secret}\n"),
                ),
            ],
            vec![],
            "line 4",
        ),
        // A secret of the wrong type.
        (
            vec![
                "--config".into(),
                file("b.toml", "[broker.nats]\npassword = 123456789\n".into()),
            ],
            vec![],
            "password",
        ),
        // A malformed PUSHER_BRIDGE_APPS (a brace missing).
        (
            vec![],
            vec![(
                "PUSHER_BRIDGE_APPS".into(),
                format!(r#"[{{id="1",key="k",secret="{secret}"]"#),
            )],
            "PUSHER_BRIDGE_APPS",
        ),
        // A URL that is no list of servers.
        (
            vec![],
            vec![(
                "PUSHER_BRIDGE_BROKER__NATS__URL".into(),
                format!("nats://u:{secret}@h:99999"),
            )],
            "broker.nats.url",
        ),
    ];
    for (args, env, names) in cases {
        let mut argv: Vec<&str> = vec!["check-config"];
        argv.extend(args.iter().map(String::as_str));
        let out = run(&argv, &env).await;
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr.contains(names),
            "{names} not named: {}",
            out.stderr
        );
        for leak in [secret.as_str(), "123456789"] {
            assert!(
                !out.stderr.contains(leak) && !out.stdout.contains(leak),
                "{out:?}"
            );
        }
    }
    // check-config shows every URL form redacted.
    let env: Env = vec![
        (
            "PUSHER_BRIDGE_BROKER__NATS__URL".into(),
            format!("u:{secret}@h:4222,nats://tok{secret}@h2:4222"),
        ),
        (
            "PUSHER_BRIDGE_BROKER__AMQP__URL".into(),
            format!("amqp://u:{secret}@h/%2f"),
        ),
    ];
    let out = run(&["check-config"], &env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stdout.contains(&secret), "{}", out.stdout);
    assert!(
        out.stdout.contains("u:***@h:4222,nats://***@h2:4222"),
        "{}",
        out.stdout
    );
}
