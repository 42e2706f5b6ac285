//! `pusher-bridge send-test` and `pusher-bridge healthcheck`, run as the real binary against a
//! bridge that is itself the real binary, publishing to the real NATS.

use std::collections::BTreeSet;

use crate::common::process::{BridgeProcess, Env, run, settings_env};
use crate::common::{
    APP_ID, delete_streams, free_port, jetstream_ctx, nats_settings, stream_messages,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SAMPLES: [(&str, &str); 7] = [
    ("channel_occupied", "send-test"),
    ("channel_vacated", "send-test"),
    ("member_added", "presence-send-test"),
    ("member_removed", "presence-send-test"),
    ("client_event", "private-send-test"),
    ("cache_miss", "cache-send-test"),
    ("subscription_count", "send-test"),
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
    for (event, _) in SAMPLES {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(event) && l.contains("200 OK")),
            "{event} not accepted:\n{}",
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
    let subjects: BTreeSet<String> = stored.iter().map(|m| m.subject.clone()).collect();
    let expected: BTreeSet<String> = SAMPLES
        .iter()
        .map(|(event, channel)| format!("{}.{APP_ID}.{event}.{channel}", s.broker.subject_prefix))
        .collect();
    assert_eq!(subjects, expected);
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
