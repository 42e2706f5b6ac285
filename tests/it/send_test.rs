//! `pusher-bridge send-test` and `pusher-bridge healthcheck`, run as the real binary against a
//! bridge that is itself the real binary, publishing to the real NATS.

use std::time::Duration;

use crate::common::process::{BridgeProcess, Env, Run, run, settings_env};
use crate::common::state::{app_path, now_secs, signed};
use crate::common::{
    APP_ID, APP_KEY, APP_SECRET, NatsServer, delete_streams, free_port, jetstream_ctx,
    nats_settings, stream_messages, unique,
};
use pusher_bridge::config::SecretUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (event, channel) of each sample, in the order `send-test` posts them: one session on the
/// presence channel.
const SAMPLES: [(&str, &str); 7] = [
    ("channel_occupied", "presence-send-test"),
    ("member_added", "presence-send-test"),
    ("client_event", "private-send-test"),
    ("cache_miss", "cache-send-test"),
    ("subscription_count", "send-test"),
    ("member_removed", "presence-send-test"),
    ("channel_vacated", "presence-send-test"),
];

fn with(env: &Env, key: &str, value: &str) -> Env {
    let mut env = env.clone();
    env.push((key.into(), value.into()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_puts_every_event_type_on_the_broker() {
    let s = nats_settings();
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_ready().await;

    let out = run(&["send-test"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    for (i, (event, _)) in SAMPLES.iter().enumerate() {
        assert!(
            lines[i].starts_with(event) && lines[i].contains("200 OK"),
            "{event} not accepted in its place:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains(&format!(
            "7 of 7 webhooks accepted by http://127.0.0.1:{}/pusher/webhooks",
            bridge.port
        )),
        "{}",
        out.stdout
    );

    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    let stored = stream_messages(&js, &s.broker.nats.stream, 7).await;
    let subjects: Vec<String> = stored.iter().map(|m| m.subject.clone()).collect();
    let expected: Vec<String> = SAMPLES
        .iter()
        .map(|(event, channel)| format!("{}.{APP_ID}.{event}.{channel}", s.broker.subject_prefix))
        .collect();
    assert_eq!(
        subjects, expected,
        "one webhook after the other, in the session's order"
    );
    assert_eq!(stored.len(), 7, "one message per event type");
    for m in &stored {
        assert_eq!(m.body["app_id"], APP_ID, "{m:?}");
        assert!(m.body["time_ms"].is_u64(), "{m:?}");
        assert!(m.header("Nats-Msg-Id").is_some(), "{m:?}");
    }
    let client_event = stored
        .iter()
        .find(|m| m.body["name"] == "client_event")
        .unwrap();
    assert_eq!(client_event.body["event"], "client-send-test");
    assert_eq!(client_event.body["data"], r#"{"hello":"world"}"#);
    let member = stored
        .iter()
        .find(|m| m.body["name"] == "member_added")
        .unwrap();
    assert_eq!(member.body["user_id"], "send-test-user");
    let count = stored
        .iter()
        .find(|m| m.body["name"] == "subscription_count")
        .unwrap();
    assert_eq!(count.body["subscription_count"], 1);

    let (_, metrics) = bridge.get("/metrics").await.unwrap();
    for (event, _) in SAMPLES {
        let line = format!(
            "pusher_bridge_events_published_total{{app_id=\"{APP_ID}\",event=\"{event}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert_eq!(bridge.terminate().await, Some(0), "{}", bridge.stderr());
    delete_streams(&js, &s).await;
}

/// Runs `pusher-bridge <args>` with `env` until its stdout is `want` (the state applier works
/// behind the webhooks' answers), for up to 20 s; returns the last output.
async fn until_prints(env: &Env, args: &[&str], want: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let out = run(args, env).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        if out.stdout == want {
            return out.stdout;
        }
        last = out.stdout;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{args:?} printed {last:?}, not {want:?}");
}

/// With `[state]` on, send-test's webhooks keep the channel state consistent: its presence
/// channel is occupied before the member joins, so one event at a time (`channel_occupied`,
/// then `member_added`) shows the member in `state members`, `state channels` and the query
/// API; the whole run is one session that ends as it began, nothing occupied, nobody present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_leaves_a_consistent_channel_state() {
    let s = nats_settings();
    let bucket = unique("ST");
    let mut env = settings_env(&s);
    env.push(("PUSHER_BRIDGE_STATE__ENABLED".into(), "true".into()));
    env.push(("PUSHER_BRIDGE_STATE__BUCKET".into(), bucket.clone()));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;

    for event in ["channel_occupied", "member_added"] {
        let out = run(&["send-test", "--event", event], &bridge.env).await;
        assert_eq!(out.code, 0, "{out:?}");
    }
    let members = ["state", "members", "presence-send-test"];
    until_prints(&bridge.env, &members, "send-test-user\n").await;
    let channels = run(&["state", "channels"], &bridge.env).await;
    assert_eq!(
        channels.stdout, "presence-send-test subscription_count=? user_count=1\n",
        "{channels:?}"
    );
    let users = signed(
        &app_path("/channels/presence-send-test/users"),
        &[],
        APP_KEY,
        APP_SECRET,
        now_secs(),
    );
    let (code, body) = bridge.get(&users).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"users": [{"id": "send-test-user"}]})
    );

    // The whole run: the member joins again and leaves, the channel is vacated.
    let out = run(&["send-test"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    until_prints(&bridge.env, &["state", "channels"], "").await;
    until_prints(&bridge.env, &members, "").await;
    let channel = signed(
        &app_path("/channels/presence-send-test"),
        &[],
        APP_KEY,
        APP_SECRET,
        now_secs(),
    );
    let (code, body) = bridge.get(&channel).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body, serde_json::json!({"occupied": false}));

    assert_eq!(bridge.terminate().await, Some(0), "{}", bridge.stderr());
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    delete_streams(&js, &s).await;
    let _ = js.delete_stream(format!("KV_{bucket}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_one_event_and_every_failure_exits_1() {
    let s = nats_settings();
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_ready().await;
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;

    // One event type; the default URL maps an unspecified listen address to loopback.
    let env = with(
        &bridge.env,
        "PUSHER_BRIDGE_SERVER__LISTEN",
        &format!("0.0.0.0:{}", bridge.port),
    );
    let out = run(&["send-test", "--event", "member_added"], &env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    let stored = stream_messages(&js, &s.broker.nats.stream, 1).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].subject,
        format!(
            "{}.{APP_ID}.member_added.presence-send-test",
            s.broker.subject_prefix
        )
    );

    // An unknown event name is refused before anything is sent.
    let out = run(&["send-test", "--event", "member_updated"], &bridge.env).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("unknown event `member_updated`")
            && out.stderr.contains("channel_occupied"),
        "{}",
        out.stderr
    );

    // The bridge refuses a wrong secret: every answer is printed, exit 1.
    let wrong = with(
        &bridge.env,
        "PUSHER_BRIDGE_APPS",
        &format!(
            r#"[{{id="{APP_ID}",key="{}",secret="wrong"}}]"#,
            s.apps[0].key
        ),
    );
    let out = run(&["send-test"], &wrong).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stdout.matches("401 Unauthorized").count(),
        7,
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("0 of 7 webhooks accepted"),
        "{}",
        out.stdout
    );

    // A wrong path answers 404.
    let url = format!("http://127.0.0.1:{}/not-the-webhook-path", bridge.port);
    let out = run(
        &["send-test", "--event", "cache_miss", "--url", &url],
        &bridge.env,
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("404 Not Found"), "{}", out.stdout);

    // Nothing listening: an error per webhook, exit 1.
    let url = format!("http://127.0.0.1:{}/pusher/webhooks", free_port());
    let out = run(&["send-test", "--url", &url], &bridge.env).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stdout.matches("error: request to").count(),
        7,
        "{}",
        out.stdout
    );

    // No app configured.
    let none = with(&bridge.env, "PUSHER_BRIDGE_APPS", "[]");
    let out = run(&["send-test"], &none).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("no [[apps]] configured"),
        "{}",
        out.stderr
    );

    // Only the single member_added webhook reached the broker.
    assert_eq!(
        stream_messages(&js, &s.broker.nats.stream, 2).await.len(),
        1
    );
    bridge.terminate().await;
    delete_streams(&js, &s).await;
}

/// Serves one connection on a free port, answering every request with `status_line`.
async fn fake_server(status_line: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 {status_line}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_only_on_200() {
    let s = nats_settings();
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_ready().await;

    let out = run(&["healthcheck"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("http://127.0.0.1:{}/healthz: 200 OK", bridge.port)),
        "{}",
        out.stdout
    );
    let out = run(&["healthcheck", "--ready"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("/readyz: 200 OK"), "{}", out.stdout);

    // Stopped bridge: nothing answers.
    bridge.terminate().await;
    let out = run(&["healthcheck", "--timeout", "1s"], &bridge.env).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("request to"), "{}", out.stderr);

    // Something answers, but not 200.
    let port = fake_server("503 Service Unavailable").await;
    let env = with(
        &bridge.env,
        "PUSHER_BRIDGE_SERVER__LISTEN",
        &format!("0.0.0.0:{port}"),
    );
    let out = run(&["healthcheck"], &env).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("503 Service Unavailable busy"),
        "{}",
        out.stderr
    );

    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    delete_streams(&js, &s).await;
}

// ---------------------------------------------------------------------------------------------
// Why events were only spooled (issue 21): `send-test` names the cause and what to do, from the
// broker state the bridge reports in its answer.

/// `env` with the broker settings of `extra` added (set last, so they win).
fn with_all(env: &Env, extra: &[(&str, &str)]) -> Env {
    let mut env = env.clone();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Starts a bridge with `env`, waits for `/healthz` only (its broker is not up) and runs
/// `send-test` against it.
async fn send_test_against(env: Env) -> (BridgeProcess, Run) {
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_healthy().await;
    let out = run(&["send-test"], &bridge.env).await;
    (bridge, out)
}

/// Asserts that `out` exited 3 with all seven events spooled and every one of `words` in its
/// output.
fn spooled_because(out: &Run, words: &[&str]) {
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("7 of 7 webhooks accepted")
            && out.stdout.contains("0 of 7 event(s) published"),
        "{}",
        out.stdout
    );
    for w in words {
        assert!(out.stdout.contains(w), "`{w}` missing:\n{}", out.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_says_jetstream_is_off() {
    let server = NatsServer::start_without_jetstream(free_port()).await;
    let mut s = nats_settings();
    s.broker.nats.url = SecretUrl::new(server.url());
    let (bridge, out) = send_test_against(settings_env(&s)).await;
    spooled_because(
        &out,
        &[
            "JetStream off",
            &format!("NATS at {} is up but JetStream is off", server.url()),
            "start nats-server with -js",
        ],
    );
    assert!(!out.stdout.contains("cannot reach"), "{}", out.stdout);
    // The bridge says the same: a warning naming it, and /readyz (200: the spool has room).
    let log = bridge.stdout();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("JetStream is off")),
        "{log}"
    );
    let (code, body) = bridge.get("/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("JetStream is off"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_says_nothing_answers_at_the_broker_url() {
    let mut s = nats_settings();
    let url = format!("nats://127.0.0.1:{}", free_port());
    s.broker.nats.url = SecretUrl::new(url.clone());
    let (_bridge, out) = send_test_against(settings_env(&s)).await;
    spooled_because(
        &out,
        &[
            "unreachable",
            &format!("nothing answers at NATS at {url}"),
            "broker.nats.url",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_says_the_broker_refused_the_bridge() {
    let server =
        NatsServer::start_with_args(free_port(), &["--user", "u", "--pass", "right-pass"]).await;
    let mut s = nats_settings();
    s.broker.nats.url = SecretUrl::new(server.url());
    let env = with_all(
        &settings_env(&s),
        &[
            ("PUSHER_BRIDGE_BROKER__NATS__USER", "u"),
            ("PUSHER_BRIDGE_BROKER__NATS__PASSWORD", "wrong-pass-x1"),
        ],
    );
    let (bridge, out) = send_test_against(env).await;
    spooled_because(
        &out,
        &[
            "refused",
            &format!("NATS at {} refused the bridge's connection", server.url()),
            "authorization violation",
            "broker.nats.password",
        ],
    );
    for text in [&out.stdout, &out.stderr, &bridge.stdout()] {
        assert!(!text.contains("wrong-pass-x1"), "a secret shown:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_says_rabbitmq_refused_the_bridge() {
    let s = crate::common::settings_for(pusher_bridge::config::BrokerKind::Amqp);
    let base = settings_env(&s);
    let authority = crate::common::relay::rabbitmq_addr();
    for (url, words) in [
        (
            format!("amqp://guest:wrong-pass-x2@{authority}/%2f"),
            "ACCESS_REFUSED",
        ),
        (
            format!("amqp://guest:guest@{authority}/no-such-vhost-x3"),
            "vhost",
        ),
    ] {
        let env = with_all(
            &base,
            &[
                ("PUSHER_BRIDGE_BROKER__KIND", "amqp"),
                ("PUSHER_BRIDGE_BROKER__AMQP__URL", &url),
                (
                    "PUSHER_BRIDGE_BROKER__AMQP__EXCHANGE",
                    &s.broker.amqp.exchange,
                ),
                ("PUSHER_BRIDGE_BROKER__AMQP__QUEUE", &s.broker.amqp.queue),
                (
                    "PUSHER_BRIDGE_BROKER__AMQP__DLQ_EXCHANGE",
                    &s.broker.amqp.dlq_exchange,
                ),
                (
                    "PUSHER_BRIDGE_BROKER__AMQP__DLQ_QUEUE",
                    &s.broker.amqp.dlq_queue,
                ),
            ],
        );
        let (bridge, out) = send_test_against(env).await;
        spooled_because(
            &out,
            &[
                "refused",
                "refused the bridge's connection",
                words,
                "broker.amqp.url",
            ],
        );
        for text in [&out.stdout, &out.stderr, &bridge.stdout()] {
            assert!(!text.contains("wrong-pass-x2"), "a secret shown:\n{text}");
        }
    }
}

/// A TCP relay to `target` that passes the NATS handshake (up to the server's first `PONG`)
/// and then holds everything the server sends until released: the bridge is connected, but
/// its first JetStream request gets no answer, so its broker connection is still coming up.
struct HeldRelay {
    port: u16,
    release: std::sync::Arc<tokio::sync::Notify>,
    released: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HeldRelay {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let release = Arc::new(tokio::sync::Notify::new());
        let released = Arc::new(AtomicBool::new(false));
        let (rel, reld) = (release.clone(), released.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (rel, reld) = (rel.clone(), reld.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut seen = Vec::new();
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let handshake_done = seen.windows(6).any(|w| w == b"PONG\r\n");
                            if handshake_done {
                                while !reld.load(Ordering::SeqCst) {
                                    let _ = tokio::time::timeout(
                                        std::time::Duration::from_millis(50),
                                        rel.notified(),
                                    )
                                    .await;
                                }
                            } else if seen.len() < 64 * 1024 {
                                seen.extend_from_slice(&buf[..n]);
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        () = down => {}
                    }
                });
            }
        });
        Self {
            port,
            release,
            released,
        }
    }

    fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_says_the_connection_is_still_coming_up() {
    let server = NatsServer::start_on(free_port()).await;
    let relay = HeldRelay::start(([127, 0, 0, 1], server.port).into()).await;
    let mut s = nats_settings();
    s.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{}", relay.port));
    // The bridge's JetStream requests wait up to publish_timeout: longer than the test needs.
    let env = with_all(
        &settings_env(&s),
        &[
            ("PUSHER_BRIDGE_BROKER__PUBLISH_TIMEOUT", "20s"),
            ("PUSHER_BRIDGE_BROKER__RESPONSE_BUDGET", "400ms"),
        ],
    );
    let (mut bridge, out) = send_test_against(env).await;
    spooled_because(
        &out,
        &[
            "connecting",
            &format!(
                "the bridge's connection to NATS at nats://127.0.0.1:{} is still coming up",
                relay.port
            ),
            "run send-test again",
        ],
    );
    // Once the broker answers, the spooled events are published and the next run passes.
    relay.release();
    bridge.wait_ready().await;
    let js = jetstream_ctx(&server.url()).await;
    assert_eq!(
        stream_messages(&js, &s.broker.nats.stream, 7).await.len(),
        7
    );
    for _ in 0..250 {
        let metrics = bridge.get("/metrics").await.map(|(_, m)| m);
        if metrics.is_some_and(|m| m.lines().any(|l| l == "pusher_bridge_spool_events 0")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let again = run(&["send-test"], &bridge.env).await;
    assert_eq!(again.code, 0, "{again:?}");
}
