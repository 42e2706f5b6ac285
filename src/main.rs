//! The `pusher-bridge` command: parses the command line and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pusher_bridge::config::{self, LogFormat, Settings};

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
        Command::Sweep { once, dry_run } => sweep(cli.config.as_ref(), once, dry_run),
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

fn serve(path: Option<&PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    init_logs(&settings);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
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
