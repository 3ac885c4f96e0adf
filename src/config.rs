//! Configuration: a TOML file, every key overridable by `SYNCBRIDGE_*` environment variables.
//!
//! With no file at all the bridge runs on an embedded default that needs no server (two SQLite
//! files under `data/`), so `syncbridge run` works on a fresh machine.

use crate::engine::policy::{ConflictPolicy, MergePrefer, Mode, Rules};
use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One store of the pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreConfig {
    /// `redis://`, `rediss://`, `sqlite://` or `postgres://` URI.
    pub uri: String,
}

/// How and what to sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncConfig {
    /// Collections (tables, key prefixes) to keep in step.
    pub collections: Vec<String>,
    /// Which way changes flow.
    pub mode: Mode,
    /// Seconds between incremental reconciliation sweeps.
    pub sweep_interval_secs: u64,
    /// Seconds between full sweeps, for stores without a durable change log (Redis).
    pub full_sweep_interval_secs: u64,
    /// An incremental sweep looks back this far before the last sweep's start, for in-flight
    /// transactions and clock skew.
    pub sweep_margin_secs: u64,
    /// `updatedAt` values further than this in the future are rejected, not trusted.
    pub max_future_secs: u64,
    /// Days a synced delete is remembered (so a late, older write cannot resurrect it).
    pub tombstone_retention_days: u64,
    /// Most records reconciled together.
    pub batch_size: usize,
    /// A record that fails for a reason of its own (refused by the target, not a valid record)
    /// is dead-lettered after this many attempts. Store outages never dead-letter.
    pub retry_max_attempts: i64,
    /// First retry delay in ms; doubles per attempt, with jitter.
    pub retry_base_ms: u64,
    /// Longest delay between retries, in seconds.
    pub retry_max_secs: u64,
    /// Days the losing version of a decided conflict is kept for audit.
    pub conflict_retention_days: u64,
    /// Days a bridge registered on a SQL store's change log may stay unseen before the other
    /// bridges drop its registration and its log rows (so a bridge that never comes back does
    /// not make the log grow forever). One that comes back later registers again and runs a
    /// full sweep.
    pub consumer_retention_days: u64,
    /// Documents larger than this (canonical JSON bytes) are not synced: dead-lettered with the
    /// reason. 16 MiB is MongoDB's limit, the smallest of the supported stores.
    pub max_doc_bytes: usize,
    /// Cron expression (5 fields, or 6 with seconds first) for scheduled full reconciliation
    /// passes, on top of the sweeps; `None` runs none. Checked at start-up.
    pub schedule: Option<String>,
    /// Start paused (`true`) or running (`false`), whatever the bridge was when it stopped;
    /// unset (the default), a restarted bridge keeps the state `syncbridge pause` / `resume`
    /// left in its data directory. `SYNCBRIDGE_PAUSED=true` is the short form.
    pub paused: Option<bool>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            collections: vec!["customers".into()],
            mode: Mode::Both,
            sweep_interval_secs: 30,
            full_sweep_interval_secs: 300,
            sweep_margin_secs: 60,
            max_future_secs: 3600,
            tombstone_retention_days: 30,
            batch_size: 500,
            retry_max_attempts: 8,
            retry_base_ms: 1000,
            retry_max_secs: 60,
            max_doc_bytes: 16 * 1024 * 1024,
            conflict_retention_days: 30,
            consumer_retention_days: 7,
            schedule: None,
            paused: None,
        }
    }
}

/// Per-collection settings (`[[collections]]`); a collection listed only in
/// `sync.collections` gets the defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectionConfig {
    /// The collection's name (table, key prefix, MongoDB collection).
    pub name: String,
    /// How a conflict is decided: lww (default), local-wins, cloud-wins, merge, manual.
    #[serde(default)]
    pub conflict: ConflictPolicy,
    /// For `merge`: whose value a field changed on both sides takes (latest, local, cloud).
    #[serde(default)]
    pub merge_prefer: MergePrefer,
    /// An existing typed table holding this collection on every SQL side, synced column by
    /// column instead of the bridge's own `(id, doc, updated_at)` table.
    #[serde(default)]
    pub table: Option<String>,
    /// The local side's table, when its name differs from `table`.
    #[serde(default)]
    pub local_table: Option<String>,
    /// The cloud side's table, when its name differs from `table`.
    #[serde(default)]
    pub cloud_table: Option<String>,
    /// The table's primary-key column (one column; its value is the record id).
    #[serde(default = "default_key")]
    pub key: Vec<String>,
    /// The table's modification-time column.
    #[serde(default = "default_updated_at")]
    pub updated_at: String,
    /// Columns to sync besides the key and `updated_at`; all of them when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Collections whose rows this one's rows reference (parents first, children after);
    /// foreign keys between typed tables are found on their own.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Add the `updated_at` column to a table that has none. Off unless asked: the bridge
    /// does not change an application's schema on its own.
    #[serde(default)]
    pub add_updated_at: bool,
    /// Who creates rows of an auto-increment table synced both ways: `local` or `cloud`
    /// (only that side's applications insert), or `disjoint` (the servers allocate from
    /// disjoint ranges). Unset, such a table is refused at start-up, since both sides could
    /// allocate the same id to two different rows.
    #[serde(default)]
    pub key_allocation: Option<KeyAllocation>,
}

fn default_key() -> Vec<String> {
    vec!["id".into()]
}

fn default_updated_at() -> String {
    "updated_at".into()
}

/// Who allocates the keys of an auto-increment table synced both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAllocation {
    /// Only the local side's applications insert rows (the usual offline-shop pattern: the
    /// local database allocates, the central one receives).
    Local,
    /// Only the cloud side's applications insert rows.
    Cloud,
    /// Both insert, from disjoint ranges (`auto_increment_increment`/`offset`, sequences
    /// with different starts and a common step, or UUID keys).
    Disjoint,
}

impl Default for CollectionConfig {
    fn default() -> Self {
        CollectionConfig {
            name: String::new(),
            conflict: ConflictPolicy::default(),
            merge_prefer: MergePrefer::default(),
            table: None,
            local_table: None,
            cloud_table: None,
            key: default_key(),
            updated_at: default_updated_at(),
            columns: None,
            depends_on: Vec::new(),
            add_updated_at: false,
            key_allocation: None,
        }
    }
}

impl CollectionConfig {
    /// The typed table of this collection on `side`, if it has one there.
    pub fn table_on(&self, side: crate::record::Side) -> Option<&str> {
        match side {
            crate::record::Side::Local => self.local_table.as_deref(),
            crate::record::Side::Cloud => self.cloud_table.as_deref(),
        }
        .or(self.table.as_deref())
    }

    /// The [`TableSpec`](crate::stores::TableSpec) for `side`, if the collection has a
    /// typed table there.
    pub fn table_spec(&self, side: crate::record::Side) -> Option<crate::stores::TableSpec> {
        self.table_on(side).map(|table| crate::stores::TableSpec {
            collection: self.name.clone(),
            table: table.to_string(),
            key: if self.key.is_empty() {
                default_key()
            } else {
                self.key.clone()
            },
            updated_at: self.updated_at.clone(),
            columns: self.columns.clone(),
            add_updated_at: self.add_updated_at,
        })
    }
}

/// The HTTP API served beside the bridge by `syncbridge run`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Serve the API at all; off for bridges that need no control surface.
    pub enabled: bool,
    /// Address to listen on (`host:port`); loopback by default so nothing is exposed by
    /// accident.
    pub bind: String,
    /// Bearer token every route but `/healthz` requires, when set.
    pub token: Option<String>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub body_limit: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            bind: "127.0.0.1:5000".into(),
            token: None,
            body_limit: 1024 * 1024,
        }
    }
}

/// The token is a secret: never print it.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("enabled", &self.enabled)
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("body_limit", &self.body_limit)
            .finish()
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The local store (the client's database).
    pub local: StoreConfig,
    /// The cloud store (the shared one).
    pub cloud: StoreConfig,
    /// What and how to sync.
    #[serde(default)]
    pub sync: SyncConfig,
    /// Where the bridge keeps its own state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Per-collection settings; their names join `sync.collections`.
    #[serde(default)]
    pub collections: Vec<CollectionConfig>,
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            local: StoreConfig {
                uri: "sqlite://data/local.db".into(),
            },
            cloud: StoreConfig {
                uri: "sqlite://data/cloud.db".into(),
            },
            sync: SyncConfig::default(),
            data_dir: default_data_dir(),
            collections: Vec::new(),
            api: ApiConfig::default(),
        }
    }
}

/// Environment variables that name a key outside the `section_key` pattern.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("MODE", "sync.mode"),
    ("SWEEP_INTERVAL_SECS", "sync.sweep_interval_secs"),
    ("DATA_DIR", "data_dir"),
    ("SCHEDULE", "sync.schedule"),
    ("PAUSED", "sync.paused"),
];

impl Config {
    /// Loads the embedded default, then `file` if given, then `SYNCBRIDGE_*` variables.
    ///
    /// `SYNCBRIDGE_LOCAL_URI` sets `local.uri`, `SYNCBRIDGE_SYNC_BATCH_SIZE` sets
    /// `sync.batch_size`, `SYNCBRIDGE_API_TOKEN` sets `api.token`, and so on;
    /// `SYNCBRIDGE_MODE`, `SYNCBRIDGE_SWEEP_INTERVAL_SECS`, `SYNCBRIDGE_SCHEDULE`,
    /// `SYNCBRIDGE_PAUSED` and `SYNCBRIDGE_DATA_DIR` are short forms; `SYNCBRIDGE_COLLECTIONS` takes a comma list.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        // The default collection list applies only when nothing names a collection: a file
        // with `[[collections]]` entries means those, not those plus `customers`.
        let mut defaults = Config::default();
        let default_collections = std::mem::take(&mut defaults.sync.collections);
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        let env = Env::prefixed("SYNCBRIDGE_")
            .ignore(&["CONFIG", "COLLECTIONS", "LOG", "LOG_FORMAT"])
            .map(|key| {
                let upper = key.as_str().to_ascii_uppercase();
                if let Some((_, path)) = ENV_ALIASES.iter().find(|(k, _)| *k == upper) {
                    return (*path).into();
                }
                match upper.split_once('_') {
                    Some((section, rest))
                        if ["LOCAL", "CLOUD", "SYNC", "API"].contains(&section) =>
                    {
                        format!("{}.{}", section.to_lowercase(), rest.to_lowercase()).into()
                    }
                    _ => upper.to_lowercase().into(),
                }
            });
        let mut config: Config = figment
            .merge(env)
            .extract()
            .context("invalid configuration")?;
        if let Ok(list) = std::env::var("SYNCBRIDGE_COLLECTIONS") {
            config.sync.collections = list
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if config.sync.collections.is_empty() && config.collections.is_empty() {
            config.sync.collections = default_collections;
        }
        for c in &config.collections {
            if !config.sync.collections.contains(&c.name) {
                config.sync.collections.push(c.name.clone());
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The conflict rules of `collection`.
    pub fn rules(&self, collection: &str) -> Rules {
        self.collections
            .iter()
            .find(|c| c.name == collection)
            .map(|c| Rules {
                conflict: c.conflict,
                merge_prefer: c.merge_prefer,
            })
            .unwrap_or_default()
    }

    /// Rejects settings the bridge cannot run with, saying why.
    pub fn validate(&self) -> Result<()> {
        if self.sync.collections.is_empty() {
            bail!("sync.collections is empty: name at least one collection to sync");
        }
        for c in &self.sync.collections {
            if !is_identifier(c) {
                bail!(
                    "collection name {c:?} must be letters, digits and _ (a SQL table name), at most 60 characters"
                );
            }
        }
        for c in &self.collections {
            let mut names: Vec<(&str, &str)> = vec![("updated_at", c.updated_at.as_str())];
            for t in [&c.table, &c.local_table, &c.cloud_table]
                .into_iter()
                .flatten()
            {
                names.push(("table", t));
            }
            for k in &c.key {
                names.push(("key", k));
            }
            for col in c.columns.iter().flatten() {
                names.push(("columns", col));
            }
            for (what, name) in names {
                if !is_identifier(name) {
                    bail!(
                        "collection {}: {what} {name:?} must be letters, digits and _ (a SQL name), at most 60 characters",
                        c.name
                    );
                }
            }
            if c.key.is_empty() {
                bail!(
                    "collection {}: key is empty; name the key column(s), e.g. key = [\"id\"]",
                    c.name
                );
            }
            if let Some(dup) = c
                .key
                .iter()
                .enumerate()
                .find(|(i, k)| c.key[..*i].contains(k))
            {
                bail!("collection {}: key names {:?} twice", c.name, dup.1);
            }
            for d in &c.depends_on {
                if !self.sync.collections.contains(d) {
                    bail!(
                        "collection {}: depends_on names {d:?}, which is not a synced collection",
                        c.name
                    );
                }
            }
        }
        for (name, uri) in [("local", &self.local.uri), ("cloud", &self.cloud.uri)] {
            if uri.trim().is_empty() {
                bail!("{name}.uri is empty");
            }
        }
        if self.local.uri == self.cloud.uri {
            bail!("local.uri and cloud.uri name the same store");
        }
        if self.sync.sweep_interval_secs == 0 || self.sync.full_sweep_interval_secs == 0 {
            bail!("sweep intervals must be at least one second");
        }
        if self.sync.consumer_retention_days == 0 {
            bail!(
                "sync.consumer_retention_days must be at least 1: a shorter one would drop running bridges' change logs"
            );
        }
        if self.sync.batch_size == 0 {
            bail!("sync.batch_size must be at least 1");
        }
        if let Some(expr) = &self.sync.schedule {
            crate::engine::scheduler::parse(expr)?;
        }
        if self.api.enabled {
            if self.api.bind.parse::<std::net::SocketAddr>().is_err() {
                bail!(
                    "api.bind {:?} is not an address: use host:port, e.g. 127.0.0.1:5000",
                    self.api.bind
                );
            }
            if self
                .api
                .token
                .as_deref()
                .is_some_and(|t| t.trim().is_empty())
            {
                bail!("api.token is empty: set a secret or remove it to run without auth");
            }
            if self.api.body_limit == 0 {
                bail!("api.body_limit must be at least 1 byte");
            }
        }
        Ok(())
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most 60 characters: a name that is safe to put in SQL
/// between double quotes, which is what lets statements name tables and columns.
pub fn is_identifier(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && name.len() <= 60
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_needs_no_server() {
        let c = Config::default();
        assert!(c.local.uri.starts_with("sqlite://") && c.cloud.uri.starts_with("sqlite://"));
        c.validate().unwrap();
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn files_and_environment_override_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[local]\nuri = \"sqlite://a.db\"\n[cloud]\nuri = \"redis://127.0.0.1:6379/0\"\n\
             [sync]\ncollections = [\"orders\"]\nmode = \"local-to-cloud\"\nsweep_interval_secs = 7\n",
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            let c = Config::load(Some(&path)).unwrap();
            assert_eq!(c.cloud.uri, "redis://127.0.0.1:6379/0");
            assert_eq!(c.sync.mode, Mode::LocalToCloud);
            assert_eq!(c.sync.sweep_interval_secs, 7);
            assert_eq!(c.sync.collections, vec!["orders"]);
            jail.set_env("SYNCBRIDGE_CLOUD_URI", "sqlite://b.db");
            jail.set_env("SYNCBRIDGE_MODE", "both-ways");
            jail.set_env("SYNCBRIDGE_COLLECTIONS", "a, b");
            jail.set_env("SYNCBRIDGE_SYNC_BATCH_SIZE", "9");
            let c = Config::load(Some(&path)).unwrap();
            assert_eq!(c.cloud.uri, "sqlite://b.db");
            assert_eq!(c.sync.mode, Mode::Both);
            assert_eq!(c.sync.collections, vec!["a", "b"]);
            assert_eq!(c.sync.batch_size, 9);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn collections_carry_their_conflict_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[local]\nuri = \"sqlite://a.db\"\n[cloud]\nuri = \"sqlite://b.db\"\n[sync]\ncollections = [\"a\"]\n\
             [[collections]]\nname = \"notes\"\nconflict = \"merge\"\nmerge_prefer = \"cloud\"\n",
        )
        .unwrap();
        // Inside a Jail: other tests set SYNCBRIDGE_* variables, and the Jail's lock keeps
        // them from leaking into this one.
        figment::Jail::expect_with(|_| {
            let c = Config::load(Some(&path)).unwrap();
            assert_eq!(c.sync.collections, vec!["a", "notes"]);
            assert_eq!(c.rules("notes").conflict, ConflictPolicy::Merge);
            assert_eq!(c.rules("notes").merge_prefer, MergePrefer::Cloud);
            assert_eq!(c.rules("a"), Rules::default());
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn the_api_and_schedule_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            let c = Config::load(None).unwrap();
            assert_eq!(c.api.bind, "127.0.0.1:5000");
            assert_eq!(c.api.body_limit, 1024 * 1024);
            assert!(c.api.token.is_none() && c.sync.schedule.is_none());
            jail.set_env("SYNCBRIDGE_API_BIND", "127.0.0.1:6001");
            jail.set_env("SYNCBRIDGE_API_TOKEN", "hunter2");
            jail.set_env("SYNCBRIDGE_API_BODY_LIMIT", "2048");
            jail.set_env("SYNCBRIDGE_SCHEDULE", "*/5 * * * *");
            assert_eq!(c.sync.paused, None, "unset: the persisted state decides");
            jail.set_env("SYNCBRIDGE_PAUSED", "true");
            let c = Config::load(None).unwrap();
            assert_eq!(c.sync.paused, Some(true));
            assert_eq!(c.api.bind, "127.0.0.1:6001");
            assert_eq!(c.api.token.as_deref(), Some("hunter2"));
            assert!(
                !format!("{c:?}").contains("hunter2"),
                "the token never prints"
            );
            assert_eq!(c.api.body_limit, 2048);
            assert_eq!(c.sync.schedule.as_deref(), Some("*/5 * * * *"));
            jail.set_env("SYNCBRIDGE_SCHEDULE", "every five minutes");
            let err = format!("{:#}", Config::load(None).unwrap_err());
            assert!(err.contains("not a valid cron expression"), "{err}");
            jail.set_env("SYNCBRIDGE_SCHEDULE", "*/5 * * * *");
            jail.set_env("SYNCBRIDGE_API_BIND", "localhost");
            assert!(format!("{:#}", Config::load(None).unwrap_err()).contains("api.bind"));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn typed_tables_come_from_collection_entries_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[local]\nuri = \"mysql://root@h/db_a\"\n[cloud]\nuri = \"postgres://h/db_b\"\n\
             [[collections]]\nname = \"users\"\ntable = \"users\"\n\
             [[collections]]\nname = \"orders\"\nlocal_table = \"shop_orders\"\ncloud_table = \"orders\"\n\
             depends_on = [\"users\"]\nkey_allocation = \"local\"\n",
        )
        .unwrap();
        figment::Jail::expect_with(|_| {
            let c = Config::load(Some(&path)).unwrap();
            // Only the named collections: no default `customers` beside them.
            assert_eq!(c.sync.collections, vec!["users", "orders"]);
            let orders = &c.collections[1];
            let spec = orders.table_spec(crate::record::Side::Local).unwrap();
            assert_eq!(
                (spec.table.as_str(), spec.key.as_slice()),
                ("shop_orders", ["id".to_string()].as_slice())
            );
            assert_eq!(orders.table_on(crate::record::Side::Cloud), Some("orders"));
            assert_eq!(orders.key_allocation, Some(KeyAllocation::Local));
            assert_eq!(spec.updated_at, "updated_at");
            Ok(())
        });
        let mut c = Config {
            collections: vec![CollectionConfig {
                name: "customers".into(),
                table: Some("lines".into()),
                key: vec!["order_id".into(), "line_no".into()],
                ..Default::default()
            }],
            ..Config::default()
        };
        c.validate().unwrap();
        let spec = c.collections[0]
            .table_spec(crate::record::Side::Local)
            .unwrap();
        assert_eq!(spec.key, ["order_id", "line_no"]);
        c.collections[0].key = vec![];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("key is empty"), "{e}");
        c.collections[0].key = vec!["a".into(), "a".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let mut c = Config::default();
        c.sync.collections = vec!["drop table;".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("collection name")
        );
        let mut c = Config::default();
        c.cloud.uri = c.local.uri.clone();
        assert!(c.validate().is_err());
    }
}
