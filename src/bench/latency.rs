//! Propagation latency: a steady stream of new records written to the source at a fixed rate;
//! each one's latency is from the source acknowledging the write to the record being visible
//! on the target, as the target's own observer sees it.

use super::client::{Client, Pending, doc};
use crate::record::now_ms;
use anyhow::Result;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Histogram bucket upper bounds in ms (a factor of about 1.5 apart, 0.25 ms to 60 s).
pub fn bucket_bounds() -> Vec<f64> {
    let mut b: Vec<f64> = vec![0.25];
    while *b.last().expect("non-empty") < 60_000.0 {
        let next = b.last().expect("non-empty") * 1.5;
        b.push((next * 1000.0).round() / 1000.0);
    }
    b
}

/// Latency figures of one run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LatencyStats {
    /// Writes made.
    pub writes: usize,
    /// Writes seen on the target before the drain deadline.
    pub seen: usize,
    /// Writes per second actually achieved by the writer.
    pub achieved_rate: f64,
    /// Percentiles and maximum, in ms.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Histogram: (bucket upper bound in ms, count).
    pub hist: Vec<(f64, u64)>,
}

/// Writes `rate` records per second for `secs` seconds to `source`, observes them on `target`,
/// and waits up to `drain` after the last write for stragglers.
pub async fn run(
    source: &Client,
    target: &Client,
    collection: &str,
    rate: u32,
    secs: f64,
    drain: Duration,
) -> Result<LatencyStats> {
    let pending: Pending = Arc::default();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let observer = {
        let target = target.clone();
        let (c, p, s) = (collection.to_string(), pending.clone(), stop.clone());
        tokio::spawn(async move { target.observe(c, p, seen_tx, s).await })
    };
    // Let the subscription / LISTEN settle before the first write.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let writes = paced_writes(source, collection, rate, secs, &pending).await?;
    let total = writes.acks.len();
    let deadline = Instant::now() + drain;
    while !pending.lock().expect("pending").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    observer.await??;
    let mut lat: Vec<f64> = Vec::with_capacity(total);
    while let Ok((id, at)) = seen_rx.try_recv() {
        if let Some(ack) = writes.acks.get(&id) {
            lat.push(at.saturating_duration_since(*ack).as_secs_f64() * 1000.0);
        }
    }
    Ok(stats(lat, total, writes.achieved_rate))
}

/// What [`paced_writes`] did.
pub struct PacedWrites {
    /// Each id written, with the moment the source acknowledged the write.
    pub acks: HashMap<String, Instant>,
    /// Writes per second actually achieved.
    pub achieved_rate: f64,
}

/// Writes `rate` new records per second for `secs` seconds to `source` (ids `l<n>`), each id
/// put into `pending` just before its write, so an observer can look for it.
pub async fn paced_writes(
    source: &Client,
    collection: &str,
    rate: u32,
    secs: f64,
    pending: &Pending,
) -> Result<PacedWrites> {
    let total = (rate as f64 * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    // A few writes may be in flight at once, as several application clients would.
    let slots = Arc::new(Semaphore::new(8));
    let start = Instant::now();
    let mut errors = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let permit = slots.clone().acquire_owned().await?;
        let id = format!("l{i:08}");
        pending.lock().expect("pending").insert(id.clone());
        let (source, c, tx) = (source.clone(), collection.to_string(), ack_tx.clone());
        let ms = now_ms();
        let body = doc(&id, i as u64, ms);
        errors.push(tokio::spawn(async move {
            let r = source.write_one(&c, &id, &body, ms).await;
            let _ = tx.send((id, Instant::now()));
            drop(permit);
            r
        }));
    }
    let write_secs = start.elapsed().as_secs_f64();
    for h in errors {
        h.await??;
    }
    drop(ack_tx);
    let mut acks: HashMap<String, Instant> = HashMap::with_capacity(total);
    while let Some((id, at)) = ack_rx.recv().await {
        acks.insert(id, at);
    }
    Ok(PacedWrites {
        acks,
        achieved_rate: total as f64 / write_secs,
    })
}

/// Percentiles, mean and histogram of `lat` (ms), for `writes` writes made at `achieved_rate`.
pub fn stats(mut lat: Vec<f64>, writes: usize, achieved_rate: f64) -> LatencyStats {
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1]
    };
    let bounds = bucket_bounds();
    let mut hist: Vec<(f64, u64)> = bounds.iter().map(|b| (*b, 0)).collect();
    for l in &lat {
        let i = bounds.partition_point(|b| b < l).min(bounds.len() - 1);
        hist[i].1 += 1;
    }
    LatencyStats {
        writes,
        seen: lat.len(),
        achieved_rate,
        p50_ms: pct(50.0),
        p95_ms: pct(95.0),
        p99_ms: pct(99.0),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        mean_ms: if lat.is_empty() {
            f64::NAN
        } else {
            lat.iter().sum::<f64>() / lat.len() as f64
        },
        hist,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = stats((1..=100).map(f64::from).collect(), 100, 1000.0);
        assert_eq!(
            (s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms),
            (50.0, 95.0, 99.0, 100.0)
        );
        assert_eq!(s.hist.iter().map(|h| h.1).sum::<u64>(), 100);
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
    }
}
