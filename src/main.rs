//! The `pusher-bridge` command: parses the command line and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pusher_bridge::config::{self, Settings};
use pusher_bridge::{probe, sendtest};

/// mimalloc instead of the system allocator: the webhook path allocates small, short-lived
/// buffers per event (message bodies, subjects, NATS headers); glibc malloc cost about a sixth
/// of the bridge's CPU under load, mimalloc a fraction of that (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Receives Pusher Channels webhooks and publishes every event to NATS JetStream or RabbitMQ.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (else $PUSHER_BRIDGE_CONFIG, else config/pusher-bridge.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Trim old events and dead letters ([retention]); without --once, on schedule until stopped.
    Sweep {
        /// Run one sweep of every enabled target, print what it purged, and exit.
        #[arg(long)]
        once: bool,
        /// Count what would be purged and remove nothing (needs no lease).
        #[arg(long, requires = "once")]
        dry_run: bool,
    },
    /// Sign sample webhooks with the first configured app and post them (a smoke test).
    SendTest {
        /// Where to post (default: http://<server.listen><server.webhook_path>).
        #[arg(long)]
        url: Option<String>,
        /// One event type, or `all` (one webhook per event type).
        #[arg(long, default_value = "all")]
        event: String,
    },
    /// Probe the running bridge: GET /healthz on the configured listen address, exit 0 or 1.
    Healthcheck {
        /// Probe /readyz (can make events durable) instead of /healthz (process alive).
        #[arg(long)]
        ready: bool,
        /// Give up after this long (humantime, e.g. `3s`).
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show, replay or purge the dead letters of the configured broker.
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// List the records the drainer set aside in the spool's quarantine.log (the next start
    /// takes them back onto the spool).
    Quarantine,
    /// Show the channel state ([state]) read from its KV bucket.
    State {
        #[command(subcommand)]
        action: StateCommand,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// The occupied channels, with subscription count and (presence) user count.
    Channels {
        /// App id (default: the first configured app).
        #[arg(long)]
        app: Option<String>,
        /// Only channels whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// The members of a presence channel, one user id per line.
    Members {
        /// The channel, e.g. presence-room-1.
        channel: String,
        /// App id (default: the first configured app).
        #[arg(long)]
        app: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show the dead letters (removes nothing).
    List {
        /// Print one JSON array with every field, the body included.
        #[arg(long)]
        json: bool,
    },
    /// Publish the dead letters to their original subjects; exit 0 only when none is left.
    Replay,
    /// Remove the dead letters that match every filter given (with none, --all); the others
    /// stay in place and in order.
    Purge {
        /// Only letters of this reason: malformed, no_stream, too_large, rejected, nacked,
        /// unroutable or full.
        #[arg(long, value_name = "R")]
        reason: Option<String>,
        /// Only letters of this app id.
        #[arg(long, value_name = "ID")]
        app: Option<String>,
        /// Only letters whose first failure (as `dlq list` shows it) is older than this
        /// (humantime, e.g. `7d`, `90m`).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Remove every dead letter (needed when no filter is given, and goes with none).
        #[arg(long)]
        all: bool,
        /// Count what would be removed and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn load(cli_path: Option<&PathBuf>) -> anyhow::Result<Settings> {
    let path = config::resolve_path(cli_path.map(PathBuf::as_path));
    Ok(Settings::load(path.as_deref())?)
}

fn init_logs(settings: &Settings) {
    pusher_bridge::logging::init(settings);
}

/// Loads the configuration again on every SIGHUP (file, environment, `*_file`s) and sends the
/// result to the server, which applies it or keeps the running one. Without this handler a
/// SIGHUP would end the process (exit 129). Off the runtime: reading files blocks.
fn reloads_on_sighup(
    cli_path: Option<PathBuf>,
) -> anyhow::Result<tokio::sync::mpsc::Receiver<pusher_bridge::reload::Loaded>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    #[cfg(unix)]
    {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: loading the configuration again");
                let path = cli_path.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let path = config::resolve_path(path.as_deref());
                    Settings::load(path.as_deref())
                })
                .await;
                let loaded = match loaded {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: loading the configuration failed (the running one stays)");
                        continue;
                    }
                };
                if tx.send(loaded).await.is_err() {
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop((tx, cli_path));
    Ok(rx)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => check_config(cli.config.as_ref()),
        Command::Serve => serve(cli.config.as_ref()),
        Command::Dlq { action } => dlq(cli.config.as_ref(), action),
        Command::SendTest { url, event } => send_test(cli.config.as_ref(), url, &event),
        Command::Healthcheck { ready, timeout } => healthcheck(cli.config.as_ref(), ready, timeout),
        Command::Sweep { once, dry_run } => sweep(cli.config.as_ref(), once, dry_run),
        Command::State { action } => state(cli.config.as_ref(), action),
        Command::Quarantine => quarantine(cli.config.as_ref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pusher-bridge: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-joined like `{:#}`, each cause once: the library's messages
/// already end with the client error they keep as their source, so a cause whose text the
/// one before it contains is left out.
fn report(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if previous.is_empty() || !previous.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
        previous = cause;
    }
    text
}

fn quarantine(path: Option<&PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    let dir = &settings.spool.dir;
    let lines = pusher_bridge::spool::quarantine_lines(dir)?;
    for line in &lines {
        println!("{line}");
    }
    println!(
        "{} record(s) in {}; the bridge's next start takes them back onto the spool",
        lines.len(),
        dir.join(pusher_bridge::spool::QUARANTINE_FILE).display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn check_config(path: Option<&PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    print!("{}", settings.to_redacted_toml());
    Ok(std::process::ExitCode::SUCCESS)
}

/// The runtime of `serve`, as `server.worker_threads` asks: 1 one thread (the default), 0 one
/// worker per core, n > 1 n workers.
fn server_runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    match worker_threads {
        1 => small_runtime(),
        0 => multi_thread_runtime(None),
        n => multi_thread_runtime(Some(n)),
    }
}

/// Exit code of `dlq replay` when dead letters are left (1 stays for errors).
const EXIT_LETTERS_LEFT: u8 = 2;

fn dlq(path: Option<&PathBuf>, action: DlqCommand) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    let runtime = multi_thread_runtime(Some(2))?;
    match action {
        DlqCommand::List { json } => {
            runtime.block_on(pusher_bridge::dlq::print_list(&settings, json))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        DlqCommand::Purge {
            reason,
            app,
            older_than,
            all,
            dry_run,
        } => {
            // Arguments are checked here rather than by clap so that a bad one exits 1 with the
            // other errors (clap's usage errors exit 2), as the interface fixes.
            let filter = pusher_bridge::dlq::PurgeFilter::from_args(
                reason.as_deref(),
                app,
                older_than.as_deref(),
                all,
            )?;
            let n = runtime.block_on(pusher_bridge::dlq::purge(&settings, &filter, dry_run))?;
            println!("{}", pusher_bridge::dlq::purge_line(n, dry_run));
            Ok(std::process::ExitCode::SUCCESS)
        }
        DlqCommand::Replay => {
            let bar = pusher_bridge::dlq::progress_bar();
            let summary = runtime.block_on(pusher_bridge::dlq::replay(&settings, &bar))?;
            print!("{}", summary.report());
            Ok(if summary.all_replayed() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(EXIT_LETTERS_LEFT)
            })
        }
    }
}

/// The runtime of the server, the sweeper and the dlq tools: `workers` threads (default: one
/// per core).
fn multi_thread_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A one-thread runtime: the one-shot probes (`send-test`, `healthcheck`) and, by default, the
/// server (`server.worker_threads = 1`).
fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn send_test(
    path: Option<&PathBuf>,
    url: Option<String>,
    event: &str,
) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    let selection: sendtest::Selection = event.parse()?;
    let context = sendtest::BrokerContext::of(&settings, url.is_some());
    let (url, results) =
        small_runtime()?.block_on(sendtest::send_test(&settings, url.as_deref(), &selection))?;
    for r in &results {
        println!("{r}");
    }
    let accepted = results.iter().filter(|r| r.accepted()).count();
    println!("{accepted} of {} webhooks accepted by {url}", results.len());
    let verdict = sendtest::Verdict::of(&results);
    if let Some(why) = verdict.explanation(&context) {
        println!("{why}");
    }
    Ok(std::process::ExitCode::from(verdict.exit_code()))
}

fn healthcheck(
    path: Option<&PathBuf>,
    ready: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    let probe_path = if ready { "/readyz" } else { "/healthz" };
    let (url, answer) =
        small_runtime()?.block_on(probe::healthcheck(&settings, probe_path, timeout))?;
    if answer.status == hyper::StatusCode::OK {
        println!("{url}: {}", answer.status);
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!("{url}: {} {}", answer.status, answer.body.trim_end());
        Ok(std::process::ExitCode::FAILURE)
    }
}

fn serve(path: Option<&PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    init_logs(&settings);
    let runtime = server_runtime(settings.server.worker_threads)?;
    runtime.block_on(async {
        let addr = settings.listen_addr()?;
        let listener = pusher_bridge::http::bind(addr, settings.server.max_connections)
            .with_context(|| format!("cannot listen on {addr}"))?;
        let admin = match settings.admin_addr()? {
            Some(addr) => Some(
                pusher_bridge::http::bind(addr, settings.server.max_connections)
                    .with_context(|| format!("cannot listen on {addr} (server.admin_listen)"))?,
            ),
            None => None,
        };
        let extras = pusher_bridge::Extras {
            admin,
            reloads: Some(reloads_on_sighup(path.cloned())?),
        };
        pusher_bridge::run_with(listener, extras, settings, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn sweep(
    path: Option<&PathBuf>,
    once: bool,
    dry_run: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use pusher_bridge::sweeper::{self, Sweeper, Target, TargetOutcome};
    let settings = load(path)?;
    if !once {
        init_logs(&settings);
    }
    let runtime = multi_thread_runtime(None)?;
    runtime.block_on(async {
        let settings = std::sync::Arc::new(settings);
        let metrics = std::sync::Arc::new(pusher_bridge::metrics::Metrics::new());
        let mut sweeper = Sweeper::new(settings, metrics).await?;
        if !once {
            let (stop, listener) = pusher_bridge::shutdown::channel();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.trigger();
            });
            sweeper::run_loop(sweeper, listener).await;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let results = sweeper.sweep_once(&Target::ALL, dry_run).await;
        sweeper.release().await;
        let mut failed = false;
        for (target, outcome) in &results {
            println!("{}", outcome.describe(*target));
            failed |= matches!(outcome, TargetOutcome::Failed(_));
        }
        Ok(if failed {
            std::process::ExitCode::FAILURE
        } else {
            std::process::ExitCode::SUCCESS
        })
    })
}

fn state(path: Option<&PathBuf>, action: StateCommand) -> anyhow::Result<std::process::ExitCode> {
    use pusher_bridge::state::client;
    let settings = load(path)?;
    // With the state off no bridge of this configuration keeps the bucket: an empty listing
    // (or one read from a bucket another configuration left) would pass for "nobody here".
    if !settings.state.enabled {
        anyhow::bail!(
            "channel state is off: set [state] enabled = true (PUSHER_BRIDGE_STATE__ENABLED=true) \
             in the bridge's configuration and in the one this command reads"
        );
    }
    let app = |app: Option<String>| {
        client::app_or_first(&settings, app.as_deref())
            .context("no --app given and no [[apps]] configured")
    };
    let lines = match action {
        StateCommand::Channels { app: id, prefix } => {
            let id = app(id)?;
            small_runtime()?.block_on(client::channel_lines(&settings, &id, &prefix))?
        }
        StateCommand::Members { channel, app: id } => {
            let id = app(id)?;
            small_runtime()?.block_on(client::member_lines(&settings, &id, &channel))?
        }
    };
    for line in lines {
        println!("{line}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
