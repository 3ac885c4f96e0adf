//! The command line: `run` (the always-on bridge and its HTTP API), `sync` (one pass, then
//! exit), `check`, `status`, `pause` and `resume` (ask a running bridge's API).

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::engine::policy::Mode;
use crate::engine::scheduler::{Passes, Schedule};
use crate::engine::{Engine, pipeline};
use crate::record::Side;
use anyhow::{Context, Result, bail};
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
    #[arg(long, short, env = "SYNCBRIDGE_CONFIG", global = true)]
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
    /// Conflicts: list parked (or decided) ones, show one, resolve one.
    Conflicts {
        /// What to do.
        #[command(subcommand)]
        action: ConflictAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Records that could not be synced: list them, retry or discard them.
    Failed {
        /// What to do.
        #[command(subcommand)]
        action: FailedAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Measure latency, throughput, catch-up, sweep cost and memory on a store pair.
    Bench(crate::bench::BenchArgs),
    /// Print the status of a running bridge (its `GET /api/sync/status`).
    Status {
        /// The bridge's API; default `http://` + `api.bind` from the config.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Pause a running bridge (the offline switch): changes are captured and held, nothing is
    /// applied until `resume`. It stays paused across restarts.
    Pause {
        /// The bridge's API; default `http://` + `api.bind` from the config.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Resume a paused bridge: the held changes are applied oldest first.
    Resume {
        /// The bridge's API; default `http://` + `api.bind` from the config.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// What to do with conflicts.
#[derive(Subcommand, Debug)]
pub enum ConflictAction {
    /// List parked conflicts (or decided ones, with --resolved).
    List {
        /// Decided conflicts with their losing versions (the audit) instead of parked ones.
        #[arg(long)]
        resolved: bool,
    },
    /// Show one conflict with both versions and the base.
    Show {
        /// Conflict id.
        id: i64,
    },
    /// Resolve a parked conflict: keep one side's version, or write a document to both.
    Resolve {
        /// Conflict id.
        id: i64,
        /// Keep this side's version: local or cloud.
        #[arg(long, conflicts_with = "doc")]
        take: Option<Side>,
        /// Write this JSON document to both sides.
        #[arg(long)]
        doc: Option<String>,
    },
}

/// What to do with the retry queue.
#[derive(Subcommand, Debug)]
pub enum FailedAction {
    /// List queued records (dead letters, or all with --all).
    List {
        /// Include records still being retried, not only dead letters.
        #[arg(long)]
        all: bool,
    },
    /// Put a record (`collection/id`) back in line for an attempt now.
    Retry {
        /// `collection/id`.
        key: String,
    },
    /// Drop a record (`collection/id`) from the queue for good.
    Discard {
        /// `collection/id`.
        key: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    crate::stores::install_tls_provider();
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
            run(Config::load(c.config.as_deref())?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { url, config } => {
            let config = Config::load(config.config.as_deref())?;
            call_api(&config, url, reqwest::Method::GET, "/api/sync/status").await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { url, config } => {
            let config = Config::load(config.config.as_deref())?;
            call_api(&config, url, reqwest::Method::POST, "/api/sync/pause").await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { url, config } => {
            let config = Config::load(config.config.as_deref())?;
            call_api(&config, url, reqwest::Method::POST, "/api/sync/resume").await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync {
            mode,
            incremental,
            config,
        } => {
            let engine = Engine::open(Config::load(config.config.as_deref())?).await?;
            // Preparing takes table locks; against live writers it can lose a deadlock.
            let mut attempt = 1;
            while let Err(e) = engine.prepare().await {
                if attempt == 5 || !crate::stores::is_transient(&e) {
                    return Err(e);
                }
                tracing::warn!(error = %format!("{e:#}"), attempt, "preparing the stores deadlocked; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                attempt += 1;
            }
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
        Command::Conflicts { action, config } => {
            let config = Config::load(config.config.as_deref())?;
            conflicts(config, action).await
        }
        Command::Failed { action, config } => {
            // The queue lives in the data directory: no store connection is needed.
            let config = Config::load(config.config.as_deref())?;
            let state = crate::engine::state::StateDb::open(&config.data_dir).await?;
            let queue =
                crate::engine::queue::RetryQueue::open(state.pool(), retry_policy(&config)).await?;
            match action {
                FailedAction::List { all } => {
                    let entries = queue.list(!all, 1000).await?;
                    if entries.is_empty() {
                        println!("nothing queued");
                    }
                    for e in entries {
                        println!(
                            "{}  {}  attempts {}  first failed {}  {}",
                            e.key,
                            if e.dead { "dead" } else { "pending" },
                            e.attempts,
                            crate::record::format_ts(e.first_failed_ms),
                            e.last_error
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                FailedAction::Retry { key } | FailedAction::Discard { key }
                    if !key.contains('/') =>
                {
                    anyhow::bail!(
                        "{key:?} is not a queue key: use collection/id, as `syncbridge failed list` prints"
                    )
                }
                FailedAction::Retry { key } => {
                    let found = queue.retry(&key).await?;
                    Ok(report_found(found, "queued for an attempt now"))
                }
                FailedAction::Discard { key } => {
                    let found = queue.discard(&key).await?;
                    Ok(report_found(found, "discarded"))
                }
            }
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

fn retry_policy(config: &Config) -> crate::engine::queue::RetryPolicy {
    crate::engine::queue::RetryPolicy::from_config(&config.sync)
}

/// Runs the pipeline, the HTTP API and the cron schedule until a signal; if one of them fails
/// the others are stopped too.
async fn run(config: Config) -> Result<()> {
    let api_config = config.api.clone();
    let schedule = config
        .sync
        .schedule
        .as_deref()
        .map(Schedule::new)
        .transpose()?
        .map(Arc::new);
    // Bind before anything else starts, so a taken port fails fast and says so.
    let listener = if api_config.enabled {
        Some(api::bind(&api_config.bind).await?)
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    // Waits for stores that are not up yet; the tables exist before the first API request.
    let Some(engine) = pipeline::open_when_ready(config, &shutdown).await? else {
        return Ok(());
    };
    let engine = Arc::new(engine);
    let passes = Arc::new(Passes::default());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = listener {
        let state = ApiState::open(
            engine.clone(),
            passes.clone(),
            schedule.clone(),
            &api_config,
        )
        .await?;
        tasks.spawn(api::serve(listener, api::router(state), shutdown.clone()));
    }
    if let Some(schedule) = schedule {
        let (engine, passes, shutdown) = (engine.clone(), passes.clone(), shutdown.clone());
        tasks.spawn(async move {
            schedule.run(engine, passes, shutdown).await;
            Ok(())
        });
    }
    tasks.spawn(pipeline::run(engine, shutdown.clone()));
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let outcome = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        } else if !shutdown.is_cancelled() {
            // The pipeline returned on its own; stop the API and schedule with it.
            shutdown.cancel();
        }
    }
    result
}

/// Calls a running bridge's API at `path` (with the configured token) and prints the JSON reply
/// pretty; `status`, `pause` and `resume` are this.
async fn call_api(
    config: &Config,
    url: Option<String>,
    method: reqwest::Method,
    path: &str,
) -> Result<()> {
    let base = match url {
        Some(u) => u,
        None => {
            let bind = config
                .api
                .bind
                .replace("0.0.0.0", "127.0.0.1")
                .replace("[::]", "[::1]");
            format!("http://{bind}")
        }
    };
    let endpoint = format!("{}{path}", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .context("cannot build the HTTP client")?;
    let mut req = client.request(method, &endpoint);
    if let Some(token) = &config.api.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.with_context(|| {
        format!("cannot reach the bridge at {endpoint}: is `syncbridge run` running there?")
    })?;
    let code = resp.status();
    let body = resp
        .text()
        .await
        .context("cannot read the bridge's reply")?;
    if !code.is_success() {
        bail!("{endpoint} answered {code}: {body}");
    }
    let value: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{endpoint} did not answer JSON"))?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `syncbridge conflicts ...`: reads the log in the data directory; resolving also connects to
/// both stores (conditional writes make that safe beside a running bridge).
async fn conflicts(config: Config, action: ConflictAction) -> Result<ExitCode> {
    use crate::engine::conflicts::{ConflictLog, Resolution};
    let print = |e: &crate::engine::conflicts::ConflictEntry| -> Result<()> {
        println!("{}", serde_json::to_string_pretty(e)?);
        Ok(())
    };
    match action {
        ConflictAction::List { resolved } => {
            let state = crate::engine::state::StateDb::open(&config.data_dir).await?;
            let entries = ConflictLog::open(state.pool())
                .await?
                .list(resolved, 1000)
                .await?;
            if entries.is_empty() {
                println!(
                    "{}",
                    if resolved {
                        "no decided conflicts in the log"
                    } else {
                        "no parked conflicts"
                    }
                );
            }
            for e in entries {
                println!(
                    "{}  {}/{}  {}  {}{}",
                    e.id,
                    e.collection,
                    e.record_id,
                    e.policy,
                    e.status,
                    e.winner.map(|w| format!(" ({w} won)")).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ConflictAction::Show { id } => {
            let state = crate::engine::state::StateDb::open(&config.data_dir).await?;
            match ConflictLog::open(state.pool()).await?.get(id).await? {
                Some(e) => {
                    print(&e)?;
                    Ok(ExitCode::SUCCESS)
                }
                None => bail!("no conflict {id}"),
            }
        }
        ConflictAction::Resolve { id, take, doc } => {
            let how = match (take, doc) {
                (Some(side), None) => Resolution::Take(side),
                (None, Some(text)) => {
                    Resolution::Doc(serde_json::from_str(&text).context("--doc is not valid JSON")?)
                }
                _ => bail!("give --take local|cloud or --doc JSON"),
            };
            let engine = Engine::open(config).await?;
            let e = engine.resolve_conflict(id, how).await?;
            print(&e)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints what happened to a queue key, failing when it was not queued.
fn report_found(found: bool, done: &str) -> ExitCode {
    println!("{}", if found { done } else { "not in the queue" });
    if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
