//! Throughput and catch-up: many records written to the source as fast as one client can
//! (batches of 1,000 in one round trip each), timed until every one is on the target.

use super::client::{Client, Row3, doc};
use crate::record::now_ms;
use anyhow::Result;
use std::time::{Duration, Instant};

/// Rows for `n` new records with ids `<prefix><n>`.
pub fn rows(prefix: &str, n: usize) -> Vec<Row3> {
    let ms = now_ms();
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i:08}");
            let body = doc(&id, i as u64, ms);
            (id, body, ms)
        })
        .collect()
}

/// Writes `rows` to the source in batches; returns how long the writes took.
pub async fn write(source: &Client, collection: &str, rows: &[Row3]) -> Result<Duration> {
    let clock = Instant::now();
    for chunk in rows.chunks(1000) {
        source.write_many(collection, chunk, false).await?;
    }
    Ok(clock.elapsed())
}

/// Waits until all `rows` are on the target; returns the moment the last one was seen.
pub async fn wait(target: &Client, collection: &str, rows: &[Row3]) -> Result<Instant> {
    target
        .wait_all(
            collection,
            rows.iter().map(|r| r.0.clone()).collect(),
            Duration::from_millis(50),
            Duration::from_secs(300),
        )
        .await
}
