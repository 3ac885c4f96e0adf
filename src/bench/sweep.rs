//! Sweep cost: both stores hold the same large collection; a few records are changed on one
//! side behind the bridge's back (no bridge running); one incremental reconciliation pass
//! (`syncbridge sync --incremental`, the pass the always-on bridge runs periodically) is timed,
//! and so is a pass with nothing changed.

use super::bridge::{BridgeSetup, SyncPass};
use super::client::{Client, Row3, doc};
use crate::record::now_ms;
use anyhow::{Result, ensure};
use std::time::Instant;

/// What the sweep measurement found.
pub struct SweepRun {
    /// Records on each side.
    pub records: usize,
    /// Seconds the bulk load of both sides took (setup, not measured against a target).
    pub load_s: f64,
    /// The pass with nothing changed.
    pub idle: SyncPass,
    /// Per side changed behind the bridge's back (local first): the pass that repaired it.
    pub changed: Vec<(bool, SyncPass)>,
}

/// Loads `records` identical records into both stores, then measures the passes.
pub async fn run(
    setup: &BridgeSetup,
    local: &Client,
    cloud: &Client,
    collection: &str,
    records: usize,
    changed: usize,
) -> Result<SweepRun> {
    // A first pass over the empty collection leaves the sweep mark later passes start from.
    setup.sync_pass(true).await?;
    let old = now_ms() - 3_600_000;
    let clock = Instant::now();
    let batch = 5000;
    let mut i = 0;
    while i < records {
        let rows: Vec<Row3> = (i..(i + batch).min(records))
            .map(|n| {
                let id = format!("s{n:08}");
                let body = doc(&id, n as u64, old);
                (id, body, old)
            })
            .collect();
        tokio::try_join!(
            local.write_many(collection, &rows, true),
            cloud.write_many(collection, &rows, true)
        )?;
        i += batch;
    }
    // Both sides got the load identically: nothing for the listeners to carry.
    local.clear_log(collection).await?;
    cloud.clear_log(collection).await?;
    let load_s = clock.elapsed().as_secs_f64();

    let idle = setup.sync_pass(true).await?;
    ensure!(
        idle.count("copied to local") + idle.count("copied to cloud") == 0,
        "the idle pass copied records: {}",
        idle.line
    );
    let mut passes = Vec::new();
    for on_local in [true, false] {
        let ms = now_ms();
        let step = (records / changed.max(1)).max(1);
        let rows: Vec<Row3> = (0..changed.min(records))
            .map(|k| {
                let n = k * step;
                let id = format!("s{n:08}");
                let body = doc(&id, n as u64 + 1, ms);
                (id, body, ms)
            })
            .collect();
        let side = if on_local { local } else { cloud };
        for chunk in rows.chunks(1000) {
            side.write_many(collection, chunk, false).await?;
        }
        let pass = setup.sync_pass(true).await?;
        let copied = pass.count(if on_local {
            "copied to cloud"
        } else {
            "copied to local"
        });
        ensure!(
            copied as usize == rows.len(),
            "the pass copied {copied} of {} changed records: {}",
            rows.len(),
            pass.line
        );
        passes.push((on_local, pass));
    }
    Ok(SweepRun {
        records,
        load_s,
        idle,
        changed: passes,
    })
}
