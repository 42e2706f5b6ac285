//! Spool write throughput while the broker is down: how many webhooks per second the bridge can
//! make durable on the local spool (every append fsynced before it returns, appends of
//! concurrent webhooks sharing each fsync).
//!
//! `cargo run --release --example spool_bench -- [--webhooks N] [--events E] [--concurrency C,..]
//! [--dir PATH] [--http]` (defaults: 20000 webhooks of 3 events, concurrency 1, 16, 64 and 256, a
//! temporary directory). Prints webhooks/s, events/s and MiB/s for each concurrency, then drains
//! the spool once to report the read side. With `--http` the whole bridge runs instead, its
//! broker unreachable, and signed webhooks are posted to it over HTTP (keep-alive connections,
//! one per concurrent client): the end-to-end figure including HTTP, signature check and parsing.
//! With `--drain`, the last run's spool is drained to the NATS at `$NATS_URL` (default
//! `nats://127.0.0.1:4222`) into a temporary stream instead of only being read back: the
//! catch-up rate after an outage.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pusher_bridge::broker::Message;
use pusher_bridge::config::SpoolSettings;
use pusher_bridge::metrics::Metrics;
use pusher_bridge::spool::{Record, Spool};

struct Args {
    webhooks: usize,
    events: usize,
    concurrency: Vec<usize>,
    dir: Option<PathBuf>,
    http: bool,
    drain: bool,
}

fn args() -> Args {
    let mut a = Args {
        webhooks: 20_000,
        events: 3,
        concurrency: vec![1, 16, 64, 256],
        dir: None,
        http: false,
        drain: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--http" || flag == "--drain" {
            a.http |= flag == "--http";
            a.drain |= flag == "--drain";
            continue;
        }
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--webhooks" => a.webhooks = value.parse().unwrap_or(a.webhooks),
            "--events" => a.events = value.parse().unwrap_or(a.events),
            "--concurrency" => {
                a.concurrency = value.split(',').filter_map(|c| c.parse().ok()).collect()
            }
            "--dir" => a.dir = Some(PathBuf::from(value)),
            other => eprintln!("ignoring unknown argument {other}"),
        }
    }
    a
}

/// The records of webhook `w`, shaped like the bridge's (subject, id, body of ~150 bytes).
fn webhook(w: usize, events: usize, prefix: &str) -> Vec<Record> {
    (0..events)
        .map(|i| {
            let channel = format!("presence-room-{}", w % 100);
            Record::Event(Message {
                subject: format!("{prefix}.123456.member_added.{channel}"),
                msg_id: format!("{w:016x}{i:04x}8f3a9c2e5b7d1f4a6c8e0b2d4f6a8c0e"),
                body: Bytes::from(format!(
                    r#"{{"name":"member_added","channel":"{channel}","user_id":"user-{w}-{i}","app_id":"123456","time_ms":1700000000000}}"#
                )),
                app_id: Arc::from("123456"),
                event: "member_added".into(),
                channel,
                time_ms: "1700000000000".into(),
                trace: None,
            })
        })
        .collect()
}

async fn run(dir: PathBuf, a: &Args, concurrency: usize) -> Result<(), Box<dyn std::error::Error>> {
    let settings = SpoolSettings {
        dir,
        max_bytes: 64 << 30,
        ..SpoolSettings::default()
    };
    let spool = Arc::new(Spool::open(&settings, 0, Arc::new(Metrics::new())).await?);
    let payloads: Arc<Vec<Vec<Record>>> = Arc::new(
        (0..a.webhooks)
            .map(|w| webhook(w, a.events, &prefix()))
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (spool, payloads, next) = (spool.clone(), payloads.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let w = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(records) = payloads.get(w) else {
                        return Ok::<_, pusher_bridge::spool::SpoolError>(());
                    };
                    spool.append(records).await?;
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let took = started.elapsed().as_secs_f64();
    let bytes = spool.disk_bytes() as f64;
    println!(
        "concurrency {concurrency:>4}: {:>9.0} webhooks/s  {:>9.0} events/s  {:>7.1} MiB/s  ({} webhooks x {} events, {:.2} s)",
        a.webhooks as f64 / took,
        (a.webhooks * a.events) as f64 / took,
        bytes / took / (1024.0 * 1024.0),
        a.webhooks,
        a.events,
        took
    );
    if concurrency == *a.concurrency.last().unwrap_or(&0) && a.drain {
        drain_to_nats(spool.clone()).await?;
    } else if concurrency == *a.concurrency.last().unwrap_or(&0) {
        let started = Instant::now();
        let mut read = 0;
        loop {
            let batch = spool.read_batch(pusher_bridge::spool::DRAIN_BATCH).await?;
            if batch.is_empty() {
                break;
            }
            read += batch.items.len();
            spool.commit(&batch, batch.items.len()).await?;
        }
        let took = started.elapsed().as_secs_f64();
        println!(
            "read back and committed {read} records: {:.0} records/s (without publishing)",
            read as f64 / took
        );
    }
    spool.close().await;
    Ok(())
}

/// Subject prefix of the bench's records (its own, so it overlaps no real stream).
fn prefix() -> String {
    format!("spoolbench{}", std::process::id())
}

/// Drains `spool` into a temporary stream of the local NATS and prints the rate.
async fn drain_to_nats(spool: Arc<Spool>) -> Result<(), Box<dyn std::error::Error>> {
    use pusher_bridge::broker::Broker;
    use pusher_bridge::config::{SecretUrl, Settings};
    use pusher_bridge::spool::drain::Drainer;

    let mut settings = Settings::default();
    let id = std::process::id();
    settings.broker.subject_prefix = prefix();
    settings.broker.nats.url = SecretUrl::new(
        std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    );
    settings.broker.nats.stream = format!("SPOOLBENCH_{id}");
    settings.broker.nats.dlq_stream = format!("SPOOLBENCH_DLQ_{id}");
    let metrics = Arc::new(Metrics::new());
    let broker = Arc::new(Broker::connect(&settings, metrics.clone()).await?);
    if !broker.wait_up(std::time::Duration::from_secs(10)).await {
        return Err("NATS is not reachable".into());
    }
    let events = spool.events();
    let drainer = Drainer::new(
        spool,
        broker.clone(),
        metrics,
        settings.broker.publish_timeout,
        settings.spool.drain_interval,
    );
    let started = Instant::now();
    let report = drainer.drain_once().await?;
    let took = started.elapsed().as_secs_f64();
    println!(
        "drained {events} spooled events to NATS JetStream: {:.0} events/s ({} published, {:.2} s)",
        events as f64 / took,
        report.published,
        took
    );
    if let Broker::Nats(nats) = &*broker {
        let js = nats.jetstream();
        let _ = js.delete_stream(&settings.broker.nats.stream).await;
        let _ = js.delete_stream(&settings.broker.nats.dlq_stream).await;
    }
    broker.close().await;
    Ok(())
}

/// The whole bridge with an unreachable broker: every webhook goes to the spool.
async fn run_http(
    dir: PathBuf,
    a: &Args,
    concurrency: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use pusher_bridge::config::{AppSettings, Secret, SecretUrl, Settings};

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut settings = Settings {
        apps: vec![AppSettings {
            id: "123456".into(),
            key: "bench-key".into(),
            secret: Secret::new("bench-secret"),
            secret_file: None,
        }],
        ..Settings::default()
    };
    settings.broker.nats.url = SecretUrl::new(format!("nats://127.0.0.1:{closed_port}"));
    settings.spool.dir = dir;
    settings.spool.max_bytes = 64 << 30;
    let key = pusher_bridge::webhook::AppRegistry::new(&settings.apps)
        .get("bench-key")
        .cloned()
        .ok_or("no app")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}{}",
        listener.local_addr()?,
        settings.server.webhook_path
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pusher_bridge::run(listener, settings, async {
        let _ = stopped.await;
    }));
    let events: Vec<String> = (0..a.events)
        .map(|i| {
            format!(r#"{{"name":"member_added","channel":"presence-room-{i}","user_id":"u{i}"}}"#)
        })
        .collect();
    let bodies: Arc<Vec<(bytes::Bytes, String)>> = Arc::new(
        (0..a.webhooks)
            .map(|w| {
                let body = format!(
                    r#"{{"time_ms":{},"events":[{}]}}"#,
                    1_700_000_000_000u64 + w as u64,
                    events.join(",")
                );
                let sig = key.sign(body.as_bytes());
                (bytes::Bytes::from(body), sig)
            })
            .collect(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..concurrency)
        .map(|_| {
            let (bodies, next, url) = (bodies.clone(), next.clone(), url.clone());
            tokio::spawn(async move {
                let client: Client<_, Full<bytes::Bytes>> =
                    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
                let mut refused = 0usize;
                loop {
                    let w = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((body, sig)) = bodies.get(w) else {
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(refused);
                    };
                    let req = hyper::Request::post(&url)
                        .header("Content-Type", "application/json")
                        .header("X-Pusher-Key", "bench-key")
                        .header("X-Pusher-Signature", sig)
                        .body(Full::new(body.clone()))?;
                    let resp = client.request(req).await?;
                    if resp.status() != 200 {
                        refused += 1;
                    }
                    resp.into_body().collect().await?;
                }
            })
        })
        .collect();
    let mut refused = 0;
    for c in clients {
        refused += c.await?.map_err(|e| e.to_string())?;
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "http, concurrency {concurrency:>4}: {:>8.0} webhooks/s  {:>8.0} events/s  ({} webhooks x {} events, {refused} not 200, {:.2} s)",
        a.webhooks as f64 / took,
        (a.webhooks * a.events) as f64 / took,
        a.webhooks,
        a.events,
        took
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let base = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("spool-bench-{}", std::process::id())),
    };
    for &c in &a.concurrency {
        let dir = base.join(format!("c{c}"));
        let _ = std::fs::remove_dir_all(&dir);
        if a.http {
            run_http(dir.clone(), &a, c.max(1)).await?;
        } else {
            run(dir.clone(), &a, c.max(1)).await?;
        }
        std::fs::remove_dir_all(&dir)?;
    }
    let _ = std::fs::remove_dir(&base);
    Ok(())
}
