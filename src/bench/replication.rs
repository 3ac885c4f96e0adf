//! The browser protocol (`/api/replicate/{collection}/…`), measured as an offline-first client
//! uses it: one HTTP client holds the Server-Sent Events stream open and pulls whenever a
//! `checkpoint` event arrives, as the JavaScript client does in live mode.
//!
//! - **Propagation**: records written straight to the cloud store at a steady rate; each is
//!   timed from the store acknowledging the write to the client's pull returning it (after the
//!   SSE event that announced it). The path is cloud listener → engine round → feed → SSE event
//!   → pull (feed index scan, then a read of the documents from the cloud store).
//! - **Pull throughput**: a collection loaded into the cloud store, pulled from scratch with
//!   `limit=1000` by one client until `hasMore` is false; then the cost of an idle pull (one that
//!   finds nothing new), the request a live client makes on every heartbeat-free wake-up.
//!
//! HTTP is reqwest's; the event-stream framing (lines of `field: value`, a blank line ending an
//! event) is read by [`SseReader`], a few lines following the WHATWG rules, so no dependency is
//! added for it.

use super::client::{Client, Pending, Row3, doc};
use super::latency::{LatencyStats, paced_writes, stats};
use crate::record::now_ms;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The client id the bench sends, so its pulls show up as such in `/api/replicate/clients`.
const CLIENT_ID: &str = "syncbridge-bench";

/// One event read from an event stream.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `data:` lines, joined by newlines.
    pub data: String,
}

/// Splits an event stream's bytes into events: fed chunks as they arrive, hands out each event
/// once its terminating blank line has come.
#[derive(Default)]
pub struct SseReader {
    buf: String,
}

impl SseReader {
    /// Adds a chunk of the response body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.push_str(&String::from_utf8_lossy(chunk));
        if self.buf.contains('\r') {
            // CRLF and lone CR both end lines; a CR at the very end may be half of a CRLF.
            let keep_cr = self.buf.ends_with('\r');
            let body = if keep_cr {
                &self.buf[..self.buf.len() - 1]
            } else {
                &self.buf[..]
            };
            let mut text = body.replace("\r\n", "\n").replace('\r', "\n");
            if keep_cr {
                text.push('\r');
            }
            self.buf = text;
        }
    }

    /// The next complete event, if one has fully arrived. Comment-only blocks (keep-alives)
    /// are skipped.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let mut ev = SseEvent::default();
            let mut data: Vec<&str> = Vec::new();
            let mut any = false;
            for line in block.lines() {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                any = true;
                match field {
                    "event" => ev.event = value.to_string(),
                    "id" => ev.id = Some(value.to_string()),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            if !any {
                continue;
            }
            if ev.event.is_empty() {
                ev.event = "message".into();
            }
            ev.data = data.join("\n");
            return Some(ev);
        }
        None
    }
}

/// An open event stream.
struct Stream {
    resp: reqwest::Response,
    reader: SseReader,
}

impl Stream {
    async fn open(http: &reqwest::Client, base: &str, collection: &str) -> Result<Stream> {
        let resp = http
            .get(format!("{base}/api/replicate/{collection}/stream"))
            .header("X-Client-Id", CLIENT_ID)
            .header("Accept", "text/event-stream")
            .send()
            .await?
            .error_for_status()
            .context("opening the replication stream")?;
        Ok(Stream {
            resp,
            reader: SseReader::default(),
        })
    }

    async fn next(&mut self) -> Result<SseEvent> {
        loop {
            if let Some(ev) = self.reader.next_event() {
                return Ok(ev);
            }
            match self.resp.chunk().await? {
                Some(chunk) => self.reader.feed(&chunk),
                None => bail!("the server closed the replication stream"),
            }
        }
    }
}

/// A pull response, parsed in full as a client would (documents included).
#[derive(Deserialize)]
struct Page {
    documents: Vec<PulledDoc>,
    checkpoint: String,
    #[serde(rename = "hasMore")]
    has_more: bool,
}

#[derive(Deserialize)]
struct PulledDoc {
    id: String,
    #[allow(dead_code)] // parsed for a realistic cost, not looked at
    doc: Option<serde_json::Value>,
}

async fn pull(
    http: &reqwest::Client,
    base: &str,
    collection: &str,
    checkpoint: Option<&str>,
    limit: usize,
) -> Result<Page> {
    let mut params = vec![("limit", limit.to_string())];
    if let Some(cp) = checkpoint {
        params.push(("checkpoint", cp.to_string()));
    }
    // reqwest is built without its `query` feature; the URL type encodes the parameters.
    let url = reqwest::Url::parse_with_params(
        &format!("{base}/api/replicate/{collection}/pull"),
        &params,
    )?;
    let req = http.get(url).header("X-Client-Id", CLIENT_ID);
    let resp = req.send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "pull failed ({status}): {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(resp.json().await?)
}

/// Pulls until `hasMore` is false; returns the checkpoint reached, the documents and pages.
async fn pull_to_end(
    http: &reqwest::Client,
    base: &str,
    collection: &str,
    from: Option<String>,
    limit: usize,
) -> Result<(String, usize, usize)> {
    let mut checkpoint = from;
    let (mut docs, mut pages) = (0usize, 0usize);
    loop {
        let page = pull(http, base, collection, checkpoint.as_deref(), limit).await?;
        docs += page.documents.len();
        pages += 1;
        checkpoint = Some(page.checkpoint);
        if !page.has_more {
            return Ok((checkpoint.unwrap_or_default(), docs, pages));
        }
    }
}

/// Waits until the API answers `/healthz`.
pub async fn wait_api(http: &reqwest::Client, base: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the bridge's API at {base} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Propagation through the browser protocol.
#[derive(Debug, Clone, Serialize)]
pub struct Propagation {
    /// Write acknowledged → the client's pull returned the record.
    pub pulled: LatencyStats,
    /// Write acknowledged → the client read the SSE event that announced it.
    pub announced: LatencyStats,
    /// Checkpoint events the client received.
    pub events: usize,
    /// Pulls the client made (one or more per event: until `hasMore` is false).
    pub pulls: usize,
    /// Mean duration of those pulls, ms.
    pub mean_pull_ms: f64,
}

/// Writes `rate` records/s for `secs` s to the cloud store and times each until the client's
/// pull returned it; waits up to `drain` after the last write.
pub async fn propagation(
    http: &reqwest::Client,
    base: &str,
    cloud: &Client,
    collection: &str,
    rate: u32,
    secs: f64,
    drain: Duration,
) -> Result<Propagation> {
    // Live mode as the client starts it: stream open, then pull to the current checkpoint.
    let mut stream = Stream::open(http, base, collection).await?;
    let (checkpoint, _, _) = pull_to_end(http, base, collection, None, 1000).await?;

    let pending: Pending = Arc::default();
    let stop = CancellationToken::new();
    let client = {
        let (http, base, c) = (http.clone(), base.to_string(), collection.to_string());
        let (pending, stop) = (pending.clone(), stop.clone());
        tokio::spawn(async move {
            let mut checkpoint = checkpoint;
            // (id, event read, pull returned)
            let mut seen: Vec<(String, Instant, Instant)> = Vec::new();
            let (mut events, mut pulls, mut pull_s) = (0usize, 0usize, 0.0f64);
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = stream.next() => ev?,
                };
                if ev.event != "checkpoint" {
                    continue;
                }
                events += 1;
                let announced = Instant::now();
                loop {
                    let t0 = Instant::now();
                    let page = pull(&http, &base, &c, Some(&checkpoint), 1000).await?;
                    let at = Instant::now();
                    pulls += 1;
                    pull_s += at.duration_since(t0).as_secs_f64();
                    let mut p = pending.lock().expect("pending");
                    for d in page.documents {
                        if p.remove(&d.id) {
                            seen.push((d.id, announced, at));
                        }
                    }
                    drop(p);
                    checkpoint = page.checkpoint;
                    if !page.has_more {
                        break;
                    }
                }
            }
            Ok::<_, anyhow::Error>((seen, events, pulls, pull_s))
        })
    };
    let writes = paced_writes(cloud, collection, rate, secs, &pending).await?;
    let deadline = Instant::now() + drain;
    while !pending.lock().expect("pending").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let (seen, events, pulls, pull_s) = client.await??;
    let (mut pulled, mut announced) = (Vec::new(), Vec::new());
    for (id, ev, at) in seen {
        if let Some(ack) = writes.acks.get(&id) {
            let ms = |t: Instant| t.saturating_duration_since(*ack).as_secs_f64() * 1000.0;
            announced.push(ms(ev));
            pulled.push(ms(at));
        }
    }
    let total = writes.acks.len();
    Ok(Propagation {
        pulled: stats(pulled, total, writes.achieved_rate),
        announced: stats(announced, total, writes.achieved_rate),
        events,
        pulls,
        mean_pull_ms: pull_s * 1000.0 / pulls.max(1) as f64,
    })
}

/// Pull throughput from scratch, and the cost of an idle pull.
#[derive(Debug, Clone, Serialize)]
pub struct PullRun {
    /// Records in the collection.
    pub records: usize,
    /// Documents the pulls returned (records, plus any change the feed repeats).
    pub documents: usize,
    /// Pulls made.
    pub pages: usize,
    /// Seconds from the first pull to the last.
    pub secs: f64,
    /// Seconds the bulk load of the cloud store took (setup).
    pub load_s: f64,
    /// Idle pulls: median and mean ms, over `idle_pulls`.
    pub idle_p50_ms: f64,
    /// Mean of the idle pulls.
    pub idle_mean_ms: f64,
    /// How many idle pulls were timed.
    pub idle_pulls: usize,
}

/// Loads `records` into the cloud store (quietly where the store allows, see
/// [`Client::write_many`]), then pulls them all from scratch and times idle pulls.
pub async fn pull_throughput(
    http: &reqwest::Client,
    base: &str,
    cloud: &Client,
    collection: &str,
    records: usize,
) -> Result<PullRun> {
    // Versions about an hour old: before any sweep mark, so incremental sweeps pass them by.
    let old = now_ms() - 3_600_000;
    let clock = Instant::now();
    let batch = 5000;
    let mut i = 0;
    while i < records {
        let rows: Vec<Row3> = (i..(i + batch).min(records))
            .map(|n| {
                let id = format!("p{n:08}");
                // One millisecond apart, as records written over time would be.
                let ms = old + n as i64;
                let body = doc(&id, n as u64, ms);
                (id, body, ms)
            })
            .collect();
        cloud.write_many(collection, &rows, true).await?;
        i += batch;
    }
    cloud.clear_log(collection).await?;
    let load_s = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let (checkpoint, documents, pages) = pull_to_end(http, base, collection, None, 1000).await?;
    let secs = clock.elapsed().as_secs_f64();
    anyhow::ensure!(
        documents >= records,
        "the pull from scratch returned {documents} documents for {records} records"
    );

    let idle_pulls = 200;
    let mut idle = Vec::with_capacity(idle_pulls);
    for _ in 0..idle_pulls {
        let t0 = Instant::now();
        let page = pull(http, base, collection, Some(&checkpoint), 1000).await?;
        idle.push(t0.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            page.documents.is_empty() && !page.has_more,
            "an idle pull returned {} documents",
            page.documents.len()
        );
    }
    let s = stats(idle, idle_pulls, 0.0);
    Ok(PullRun {
        records,
        documents,
        pages,
        secs,
        load_s,
        idle_p50_ms: s.p50_ms,
        idle_mean_ms: s.mean_ms,
        idle_pulls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings() {
        let mut r = SseReader::default();
        r.feed(b"event: checkpoint\r\nid: f12\r");
        assert_eq!(r.next_event(), None);
        r.feed(
            b"\ndata: {\"checkpoint\":\"f12\"}\r\n\r\n: keep-alive\n\nevent: heartbeat\ndata: {}\n",
        );
        assert_eq!(
            r.next_event(),
            Some(SseEvent {
                event: "checkpoint".into(),
                id: Some("f12".into()),
                data: "{\"checkpoint\":\"f12\"}".into(),
            })
        );
        // The comment-only block is skipped; the heartbeat is not complete yet.
        assert_eq!(r.next_event(), None);
        r.feed(b"\ndata:a\ndata: b\n\n");
        assert_eq!(r.next_event().map(|e| e.event), Some("heartbeat".into()));
        assert_eq!(
            r.next_event(),
            Some(SseEvent {
                event: "message".into(),
                id: None,
                data: "a\nb".into(),
            })
        );
    }
}
