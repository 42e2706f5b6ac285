//! Benchmark driver and load generator for pusher-bridge (run it through `bench/run.sh`).
//!
//! For one broker (`--broker nats|amqp|null`) it writes a config with a unique stream / queue
//! for the run, starts the release binary, measures start-up time to `/healthz` 200 and idle RSS,
//! posts signed webhooks from `--connections` keep-alive connections (warm-up, then a measured
//! window; bounded in time and count; loopback only), reads the bridge's CPU time and peak RSS
//! from `/proc`, stops the bridge, then counts what the broker stored for the run and removes the
//! run's topology. It prints a table row and, with `--json FILE`, appends the figures as one JSON
//! line. Exit code 1 when any webhook was not answered 2xx or the stored count differs from the
//! acknowledged events.

mod bodies;
mod brokers;
mod client;
mod procfs;
mod table;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use brokers::{Kind, Names};

const APP_ID: &str = "424242";
const APP_KEY: &str = "bench-key";
const WEBHOOK_PATH: &str = "/pusher/webhooks";

/// Benchmark driver and load generator for pusher-bridge.
#[derive(Parser, Debug)]
enum Cli {
    /// Starts the bridge against one broker, loads it, measures, verifies.
    Run(Box<Args>),
    /// Prints the JSON lines of earlier runs as a Markdown table.
    Table {
        /// The file `run --json` appended to.
        file: PathBuf,
    },
}

/// Benchmarks the bridge against one broker.
#[derive(clap::Args, Debug)]
struct Args {
    /// Which broker the bridge publishes to (`null` needs the `bench-null-broker` build).
    #[arg(long, value_enum)]
    broker: Kind,
    /// The bridge binary.
    #[arg(long, default_value = "target/release/pusher-bridge")]
    bridge_bin: PathBuf,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Unmeasured warm-up.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Upper bound on webhooks over the whole run (warm-up included).
    #[arg(long, default_value_t = 1_500_000)]
    max_webhooks: u64,
    /// Threads of the load generator's runtime (it shares the machine with the bridge).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// NATS server for the bridge and for counting.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// RabbitMQ for the bridge and for counting.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Append the figures as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Record a CPU profile of the bridge (`perf record --call-graph dwarf`) to this file during
    /// the load.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// The broker server's pid (nats-server, beam.smp), to report its CPU time too.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Extra `PUSHER_BRIDGE_*` settings for the bridge, as KEY=VALUE (repeatable).
    #[arg(long = "env")]
    envs: Vec<String>,
    /// A label for the table row (e.g. "before" / "after").
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> ExitCode {
    let args = match Cli::parse() {
        Cli::Run(args) => *args,
        Cli::Table { file } => return table::print(&file),
    };
    let runtime = match args.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    match runtime.block_on(bench(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: {e}");
            emit(
                &args,
                &serde_json::json!({"broker": kind_name(args.broker), "label": args.label, "error": e}),
            );
            ExitCode::FAILURE
        }
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Nats => "nats",
        Kind::Amqp => "amqp",
        Kind::Null => "null",
    }
}

fn emit(args: &Args, value: &serde_json::Value) {
    if let Some(path) = &args.json {
        let line = format!("{value}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
}

/// The run's config: unique stream / queue names, retention sweeps off, quiet logs.
fn config(args: &Args, names: &Names, listen: SocketAddr, secret: &str, dir: &Path) -> String {
    format!(
        r#"[server]
listen = "{listen}"
webhook_path = "{WEBHOOK_PATH}"

[[apps]]
id = "{APP_ID}"
key = "{APP_KEY}"
secret = "{secret}"

[broker]
kind = "{kind}"
subject_prefix = "{prefix}"

[broker.nats]
url = "{nats}"
stream = "{stream}"
dlq_stream = "{dlq_stream}"

[broker.amqp]
url = "{amqp}"
exchange = "{exchange}"
queue = "{queue}"
dlq_exchange = "{dlq_exchange}"
dlq_queue = "{dlq_queue}"

[spool]
dir = "{spool}"

[retention.events]
enabled = false

[retention.dlq]
enabled = false

[log]
level = "warn"
"#,
        kind = kind_name(args.broker),
        prefix = names.prefix,
        nats = args.nats_url,
        stream = names.stream,
        dlq_stream = names.dlq_stream,
        amqp = args.amqp_url,
        exchange = names.exchange,
        queue = names.queue,
        dlq_exchange = names.dlq_exchange,
        dlq_queue = names.dlq_queue,
        spool = dir.join("spool").display(),
    )
}

/// A free loopback port (bound and released; the bridge binds it a moment later).
fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

/// Status code of `GET path`, or `None` when nothing answers yet.
async fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Mean of the Prometheus histogram `name` (its `_sum` over its `_count`) on the bridge's
/// `/metrics`, in milliseconds: how long the bridge itself spent, as opposed to the client's view.
async fn histogram_mean_ms(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let value = |suffix: &str| {
        let key = format!("{name}{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(value("_sum")? * 1000.0 / value("_count")?.max(1.0))
}

/// The last lines of the bridge's log, to show why it stopped.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Stops the bridge like an orchestrator would (SIGTERM, then SIGKILL after 10 s).
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until `path` answers `want`, failing early when the bridge exits.
async fn wait_for(
    child: &mut Child,
    addr: SocketAddr,
    path: &str,
    want: u16,
    timeout: Duration,
    log: &Path,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if get_status(addr, path).await == Some(want) {
            return Ok(start.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("bridge exited ({status}): {}", log_tail(log)));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "{path} not {want} after {timeout:?}: {}",
                log_tail(log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn bench(args: &Args) -> Result<bool, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let id = format!("{}{:06}", std::process::id(), nanos.subsec_micros());
    let names = Names::new(&id);
    let secret = format!("bench-secret-{id}");
    let dir = std::env::temp_dir().join(format!("pusher-bridge-bench-{id}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let addr = free_port()?;
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config(args, &names, addr, &secret, &dir))
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let log_path = dir.join("bridge.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;

    let mut cmd = Command::new(&args.bridge_bin);
    cmd.arg("serve").arg("--config").arg(&config_path);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PUSHER_BRIDGE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for kv in &args.envs {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--env {kv}: expected KEY=VALUE"))?;
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let spawned = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.bridge_bin.display()))?;
    let pid = child.id();
    let outcome = async {
        let ten = Duration::from_secs(10);
        wait_for(&mut child, addr, "/healthz", 200, ten, &log_path).await?;
        let startup = spawned.elapsed();
        wait_for(
            &mut child,
            addr,
            "/readyz",
            200,
            Duration::from_secs(20),
            &log_path,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle_rss, _) = procfs::memory_kb(pid).ok_or("bridge gone")?;
        let perf = match &args.perf {
            Some(out) => Some(
                Command::new("perf")
                    .args(["record", "--call-graph", "dwarf,32768", "-F", "1999", "-o"])
                    .arg(out)
                    .args(["-p", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("cannot start perf: {e}"))?,
            ),
            None => None,
        };
        let report = client::run(client::LoadSpec {
            addr,
            path: WEBHOOK_PATH.into(),
            key: APP_KEY.into(),
            generator: bodies::Generator::new(
                &secret,
                1_700_000_000_000 + nanos.as_secs() % 1_000_000,
            ),
            connections: args.connections,
            warmup: args.warmup,
            duration: args.duration,
            max_webhooks: args.max_webhooks,
            pid,
            broker_pid: args.broker_pid,
        })
        .await;
        if let Some(mut p) = perf {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(p.id().to_string())
                .status();
            let _ = p.wait();
        }
        let (_, peak_rss) = procfs::memory_kb(pid).ok_or("bridge gone")?;
        let inside = [
            histogram_mean_ms(addr, "pusher_bridge_webhook_duration_seconds").await,
            histogram_mean_ms(addr, "pusher_bridge_publish_duration_seconds").await,
        ];
        Ok::<_, String>((startup, idle_rss, peak_rss, report, inside))
    }
    .await;
    stop(&mut child);
    let (startup, idle_rss, peak_rss, report, inside) = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ =
                brokers::count_and_clean(args.broker, &names, &args.nats_url, &args.amqp_url).await;
            return Err(e);
        }
    };
    let stored =
        brokers::count_and_clean(args.broker, &names, &args.nats_url, &args.amqp_url).await;
    let _ = std::fs::remove_dir_all(&dir);

    let secs = report.measured.as_secs_f64();
    let non_2xx: u64 = report.non_2xx.values().sum();
    let (stored_events, stored_dlq, store_error) = match &stored {
        Ok(Some((e, d))) => (Some(*e), Some(*d), None),
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e.clone())),
    };
    let every_event_stored = match stored_events {
        Some(n) => n == report.events_ok && stored_dlq == Some(0),
        None => args.broker == Kind::Null,
    };
    let ok = non_2xx == 0 && report.errors == 0 && every_event_stored && store_error.is_none();
    let per_1k = |c: Option<Duration>| {
        c.map(|c| c.as_secs_f64() * 1000.0 / report.measured_events.max(1) as f64)
    };
    let cpu_per_1k = per_1k(report.cpu);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let result = serde_json::json!({
        "broker": kind_name(args.broker),
        "label": args.label,
        "connections": args.connections,
        "measured_s": secs,
        "webhooks": report.measured_webhooks,
        "events": report.measured_events,
        "webhooks_per_s": report.measured_webhooks as f64 / secs,
        "events_per_s": report.measured_events as f64 / secs,
        "p50_ms": report.latency_ms(0.50),
        "p99_ms": report.latency_ms(0.99),
        "p999_ms": report.latency_ms(0.999),
        "max_ms": report.latency_ms(1.0),
        "mean_ms": report.latencies_us.iter().map(|&l| f64::from(l)).sum::<f64>()
            / report.latencies_us.len().max(1) as f64 / 1000.0,
        "bridge_webhook_mean_ms": inside[0],
        "bridge_publish_mean_ms": inside[1],
        "peak_rss_mb": peak_rss as f64 / 1024.0,
        "idle_rss_mb": idle_rss as f64 / 1024.0,
        "startup_ms": startup.as_secs_f64() * 1000.0,
        "cpu_s_per_1k_events": cpu_per_1k,
        "broker_cpu_s_per_1k_events": per_1k(report.broker_cpu),
        "loadgen_cpu_s_per_1k_events": per_1k(report.own_cpu),
        "bridge_cores": report.cpu.map(|c| c.as_secs_f64() / secs),
        "broker_cores": report.broker_cpu.map(|c| c.as_secs_f64() / secs),
        "loadgen_cores": report.own_cpu.map(|c| c.as_secs_f64() / secs),
        "loadavg_after": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "webhooks_ok": report.webhooks_ok,
        "events_ok": report.events_ok,
        "non_2xx": report.non_2xx.iter().map(|(s, n)| (s.to_string(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
        "errors": report.errors,
        "first_error": report.first_error,
        "stored_events": stored_events,
        "stored_dead_letters": stored_dlq,
        "store_error": store_error,
        "every_event_stored": every_event_stored,
        "ok": ok,
    });
    println!(
        "{:<5} {:>9.0} webhooks/s {:>9.0} events/s  p50 {:>6.2} ms  p99 {:>6.2} ms  peak RSS {:>5.1} MB  idle RSS {:>5.1} MB  start-up {:>5.1} ms  CPU {:.4} s/1k events  non-2xx {}  errors {}  stored {}/{}{}",
        kind_name(args.broker),
        report.measured_webhooks as f64 / secs,
        report.measured_events as f64 / secs,
        report.latency_ms(0.50),
        report.latency_ms(0.99),
        peak_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        startup.as_secs_f64() * 1000.0,
        cpu_per_1k.unwrap_or(f64::NAN),
        non_2xx,
        report.errors,
        stored_events.map_or("-".into(), |n| n.to_string()),
        report.events_ok,
        if ok { "" } else { "  FAILED" },
    );
    let cores =
        |c: Option<Duration>| c.map_or("-".into(), |c| format!("{:.2}", c.as_secs_f64() / secs));
    println!(
        "      cores used: bridge {}  broker {}  load generator {}  (load average after: {})",
        cores(report.cpu),
        cores(report.broker_cpu),
        cores(report.own_cpu),
        loadavg.trim()
    );
    if let Some(e) = &store_error {
        eprintln!("loadgen: counting stored messages failed: {e}");
    }
    emit(args, &result);
    Ok(ok)
}
