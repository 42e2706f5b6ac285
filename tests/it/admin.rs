//! `server.admin_listen`: the webhook path alone on `listen` (what Pusher must reach), the
//! probes, `/metrics` and the channel-state API on the admin address only.

use crate::common::process::{
    BridgeProcess, http_get, http_request, post_signed, run, settings_env,
};
use crate::common::{
    APP_KEY, APP_SECRET, delete_streams, free_port, jetstream_ctx, nats_settings, webhook_body,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_address_the_webhook_is_alone_on_listen() {
    let s = nats_settings();
    let admin = free_port();
    let mut env = settings_env(&s);
    env.push((
        "PUSHER_BRIDGE_SERVER__ADMIN_LISTEN".into(),
        format!("127.0.0.1:{admin}"),
    ));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    let mut ready = false;
    for _ in 0..500 {
        if http_get(admin, "/readyz")
            .await
            .is_some_and(|(c, _)| c == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        ready,
        "not ready on the admin address:\n{}",
        bridge.stdout()
    );

    // `listen`: the webhook, nothing else.
    let body = webhook_body(1, &[r#"{"name":"channel_occupied","channel":"adm"}"#]);
    let posted = post_signed(bridge.port, APP_KEY, APP_SECRET, &body).await;
    assert_eq!(posted.as_ref().map(|(c, _)| *c), Some(200), "{posted:?}");
    for path in ["/metrics", "/healthz", "/readyz", "/apps/123456/channels"] {
        let got = http_get(bridge.port, path).await.expect("an answer");
        assert_eq!(got.0, 404, "{path} on listen: {got:?}");
    }

    // The admin address: everything but the webhook.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let got = http_get(admin, path).await.expect("an answer");
        assert_eq!(got.0, 200, "{path} on admin_listen: {got:?}");
    }
    let metrics = http_get(admin, "/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains(
            r#"pusher_bridge_webhooks_received_total{app_id="123456",outcome="accepted"} 1"#
        ),
        "{metrics}"
    );
    let (state, state_body) = http_get(admin, "/apps/123456/channels")
        .await
        .expect("state");
    assert!(
        state_body.contains("state"),
        "the state API answers there: {state} {state_body}"
    );
    let on_admin = http_request(admin, "POST", "/pusher/webhooks", &[], &body)
        .await
        .expect("an answer");
    assert_eq!(on_admin.0, 404, "{on_admin:?}");

    // `healthcheck` probes the admin address.
    let out = run(&["healthcheck", "--ready"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&format!(":{admin}/readyz")), "{out:?}");

    assert_eq!(bridge.terminate().await, Some(0));
    let stdout = bridge.stdout();
    let serving = stdout
        .lines()
        .find(|l| l.contains("pusher-bridge serving"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        serving.contains(&format!("admin_listen=127.0.0.1:{admin}")),
        "{serving}"
    );
    delete_streams(&jetstream_ctx(s.broker.nats.url.expose()).await, &s).await;
}

#[test]
fn the_admin_address_must_differ_from_listen() {
    let e = pusher_bridge::Settings::from_toml(
        "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("server.admin_listen"), "{e}");
    let e = pusher_bridge::Settings::from_toml("[server]\nadmin_listen = \"nowhere\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.admin_listen"), "{e}");
}
