//! Slow clients cannot hold a connection forever, and shutdown lets in-flight webhooks finish.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    let mut settings = nats_settings();
    settings.server.header_read_timeout = Duration::from_millis(300);
    settings.server.body_read_timeout = Duration::from_millis(300);
    let app = TestApp::spawn(settings.clone()).await;

    // Headers never finished: the server closes the connection.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"POST /pusher/webhooks HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connection held too long"
    );

    // Body promised but never sent: 408.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    s.write_all(
        b"POST /pusher/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    app.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_webhooks_finish() {
    let settings = nats_settings();
    let app = TestApp::spawn_ready(settings.clone()).await;
    let js = jetstream_ctx(&nats_url()).await;
    let body = webhook_body(1, &[r#"{"name":"channel_occupied","channel":"c"}"#]);
    let sig = sign(APP_SECRET, body.as_bytes());
    // Send the headers now and the body after shutdown began.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /pusher/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pusher-Key: {APP_KEY}\r\nX-Pusher-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = app.addr;
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(body.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stopping.await.unwrap();
    // New connections are refused after shutdown.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert_eq!(
        stream_messages(&js, &settings.broker.nats.stream, 1)
            .await
            .len(),
        1
    );
    delete_streams(&js, &settings).await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_while_it_is_read() {
    let mut settings = nats_settings();
    settings.server.max_body_bytes = 1024;
    let app = TestApp::spawn(settings.clone()).await;
    // No Content-Length: the limit can only be found out while reading. The client keeps the
    // body open after 2 KiB: only a server that counts as it reads can answer now.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let chunk = "a".repeat(512);
    let mut req = format!(
        "POST /pusher/webhooks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pusher-Key: {APP_KEY}\r\nX-Pusher-Signature: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        "0".repeat(64)
    );
    for _ in 0..4 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered before the body ended")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_backlog_holds_a_burst_of_max_connections() {
    // Nobody accepts: each connect completes only in the kernel's accept queue, which must
    // hold as many as `server.max_connections` (the standard library's 128 held ~129).
    let listener = pusher_bridge::http::bind("127.0.0.1:0".parse().unwrap(), 600).unwrap();
    let addr = listener.local_addr().unwrap();
    let connects = (0..600).map(|_| {
        tokio::time::timeout(
            Duration::from_millis(800),
            tokio::net::TcpStream::connect(addr),
        )
    });
    let held: Vec<_> = futures::future::join_all(connects)
        .await
        .into_iter()
        .filter_map(|r| r.ok()?.ok())
        .collect();
    assert!(
        held.len() >= 590,
        "{} of 600 connects completed",
        held.len()
    );
    drop(listener);
}
