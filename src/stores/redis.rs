//! Redis connector: a record is a string at `<collection>:<id>` holding the JSON document.
//!
//! Changes are heard through keyspace notifications, which carry only the key, so the listener
//! reads the current value (coalescing bursts: reading the latest value is enough because the
//! engine only ever moves a record forward). Notifications are fire-and-forget: what happens
//! while the bridge is disconnected is found by the engine's full sweep, which is why
//! [`Capabilities::durable_changes`] is false here.
//!
//! Conditional writes run as one Lua script per batch: for each key it compares the stored
//! value with the value the engine read, and writes only if they are still the same.

use super::{
    Ack, ApplyOutcome, Capabilities, ChangeBatch, ListenContext, ScanPage, Slot, Store,
    StoredRecord, Write, redact_uri,
};
use crate::record::{
    ChangeRecord, Op, Origin, canonical_json, doc_updated_at, now_ms, with_updated_at,
};
use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tracing::{debug, info};

/// Keyspace event classes the listener needs: `K` keyspace channel, `$` string commands,
/// `g` generic commands (DEL, RENAME, EXPIRE), `x` expired, `e` evicted.
const NEEDED_EVENT_CLASSES: &str = "K$gxe";

/// Reads many keys in one round trip, telling a missing key from one of the wrong type
/// (plain MGET returns nil for both). Returns a flat list of (status, value) pairs.
const READ_SCRIPT: &str = r#"
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k).ok
  if t == 'string' then
    out[#out + 1] = 'S'; out[#out + 1] = redis.call('GET', k)
  elseif t == 'none' then
    out[#out + 1] = 'N'; out[#out + 1] = ''
  else
    out[#out + 1] = 'W'; out[#out + 1] = t
  end
end
return out
"#;

/// Conditional set/delete for many keys. ARGV holds four values per key: whether a value is
/// expected, the expected value, `set` or `del`, the new value. Returns per key
/// 1 applied, 2 unchanged (already holds the result), 0 conflict, 3 wrong type.
const APPLY_SCRIPT: &str = r#"
local res = {}
for i, k in ipairs(KEYS) do
  local b = (i - 1) * 4
  local expect_present = ARGV[b + 1] == '1'
  local expected, op, new = ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local t = redis.call('TYPE', k).ok
  if t ~= 'string' and t ~= 'none' then
    res[i] = 3
  else
    local cur = false
    if t == 'string' then cur = redis.call('GET', k) end
    if (op == 'set' and cur == new) or (op == 'del' and not cur) then
      res[i] = 2
    elseif (expect_present and cur == expected) or (not expect_present and not cur) then
      if op == 'set' then redis.call('SET', k, new, 'KEEPTTL') else redis.call('DEL', k) end
      res[i] = 1
    else
      res[i] = 0
    end
  end
end
return res
"#;

/// How long after the first notification of a batch the listener collects more.
const COALESCE_WINDOW: Duration = Duration::from_millis(2);
/// At most this many keys are read and delivered in one batch.
const MAX_BATCH: usize = 1000;

/// A Redis database used as one side of the bridge.
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    db: i64,
    uri: String,
    read_script: redis::Script,
    apply_script: redis::Script,
}

impl RedisStore {
    /// Connects to the server a `redis://` or `rediss://` URI names.
    pub async fn connect(uri: &str) -> Result<RedisStore> {
        let client = redis::Client::open(uri)
            .map_err(|e| super::Fatal(format!("invalid Redis URI {}: {e}", redact_uri(uri))))?;
        let db = client.get_connection_info().redis_settings().db();
        let conn = client
            .get_connection_manager()
            .await
            .with_context(|| format!("cannot connect to Redis at {}", redact_uri(uri)))?;
        Ok(RedisStore {
            client,
            conn,
            db,
            uri: uri.to_string(),
            read_script: redis::Script::new(READ_SCRIPT),
            apply_script: redis::Script::new(APPLY_SCRIPT),
        })
    }

    fn key(collection: &str, id: &str) -> String {
        format!("{collection}:{id}")
    }

    /// Makes sure the server publishes the keyspace events the listener needs, keeping any
    /// classes already enabled for other users of the server.
    async fn enable_notifications(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let current: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut conn)
            .await
            .context("Redis refused CONFIG GET notify-keyspace-events")?;
        let flags = current.get(1).cloned().unwrap_or_default();
        let missing: String = NEEDED_EVENT_CLASSES
            .chars()
            .filter(|c| !has_event_class(&flags, *c))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let merged = format!("{flags}{missing}");
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(&merged)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| {
                super::Fatal(format!(
                    "Redis at {} refused `CONFIG SET notify-keyspace-events {merged}` ({e}); \
                     the bridge cannot hear changes without keyspace notifications: enable them \
                     in the server's configuration (notify-keyspace-events \"{NEEDED_EVENT_CLASSES}\")",
                    redact_uri(&self.uri)
                ))
            })?;
        info!(store = %redact_uri(&self.uri), flags = %merged, "enabled Redis keyspace notifications");
        Ok(())
    }

    /// Turns one stored value into a [`Slot`].
    fn parse_value(id: &str, raw: &[u8]) -> Slot {
        let Ok(text) = std::str::from_utf8(raw) else {
            return Slot::Invalid("value is not UTF-8 text".into());
        };
        match serde_json::from_str::<Value>(text) {
            Ok(doc @ Value::Object(_)) => {
                let updated_at_ms = doc_updated_at(&doc);
                let doc = match updated_at_ms {
                    Some(ms) => with_updated_at(doc, ms),
                    None => doc,
                };
                Slot::Present(StoredRecord {
                    id: id.to_string(),
                    doc,
                    updated_at_ms,
                    etag: text.to_string(),
                })
            }
            Ok(_) => Slot::Invalid("value is JSON but not an object".into()),
            Err(e) => Slot::Invalid(format!("value is not JSON: {e}")),
        }
    }
}

/// Whether a `notify-keyspace-events` flag string enables class `c` (`A` stands for
/// `g$lshzxetd`).
fn has_event_class(flags: &str, c: char) -> bool {
    flags.contains(c) || (flags.contains('A') && "g$lshzxetd".contains(c))
}

#[async_trait]
impl Store for RedisStore {
    fn describe(&self) -> String {
        redact_uri(&self.uri)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_changes: false,
            time_index: false,
            typed_tables: false,
            delete_times: false,
        }
    }

    async fn prepare(&self, collections: &[String]) -> Result<()> {
        for c in collections {
            if c.contains(':') || c.contains('*') {
                bail!("collection name {c:?} cannot be used as a Redis key prefix");
            }
        }
        self.enable_notifications().await
    }

    async fn read(&self, collection: &str, ids: &[String]) -> Result<Vec<Slot>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.read_script.prepare_invoke();
        for id in ids {
            inv.key(Self::key(collection, id));
        }
        let mut conn = self.conn.clone();
        let flat: Vec<Vec<u8>> = inv.invoke_async(&mut conn).await?;
        let slots = flat
            .chunks(2)
            .zip(ids)
            .map(|(pair, id)| match pair[0].as_slice() {
                b"S" => Self::parse_value(id, &pair[1]),
                b"N" => Slot::Absent,
                _ => Slot::Invalid(format!(
                    "key holds a Redis {} instead of a string",
                    String::from_utf8_lossy(&pair[1])
                )),
            })
            .collect();
        Ok(slots)
    }

    async fn apply(&self, collection: &str, writes: &[Write]) -> Result<Vec<ApplyOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.apply_script.prepare_invoke();
        for w in writes {
            inv.key(Self::key(collection, &w.record.id));
            inv.arg(if w.expected.is_some() { "1" } else { "0" });
            inv.arg(w.expected.as_deref().unwrap_or(""));
            match (&w.record.op, &w.record.doc) {
                (Op::Upsert, Some(doc)) => {
                    inv.arg("set");
                    inv.arg(canonical_json(doc));
                }
                _ => {
                    inv.arg("del");
                    inv.arg("");
                }
            }
        }
        let mut conn = self.conn.clone();
        let codes: Vec<i64> = inv.invoke_async(&mut conn).await?;
        Ok(codes
            .into_iter()
            .map(|c| match c {
                1 => ApplyOutcome::Applied,
                2 => ApplyOutcome::Unchanged,
                3 => ApplyOutcome::Rejected("key holds a non-string Redis type".into()),
                _ => ApplyOutcome::Conflict,
            })
            .collect())
    }

    async fn scan(
        &self,
        collection: &str,
        since_ms: Option<i64>,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<ScanPage> {
        // SCAN's COUNT is work per call, not results: in a keyspace shared with other data a
        // call can return nothing. Keep scanning until a page is full or the keyspace is done.
        let mut conn = self.conn.clone();
        let mut cursor: u64 = cursor.as_deref().unwrap_or("0").parse().unwrap_or(0);
        let prefix_len = collection.len() + 1;
        let mut page = ScanPage::default();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{collection}:*"))
                .arg("COUNT")
                .arg(limit.max(1000))
                .query_async(&mut conn)
                .await?;
            cursor = next;
            let ids: Vec<String> = keys
                .into_iter()
                .map(|k| k[prefix_len..].to_string())
                .collect();
            for (id, slot) in ids.iter().zip(self.read(collection, &ids).await?) {
                match slot {
                    // Unstamped records count as changed: the engine stamps them.
                    Slot::Present(r)
                        if since_ms.is_none_or(|s| r.updated_at_ms.is_none_or(|t| t >= s)) =>
                    {
                        page.records.push(r)
                    }
                    Slot::Invalid(reason) => page.invalid.push((id.clone(), reason)),
                    _ => {}
                }
            }
            if cursor == 0 {
                break;
            }
            if page.records.len() + page.invalid.len() >= limit.max(1) {
                page.next = Some(cursor.to_string());
                break;
            }
        }
        Ok(page)
    }

    async fn listen(&self, ctx: ListenContext) -> Result<()> {
        // A restarted server forgets runtime settings: enable notifications on every (re)connect.
        self.enable_notifications().await?;
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .with_context(|| format!("cannot subscribe to {}", redact_uri(&self.uri)))?;
        let prefix = format!("__keyspace@{}__:", self.db);
        for c in &ctx.collections {
            pubsub.psubscribe(format!("{prefix}{c}:*")).await?;
        }
        info!(side = %ctx.side, store = %redact_uri(&self.uri), "listening to keyspace notifications");
        let mut stream = pubsub.on_message();
        loop {
            let first = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                msg = stream.next() => msg,
            };
            let Some(first) = first else {
                bail!("Redis subscription to {} closed", redact_uri(&self.uri));
            };
            // Collect the rest of a burst, so one read covers many keys.
            let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut add = |channel: &str| {
                if let Some((collection, id)) = channel
                    .strip_prefix(&prefix)
                    .and_then(|key| key.split_once(':'))
                {
                    keys.entry(collection.to_string())
                        .or_default()
                        .insert(id.to_string());
                }
            };
            add(first.get_channel_name());
            let mut count = 1;
            // The window is counted from the first notification, not renewed by each one:
            // under a steady stream (one key a millisecond) a renewed window never closes and
            // batches grew to MAX_BATCH, holding the first key back for up to a second.
            // Notifications already waiting are still taken after the window ends.
            let deadline = tokio::time::Instant::now() + COALESCE_WINDOW;
            while count < MAX_BATCH {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(msg)) => {
                        add(msg.get_channel_name());
                        count += 1;
                    }
                    Ok(None) => bail!("Redis subscription to {} closed", redact_uri(&self.uri)),
                    Err(_) => break,
                }
            }
            let observed = now_ms();
            let mut records = Vec::with_capacity(count);
            for (collection, ids) in keys {
                let ids: Vec<String> = ids.into_iter().collect();
                for (id, slot) in ids.iter().zip(self.read(&collection, &ids).await?) {
                    let (op, doc, at) = match slot {
                        Slot::Present(r) => {
                            (Op::Upsert, Some(r.doc), r.updated_at_ms.unwrap_or(observed))
                        }
                        // When it was seen, an upper bound only: the engine does not date
                        // the delete by it (`delete_times` is false for Redis).
                        Slot::Absent => (Op::Delete, None, observed),
                        Slot::Invalid(reason) => {
                            // The engine re-reads, counts and reports it; keep the key flowing.
                            debug!(%collection, %id, %reason, "invalid value in a synced namespace");
                            (Op::Upsert, None, observed)
                        }
                    };
                    records.push(ChangeRecord {
                        side: ctx.side,
                        collection: collection.clone(),
                        id: id.clone(),
                        op,
                        doc,
                        updated_at_ms: at,
                        origin: Origin::Unknown,
                    });
                }
            }
            let batch = ChangeBatch {
                side: ctx.side,
                records,
                ack: Ack::None,
            };
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                sent = ctx.sink.send(batch) => if sent.is_err() { return Ok(()) },
            }
        }
    }

    async fn settle(&self, _ack: Ack, _applied: bool) -> Result<Option<String>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_class_aliases_are_understood() {
        assert!(has_event_class("AK", '$'));
        assert!(has_event_class("AK", 'e'));
        assert!(!has_event_class("Kg", '$'));
        assert!(has_event_class("K$gxe", 'x'));
    }

    #[test]
    fn values_that_are_not_records_are_invalid() {
        assert!(matches!(
            RedisStore::parse_value("1", b"nope"),
            Slot::Invalid(_)
        ));
        assert!(matches!(
            RedisStore::parse_value("1", b"[1,2]"),
            Slot::Invalid(_)
        ));
        assert!(matches!(
            RedisStore::parse_value("1", &[0xff, 0xfe]),
            Slot::Invalid(_)
        ));
        match RedisStore::parse_value("1", br#"{"a":1,"updatedAt":"2026-11-24T10:00:00Z"}"#) {
            Slot::Present(r) => {
                assert_eq!(r.updated_at_ms, Some(1_795_514_400_000));
                assert_eq!(r.doc["updatedAt"], "2026-11-24T10:00:00.000Z");
            }
            other => panic!("{other:?}"),
        }
    }
}
