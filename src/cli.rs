//! The command line: `run` (the always-on bridge), `sync` (one pass, then exit), `check`.

use crate::config::Config;
use crate::engine::policy::Mode;
use crate::engine::{Engine, pipeline};
use crate::record::Side;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Keeps two data stores in step, both ways.
#[derive(Parser, Debug)]
#[command(name = "syncbridge", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "SYNCBRIDGE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Config file option shared by every subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// TOML config file; without one the embedded default (two SQLite files under data/) runs.
    #[arg(long, short, env = "SYNCBRIDGE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the bridge until Ctrl-C or SIGTERM.
    Run(ConfigArg),
    /// Run one reconciliation pass over everything, print a summary, and exit.
    Sync {
        /// both, local-to-cloud, cloud-to-local, overwrite-local or overwrite-cloud.
        #[arg(long, default_value = "both")]
        mode: Mode,
        /// Only what changed since the last pass (the bridge's periodic sweep); used by
        /// `syncbridge bench` to time one pass.
        #[arg(long, hide = true)]
        incremental: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Connect to both stores and report what was found.
    Check(ConfigArg),
    /// Measure latency, throughput, catch-up, sweep cost and memory on a store pair.
    Bench(crate::bench::BenchArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCBRIDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(c) => {
            let engine = Arc::new(Engine::open(Config::load(c.config.as_deref())?).await?);
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            pipeline::run(engine, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync {
            mode,
            incremental,
            config,
        } => {
            let engine = Engine::open(Config::load(config.config.as_deref())?).await?;
            engine.prepare().await?;
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {pos} records examined ({per_sec})")
                        .expect("valid progress template"),
                );
                bar
            });
            let report = engine.sweep(mode, !incremental, bar.as_ref()).await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let s = &report.summary;
            println!(
                "sync {mode}: examined {}, copied to local {}, copied to cloud {}, deleted on local {}, \
                 deleted on cloud {}, conflicts {}, skipped by mode {}, errors {}, {} ms",
                s.examined,
                s.copied_to_local,
                s.copied_to_cloud,
                s.deleted_local,
                s.deleted_cloud,
                s.conflicts.len(),
                s.skipped_by_mode,
                s.errors.len(),
                report.duration_ms
            );
            for c in &s.conflicts {
                println!(
                    "  conflict {}/{}: {} won{}",
                    c.collection,
                    c.id,
                    c.winner,
                    if c.tie_break { " (tie-break)" } else { "" }
                );
            }
            for e in &s.errors {
                println!("  error: {e}");
            }
            Ok(if s.errors.is_empty() && s.unfinished == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench(args) => {
            crate::bench::main(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(c) => {
            let config = Config::load(c.config.as_deref())?;
            let engine = Engine::open(config.clone()).await?;
            println!("instance {}", engine.instance_id);
            println!(
                "mode {}; collections {:?}",
                config.sync.mode, config.sync.collections
            );
            for side in [Side::Local, Side::Cloud] {
                let store = engine.store(side);
                let caps = store.capabilities();
                println!(
                    "{side}: {} connected (durable change log: {}, time index: {})",
                    store.describe(),
                    caps.durable_changes,
                    caps.time_index
                );
                for collection in &config.sync.collections {
                    match store.scan(collection, None, None, 1).await {
                        Ok(page) => println!(
                            "  {collection}: {}",
                            if page.records.is_empty() && page.next.is_none() {
                                "empty or not created yet"
                            } else {
                                "has records"
                            }
                        ),
                        Err(e) => println!("  {collection}: not readable yet ({e:#})"),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Cancels `token` on Ctrl-C or SIGTERM.
async fn stop_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot install the SIGTERM handler")
            {
                Ok(t) => t,
                Err(e) => {
                    error!("{e:#}");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("stopping: finishing the batch in flight");
    token.cancel();
}
