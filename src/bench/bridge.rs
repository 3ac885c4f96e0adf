//! The bridge under test, run as a child process (the same binary, `syncbridge run` or
//! `syncbridge sync`) with a generated config and its own temporary data directory, so the
//! bench measures the real thing, start-up included, and can read its memory from `/proc`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// One bridge configuration: a store pair, a collection, a data directory.
pub struct BridgeSetup {
    /// The syncbridge binary.
    pub bin: PathBuf,
    /// The generated config file.
    pub config: PathBuf,
    /// The data directory (state db, instance id, logs).
    pub dir: PathBuf,
}

impl BridgeSetup {
    /// Writes a config for `collection` between the two stores into a fresh directory
    /// under `root`.
    pub fn new(
        bin: &Path,
        root: &Path,
        local: &str,
        cloud: &str,
        collection: &str,
    ) -> Result<Self> {
        let dir = root.join(collection);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let text = format!(
            "data_dir = {}\n[local]\nuri = {}\n[cloud]\nuri = {}\n[sync]\ncollections = [{}]\nmode = \"both\"\n[api]\nenabled = false\n",
            q(&dir.join("data").to_string_lossy()),
            q(local),
            q(cloud),
            q(collection)
        );
        let config = dir.join("syncbridge.toml");
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        Ok(BridgeSetup {
            bin: bin.to_path_buf(),
            config,
            dir,
        })
    }

    /// Turns the bridge's HTTP API on, listening on `bind` (`host:port`), for the
    /// browser-protocol phase; every other phase runs without it.
    pub fn serve_api(&self, bind: &str) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let bind = serde_json::to_string(bind)?;
        let text = text.replace(
            "[api]\nenabled = false\n",
            &format!("[api]\nenabled = true\nbind = {bind}\n"),
        );
        std::fs::write(&self.config, text)
            .with_context(|| format!("cannot write {}", self.config.display()))
    }

    fn command(&self, args: &[&str], log: &str) -> Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            // SYNCBRIDGE_BENCH_LOG sets the bridge's log filter, to look inside a slow run.
            .env(
                "SYNCBRIDGE_LOG",
                std::env::var("SYNCBRIDGE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Starts `syncbridge run`.
    pub fn start(&self) -> Result<Bridge> {
        let child = self
            .command(&["run"], "run.log")?
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        Ok(Bridge { child })
    }

    /// Runs one `syncbridge sync` pass (incremental when asked) to the end. Returns the pass
    /// as the engine timed it (ms), the wall time of the whole process, its summary line and
    /// its peak RSS in MB.
    pub async fn sync_pass(&self, incremental: bool) -> Result<SyncPass> {
        let mut args = vec!["sync", "--mode", "both"];
        if incremental {
            args.push("--incremental");
        }
        let clock = Instant::now();
        let mut child = self
            .command(&args, "sync.log")?
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().expect("piped stdout");
        let read = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut out = String::new();
            let mut stdout = stdout;
            let _ = stdout.read_to_string(&mut out).await;
            out
        });
        let mut peak = 0.0f64;
        let status = loop {
            peak = peak.max(peak_rss_mb(pid).unwrap_or(0.0));
            match tokio::time::timeout(Duration::from_millis(20), child.wait()).await {
                Ok(s) => break s?,
                Err(_) => continue,
            }
        };
        let wall_ms = clock.elapsed().as_secs_f64() * 1000.0;
        let out = read.await.unwrap_or_default();
        let line = out.lines().next().unwrap_or_default().to_string();
        if !status.success() {
            // The data directory goes when the bench ends: quote the log's last lines.
            let log = std::fs::read_to_string(self.dir.join("sync.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "`syncbridge sync` failed ({status}): {line} (log in {}; its last lines, newest first: {})",
                self.dir.display(),
                tail.join(" | ")
            );
        }
        // "sync both: examined N, …, 123 ms"
        let engine_ms = line
            .rsplit(", ")
            .next()
            .and_then(|s| s.strip_suffix(" ms"))
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(wall_ms);
        Ok(SyncPass {
            engine_ms,
            wall_ms,
            line,
            peak_rss_mb: peak,
        })
    }
}

/// One finished `syncbridge sync` pass.
#[derive(Debug, Clone)]
pub struct SyncPass {
    /// The pass as the engine timed it.
    pub engine_ms: f64,
    /// The whole process: start, connect, prepare, pass, exit.
    pub wall_ms: f64,
    /// The summary line it printed.
    pub line: String,
    /// Its peak resident memory.
    pub peak_rss_mb: f64,
}

impl SyncPass {
    /// A number from the summary line, e.g. `copied to cloud`.
    pub fn count(&self, label: &str) -> u64 {
        self.line
            .split(", ")
            .find_map(|part| {
                let part = part.rsplit(": ").next().unwrap_or(part);
                part.strip_prefix(label)
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    }
}

/// A running `syncbridge run` child.
pub struct Bridge {
    child: Child,
}

impl Bridge {
    /// The peak resident memory so far (VmHWM), in MB.
    pub fn peak_rss_mb(&self) -> f64 {
        self.child.id().and_then(peak_rss_mb).unwrap_or(0.0)
    }

    /// CPU time (user + system) the bridge has used so far, in seconds: a figure that holds
    /// when other work shares the machine, unlike wall-clock rates.
    pub fn cpu_s(&self) -> f64 {
        self.child.id().and_then(cpu_s).unwrap_or(0.0)
    }

    /// Fails if the bridge has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the bridge exited early ({status}); see its run.log");
        }
        Ok(())
    }

    /// Stops the bridge as an operator would (SIGTERM, then a kill after 20 s). Returns its
    /// peak RSS in MB, read just before it exits.
    pub async fn stop(mut self) -> Result<f64> {
        let peak = self.peak_rss_mb();
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(peak)
    }
}

/// utime + stime of a process from `/proc/<pid>/stat`, in seconds (USER_HZ = 100 on Linux).
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// VmHWM of a process, in MB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
