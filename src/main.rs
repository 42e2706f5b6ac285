//! The `pusher-bridge` command: parses the command line and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pusher_bridge::config::{self, LogFormat, Settings};

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
}

fn load(cli_path: Option<&PathBuf>) -> anyhow::Result<Settings> {
    let path = config::resolve_path(cli_path.map(PathBuf::as_path));
    Ok(Settings::load(path.as_deref())?)
}

fn init_logs(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pusher-bridge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<&PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    print!("{}", settings.to_redacted_toml());
    Ok(std::process::ExitCode::SUCCESS)
}

/// The async runtime of `serve`, as `server.worker_threads` asks: 1 is a single-threaded
/// runtime, 0 one worker per core, n > 1 n workers.
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(path: Option<&PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    init_logs(&settings);
    let runtime = runtime(settings.server.worker_threads)?;
    runtime.block_on(async {
        let addr = settings.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        pusher_bridge::run(listener, settings, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}
