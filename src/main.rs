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
    /// Show or replay the dead letters of the configured broker.
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
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
        Command::Dlq { action } => dlq(cli.config.as_ref(), action),
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

/// Exit code of `dlq replay` when dead letters are left (1 stays for errors).
const EXIT_LETTERS_LEFT: u8 = 2;

fn dlq(path: Option<&PathBuf>, action: DlqCommand) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match action {
        DlqCommand::List { json } => {
            runtime.block_on(pusher_bridge::dlq::print_list(&settings, json))?;
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
