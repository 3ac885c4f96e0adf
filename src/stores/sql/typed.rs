//! Existing typed tables: a collection kept in an application's own table, synced column by
//! column, instead of the bridge's `(id, doc, updated_at)` table.
//!
//! A row becomes a JSON document field by field, by column name: the key column, every synced
//! column, and `updatedAt` from the table's modification-time column. Every value travels as
//! the database's own text for it (`CAST(... AS TEXT)`, hex for binary, RFC 3339 for
//! timestamps), so nothing passes through a float or a driver's idea of a type, and the text
//! becomes JSON by the column's [`Kind`] (the table in the README's "Sync an existing
//! schema" section). Writing goes back the same way: JSON → text → a cast to the column's
//! declared type, in the database. A value the column cannot hold is the database's error,
//! which becomes [`ApplyOutcome::Rejected`] with its message (strict mode on MySQL, so nothing
//! is truncated silently); a missing parent row is [`ApplyOutcome::Deferred`].
//!
//! The conditional-write guard compares every synced column's text and the time: the etag is
//! that list, so a write made in between by anyone, whatever it changed, is seen.

use super::{Dialect, NOTIFY_CHANNEL, TS_MARKS};
use crate::record::{ChangeRecord, Op, canonical_hash, format_ts, parse_ts, with_updated_at};
use crate::stores::{ApplyOutcome, KeyRange, Slot, StoredRecord, TableFacts, TableSpec};
use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{Acquire, AnyPool, AssertSqlSafe, Row};
use std::collections::BTreeMap;
use tracing::{info, warn};

/// How a column's text becomes JSON and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Integers of any width, as JSON numbers (exact beyond 2^53: serde_json keeps 64 bits).
    Int,
    /// Floating point, as JSON numbers.
    Float,
    /// DECIMAL/NUMERIC, as strings: never through a float.
    Decimal,
    /// BOOLEAN, TINYINT(1).
    Bool,
    /// Text, ENUM, SET, UUID, DATE, TIME and anything else: the database's own text.
    Text,
    /// A time zone aware timestamp (PostgreSQL `timestamptz`, MySQL `TIMESTAMP`): RFC 3339 UTC.
    Timestamp,
    /// A timestamp without zone (`timestamp`, `DATETIME`): RFC 3339 without offset.
    DateTime,
    /// JSON columns: the value itself.
    Json,
    /// Binary: base64.
    Blob,
}

/// One column of a typed table.
#[derive(Debug, Clone)]
pub(super) struct Column {
    /// The column name (also the document field name).
    pub name: String,
    /// How its values map.
    pub kind: Kind,
    /// The declared type, for messages.
    pub sql_type: String,
    /// The type bound text is cast to on PostgreSQL: the declared type without its length or
    /// precision, because an explicit cast to `varchar(n)` truncates silently while an
    /// assignment to the column refuses an over-long value, which is what we want.
    pub cast_type: String,
}

/// A collection mapped onto a typed table, as found in the database.
#[derive(Debug, Clone)]
pub(super) struct TypedTable {
    /// The collection name (in the change log and to the engine).
    pub collection: String,
    /// The table name.
    pub table: String,
    /// The key column(s), in the order of the config's `key` (the order of the id's parts).
    pub key: Vec<Column>,
    /// The modification-time column.
    pub updated_at: Column,
    /// The synced columns besides the key and `updated_at`.
    pub columns: Vec<Column>,
}

/// Raw facts about one column, as the catalog gives them.
struct CatalogColumn {
    name: String,
    /// Lowercase data type (`int`, `numeric`, `timestamp with time zone`, ...).
    data_type: String,
    /// The full declared type (`tinyint(1)`, `numeric(10,2)`, `enum('a','b')`).
    sql_type: String,
    /// Auto-increment, serial, identity or SQLite rowid alias.
    auto: bool,
    /// MySQL: `ON UPDATE CURRENT_TIMESTAMP`.
    on_update: bool,
    /// The primary key (SQLite: position in it).
    primary: bool,
    /// MariaDB JSON is LONGTEXT with a `JSON_VALID` check.
    json_check: bool,
}

fn q(name: &str) -> String {
    format!("\"{name}\"")
}

/// The column's kind from its catalog type.
fn kind_of(d: Dialect, data_type: &str, sql_type: &str) -> Kind {
    let t = data_type.to_ascii_lowercase();
    let full = sql_type.to_ascii_lowercase();
    match d {
        Dialect::Sqlite => {
            // SQLite's affinity rules (https://sqlite.org/datatype3.html), plus the common
            // names for booleans, decimals and JSON.
            if t.contains("bool") {
                Kind::Bool
            } else if t.contains("int") {
                Kind::Int
            } else if t.contains("char") || t.contains("clob") || t.contains("text") {
                Kind::Text
            } else if t.contains("blob") {
                Kind::Blob
            } else if t.contains("real") || t.contains("floa") || t.contains("doub") {
                Kind::Float
            } else if t.contains("dec") || t.contains("num") {
                Kind::Decimal
            } else if t.contains("json") {
                Kind::Json
            } else {
                Kind::Text
            }
        }
        Dialect::Postgres => match t.as_str() {
            "smallint" | "integer" | "bigint" => Kind::Int,
            "numeric" => Kind::Decimal,
            "real" | "double precision" => Kind::Float,
            "boolean" => Kind::Bool,
            "timestamp with time zone" => Kind::Timestamp,
            "timestamp without time zone" => Kind::DateTime,
            "json" | "jsonb" => Kind::Json,
            "bytea" => Kind::Blob,
            _ => Kind::Text,
        },
        Dialect::Mysql => match t.as_str() {
            "tinyint" if full.starts_with("tinyint(1)") => Kind::Bool,
            "bool" | "boolean" => Kind::Bool,
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" => {
                Kind::Int
            }
            "decimal" | "numeric" => Kind::Decimal,
            "float" | "double" | "real" => Kind::Float,
            "timestamp" => Kind::Timestamp,
            "datetime" => Kind::DateTime,
            "json" => Kind::Json,
            "blob" | "tinyblob" | "mediumblob" | "longblob" | "binary" | "varbinary" => Kind::Blob,
            _ => Kind::Text,
        },
    }
}

/// Reads the table's columns from the catalog.
async fn catalog(pool: &AnyPool, d: Dialect, table: &str) -> Result<Vec<CatalogColumn>> {
    let mut cols = Vec::new();
    match d {
        Dialect::Sqlite => {
            let rows = sqlx::query("SELECT name, type, pk FROM pragma_table_info(?1) ORDER BY cid")
                .bind(table.to_string())
                .fetch_all(pool)
                .await?;
            let pk_columns = rows
                .iter()
                .filter(|r| r.try_get::<i64, _>(2).is_ok_and(|pk| pk > 0))
                .count();
            for r in rows {
                let sql_type: String = r.try_get(1)?;
                let pk: i64 = r.try_get(2)?;
                cols.push(CatalogColumn {
                    name: r.try_get(0)?,
                    data_type: sql_type.clone(),
                    // A one-column INTEGER PRIMARY KEY is the rowid: SQLite allocates it (a
                    // column of a composite key is not).
                    auto: pk == 1 && pk_columns == 1 && sql_type.eq_ignore_ascii_case("integer"),
                    on_update: false,
                    primary: pk > 0,
                    sql_type,
                    json_check: false,
                });
            }
        }
        Dialect::Postgres => {
            let rows = sqlx::query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL), format_type(a.atttypid, a.atttypmod), \
                   (a.attidentity <> '' OR coalesce(pg_get_expr(ad.adbin, ad.adrelid), '') LIKE 'nextval(%'), \
                   coalesce(a.attnum = ANY (i.indkey), false) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
            )
            .bind(q(table))
            .fetch_all(pool)
            .await?;
            for r in rows {
                cols.push(CatalogColumn {
                    name: r.try_get(0)?,
                    data_type: r.try_get(1)?,
                    sql_type: r.try_get(2)?,
                    auto: r.try_get(3)?,
                    on_update: false,
                    primary: r.try_get(4)?,
                    json_check: false,
                });
            }
        }
        Dialect::Mysql => {
            let rows = sqlx::query(
                "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR), \
                   CAST(EXTRA AS CHAR), CAST(COLUMN_KEY AS CHAR) \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? \
                 ORDER BY ORDINAL_POSITION",
            )
            .bind(table.to_string())
            .fetch_all(pool)
            .await?;
            // MariaDB's JSON type is LONGTEXT with a JSON_VALID check; MySQL 8 has no
            // TABLE_NAME in this view (its JSON columns say `json` anyway).
            let checks: Vec<String> = match sqlx::query(
                "SELECT CAST(CHECK_CLAUSE AS CHAR) FROM information_schema.CHECK_CONSTRAINTS \
                 WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            )
            .bind(table.to_string())
            .fetch_all(pool)
            .await
            {
                Ok(rows) => rows
                    .iter()
                    .filter_map(|r| r.try_get::<String, _>(0).ok())
                    .map(|c| c.to_ascii_lowercase())
                    .collect(),
                Err(_) => Vec::new(),
            };
            for r in rows {
                let name: String = r.try_get(0)?;
                let extra: String = r.try_get::<Option<String>, _>(3)?.unwrap_or_default();
                let extra = extra.to_ascii_lowercase();
                // The clause quotes the name as the session does (`x`, or "x" with ANSI_QUOTES).
                let lower = name.to_ascii_lowercase();
                let json_check = checks.iter().any(|c| {
                    c.contains(&format!("json_valid(`{lower}`)"))
                        || c.contains(&format!("json_valid(\"{lower}\")"))
                });
                cols.push(CatalogColumn {
                    data_type: r.try_get(1)?,
                    sql_type: r.try_get(2)?,
                    auto: extra.contains("auto_increment"),
                    on_update: extra.contains("on update"),
                    primary: r.try_get::<Option<String>, _>(4)?.as_deref() == Some("PRI"),
                    json_check,
                    name,
                });
            }
        }
    }
    Ok(cols)
}

/// Tables this table's foreign keys reference.
async fn references(pool: &AnyPool, d: Dialect, table: &str) -> Result<Vec<String>> {
    let rows = match d {
        Dialect::Sqlite => {
            sqlx::query("SELECT DISTINCT \"table\" FROM pragma_foreign_key_list(?1)")
                .bind(table.to_string())
                .fetch_all(pool)
                .await?
        }
        Dialect::Postgres => {
            sqlx::query(
                "SELECT DISTINCT c.confrelid::regclass::text FROM pg_constraint c \
                 WHERE c.conrelid = to_regclass($1) AND c.contype = 'f'",
            )
            .bind(q(table))
            .fetch_all(pool)
            .await?
        }
        Dialect::Mysql => {
            sqlx::query(
                "SELECT DISTINCT CAST(REFERENCED_TABLE_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND REFERENCED_TABLE_NAME IS NOT NULL",
            )
            .bind(table.to_string())
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter()
        .map(|r| {
            let name: String = r.try_get(0)?;
            // regclass text may be schema-qualified or quoted.
            let name = name.rsplit('.').next().unwrap_or(&name).trim_matches('"');
            Ok(name.to_string())
        })
        .collect()
}

/// The progression this server allocates the table's new keys from (`None` where the
/// database does not say: SQLite's rowid, a key with no sequence behind it).
async fn key_range(pool: &AnyPool, d: Dialect, t: &TypedTable) -> Result<Option<KeyRange>> {
    Ok(match d {
        Dialect::Sqlite => None,
        Dialect::Mysql => {
            let row = sqlx::query(
                "SELECT CAST(@@auto_increment_increment AS SIGNED), CAST(@@auto_increment_offset AS SIGNED)",
            )
            .fetch_one(pool)
            .await?;
            let (step, offset): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            // MySQL ignores an offset greater than the increment (which values it then uses is
            // not worth guessing): unknown, so a two-way config must say who allocates.
            (offset <= step).then_some(KeyRange { step, offset })
        }
        Dialect::Postgres => sqlx::query(
            // The next keys follow the last one handed out (setval moves it), and a cycling
            // sequence wraps to a value off its progression: unknown.
            "SELECT s.increment_by, coalesce(s.last_value, s.start_value) FROM pg_sequences s \
             WHERE (s.schemaname || '.' || s.sequencename)::regclass = \
               pg_get_serial_sequence($1, $2)::regclass AND NOT s.cycle",
        )
        .bind(q(&t.table))
        .bind(t.key[0].name.clone())
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .map(|r| -> Result<KeyRange> {
            Ok(KeyRange {
                step: r.try_get(0)?,
                offset: r.try_get(1)?,
            })
        })
        .transpose()?
        .filter(|r| r.step != 0),
    })
}

/// Maps `spec` onto its table: checks the columns, adds `updated_at` if asked, and installs
/// the index and change-capture triggers. Returns the mapping and what the engine must know.
pub(super) async fn prepare(
    pool: &AnyPool,
    d: Dialect,
    spec: &TableSpec,
) -> Result<(TypedTable, TableFacts)> {
    let mut cols = catalog(pool, d, &spec.table).await?;
    if cols.is_empty() {
        return Err(fatal(format!(
            "collection {}: table {:?} does not exist (or has no columns) in this database",
            spec.collection, spec.table
        )));
    }
    // A MySQL table's `ON UPDATE CURRENT_TIMESTAMP` column is its modification time, whatever
    // its name, when the configured name is not there.
    let mut upd_name = spec.updated_at.clone();
    if !cols.iter().any(|c| c.name == upd_name) {
        let stamped: Vec<&CatalogColumn> = cols.iter().filter(|c| c.on_update).collect();
        if let [only] = stamped.as_slice() {
            info!(table = %spec.table, column = %only.name, "using the ON UPDATE CURRENT_TIMESTAMP column as the modification time");
            upd_name = only.name.clone();
        }
    }
    if !cols.iter().any(|c| c.name == upd_name) {
        if !spec.add_updated_at {
            return Err(fatal(format!(
                "collection {}: table {} has no column {:?} for the modification time; name the right one \
                 with `updated_at = \"...\"`, or set `add_updated_at = true` to let the bridge add it",
                spec.collection, spec.table, spec.updated_at
            )));
        }
        let (t, c) = (q(&spec.table), q(&spec.updated_at));
        let sql = match d {
            Dialect::Sqlite => {
                format!("ALTER TABLE {t} ADD COLUMN {c} TEXT NOT NULL DEFAULT '{SQLITE_UNSTAMPED}'")
            }
            Dialect::Postgres => format!(
                "ALTER TABLE {t} ADD COLUMN {c} TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()"
            ),
            Dialect::Mysql => format!(
                "ALTER TABLE {t} ADD COLUMN {c} TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) \
                 ON UPDATE CURRENT_TIMESTAMP(3)"
            ),
        };
        sqlx::query(AssertSqlSafe(sql))
            .execute(pool)
            .await
            .with_context(|| format!("adding {} to {}", spec.updated_at, spec.table))?;
        info!(table = %spec.table, column = %spec.updated_at, "added the modification-time column");
        cols = catalog(pool, d, &spec.table).await?;
    }
    let find = |name: &str| cols.iter().find(|c| c.name == name);
    let to_column = |c: &CatalogColumn| Column {
        name: c.name.clone(),
        kind: if c.json_check {
            Kind::Json
        } else {
            kind_of(d, &c.data_type, &c.sql_type)
        },
        sql_type: c.sql_type.clone(),
        cast_type: c.data_type.clone(),
    };
    let mut key = Vec::new();
    for name in &spec.key {
        key.push(find(name).ok_or_else(|| {
            fatal(format!(
                "collection {}: table {} has no key column {name:?}",
                spec.collection, spec.table
            ))
        })?);
    }
    let primary: Vec<&str> = cols
        .iter()
        .filter(|c| c.primary)
        .map(|c| c.name.as_str())
        .collect();
    let mut named: Vec<&str> = spec.key.iter().map(String::as_str).collect();
    named.sort_unstable();
    let mut primary_sorted = primary.clone();
    primary_sorted.sort_unstable();
    if named != primary_sorted {
        warn!(table = %spec.table, key = ?spec.key, primary_key = ?primary, "the key columns are not the primary key: make sure they are unique together");
    }
    let auto = key.iter().any(|c| c.auto);
    let upd = find(&upd_name).expect("checked above");
    let upd_col = to_column(upd);
    let ts_ok = match d {
        Dialect::Sqlite => true,
        _ => matches!(upd_col.kind, Kind::Timestamp | Kind::DateTime),
    };
    if !ts_ok {
        return Err(fatal(format!(
            "collection {}: {}.{} is {}, not a timestamp column",
            spec.collection, spec.table, spec.updated_at, upd.sql_type
        )));
    }
    if d == Dialect::Mysql && !upd.on_update {
        warn!(
            table = %spec.table, column = %upd_name,
            "no ON UPDATE CURRENT_TIMESTAMP: an application UPDATE that does not set it looks unchanged in time"
        );
    }
    if d == Dialect::Mysql && !upd.sql_type.contains('(') {
        warn!(
            table = %spec.table, column = %upd_name,
            "whole-second timestamps: edits within one second tie, decided by content hash"
        );
    }
    let mut columns = Vec::new();
    match &spec.columns {
        Some(names) => {
            for n in names {
                let c = find(n).ok_or_else(|| {
                    fatal(format!(
                        "collection {}: table {} has no column {n:?}",
                        spec.collection, spec.table
                    ))
                })?;
                if !spec.key.contains(&c.name) && c.name != upd_name {
                    columns.push(to_column(c));
                }
            }
        }
        None => {
            for c in &cols {
                if !spec.key.contains(&c.name) && c.name != upd_name {
                    columns.push(to_column(c));
                }
            }
        }
    }
    let table = TypedTable {
        collection: spec.collection.clone(),
        table: spec.table.clone(),
        key: key.into_iter().map(to_column).collect(),
        updated_at: upd_col,
        columns,
    };
    let (ddl, triggers) = capture_ddl(d, &table);
    for sql in ddl {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .execute(pool)
            .await
            .with_context(|| format!("installing change capture on {}: {sql}", spec.table))?;
    }
    drop_stale_triggers(pool, d, &table, &triggers).await?;
    if d == Dialect::Mysql {
        ensure_mysql_index(pool, &table).await?;
    }
    let facts = TableFacts {
        collection: spec.collection.clone(),
        references: references(pool, d, &spec.table).await?,
        auto_increment: auto,
        // A composite key's allocation has no single progression: say who allocates.
        key_range: if auto && table.key.len() == 1 {
            key_range(pool, d, &table).await?
        } else {
            None
        },
    };
    info!(collection = %table.collection, table = %table.table, columns = table.columns.len(), "typed table mapped");
    Ok((table, facts))
}

/// A mapping error no wait can fix (a missing table or column): the bridge exits with it.
fn fatal(msg: String) -> anyhow::Error {
    crate::stores::Fatal(msg).into()
}

/// The value a SQLite `updated_at` added by the bridge starts with; the insert trigger
/// stamps rows the application inserts without one.
const SQLITE_UNSTAMPED: &str = "1970-01-01T00:00:00.000Z";

/// MySQL 8 has no `CREATE INDEX IF NOT EXISTS`: look first.
async fn ensure_mysql_index(pool: &AnyPool, t: &TypedTable) -> Result<()> {
    let found = sqlx::query(
        "SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() \
         AND TABLE_NAME = ? AND COLUMN_NAME = ? AND SEQ_IN_INDEX = 1 LIMIT 1",
    )
    .bind(t.table.clone())
    .bind(t.updated_at.name.clone())
    .fetch_optional(pool)
    .await?;
    if found.is_none() {
        let sql = format!(
            "CREATE INDEX {} ON {} ({}, {})",
            q(&format!("_syncbridge_{}_updated_at", t.collection)),
            q(&t.table),
            q(&t.updated_at.name),
            t.key_list()
        );
        sqlx::query(AssertSqlSafe(sql)).execute(pool).await?;
    }
    Ok(())
}

/// Drops the bridge's triggers on this table other than `current` (SQLite, MySQL): those of an
/// earlier mapping (another key, another `updated_at`), which would log ids the reads no
/// longer build. They go after the current ones exist, so no write is ever uncaptured (in
/// between a change is logged twice, which the conditional applies make harmless).
async fn drop_stale_triggers(
    pool: &AnyPool,
    d: Dialect,
    t: &TypedTable,
    current: &[String],
) -> Result<()> {
    let sql = match d {
        Dialect::Postgres => return Ok(()), // CREATE OR REPLACE replaces them in place
        Dialect::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?",
        Dialect::Mysql => {
            "SELECT CAST(TRIGGER_NAME AS CHAR) FROM information_schema.TRIGGERS \
             WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = ?"
        }
    };
    let names: Vec<String> = sqlx::query(sql)
        .bind(t.table.clone())
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    for name in names {
        if name.starts_with("_syncbridge_") && !current.contains(&name) {
            sqlx::query(AssertSqlSafe(format!(
                "DROP TRIGGER IF EXISTS {}",
                q(&name)
            )))
            .execute(pool)
            .await
            .with_context(|| format!("dropping the stale trigger {name} on {}", t.table))?;
            info!(table = %t.table, trigger = %name, "dropped a change-capture trigger of an earlier mapping");
        }
    }
    Ok(())
}

/// The index by time (so sweeps cost what changed) and the triggers that fill the change log
/// and stamp UPDATEs that leave the time alone; with the triggers' names (SQLite, MySQL).
///
/// SQLite and MySQL cannot replace a trigger in place, so each name ends in a digest of the
/// statements: a changed mapping makes new names, and [`drop_stale_triggers`] removes the
/// old ones.
fn capture_ddl(d: Dialect, t: &TypedTable) -> (Vec<String>, Vec<String>) {
    let ddl = capture_statements(d, t);
    if d == Dialect::Postgres {
        return (ddl, Vec::new());
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(ddl.join(";").as_bytes());
    let tag = hex::encode(&digest[..4]);
    let mut names = Vec::new();
    let ddl = ddl
        .into_iter()
        .map(|sql| {
            if let Some(start) = sql.find(TRIGGER_TAG) {
                let begin = sql[..start].rfind('"').expect("a quoted trigger name") + 1;
                names.push(format!("{}{tag}", &sql[begin..start]));
            }
            sql.replace(TRIGGER_TAG, &tag)
        })
        .collect();
    (ddl, names)
}

/// Stands for the statements' digest in trigger names until [`capture_ddl`] knows it.
const TRIGGER_TAG: &str = "@tag@";

/// A trigger's name, quoted: `_syncbridge_<collection>_<kind>_<digest>`, without the
/// collection where that would pass MySQL's 64 characters (the digest, over statements that
/// name the collection, tells them apart).
fn trigger_name(collection: &str, kind: &str) -> String {
    let digest_len = 8;
    let full = format!("_syncbridge_{collection}_{kind}_");
    if full.len() + digest_len <= 64 {
        format!("\"{full}{TRIGGER_TAG}\"")
    } else {
        format!("\"_syncbridge_{kind}_{TRIGGER_TAG}\"")
    }
}

fn capture_statements(d: Dialect, t: &TypedTable) -> Vec<String> {
    let (c, table, keys, upd) = (
        &t.collection,
        q(&t.table),
        t.key_list(),
        q(&t.updated_at.name),
    );
    let idx = q(&format!("_syncbridge_{c}_updated_at"));
    let name = format!("'{c}'");
    // Every change-log row goes through the one fan-out rule (a row per consumer).
    let log = |id: &str, when: Option<&str>| d.log_insert(&name, id, when);
    // The id as the reads build it (`read_expr` of each key column, encoded as `encode_key`
    // does), so a logged id is exactly the id the listener then reads by.
    let id_of = |row: &str| {
        let parts: Vec<String> = t.key.iter().map(|k| read_expr_on(d, k, row)).collect();
        key_id_sql(d, &parts)
    };
    let (new_id, old_id) = (id_of("NEW."), id_of("OLD."));
    let [ins_name, mark_name, upd_name, del_name] =
        ["ins", "mark", "upd", "del"].map(|kind| trigger_name(c, kind));
    // A row with a NULL key part has no id (SQLite allows NULL in a composite primary key, and
    // a configured unique key may be nullable): it is not synced, and must not make the
    // application's own write fail on the change log's NOT NULL id.
    let log = |id: &str, when: Option<&str>| {
        let has_id = format!("{id} IS NOT NULL");
        let when = match when {
            Some(w) => format!("({w}) AND {has_id}"),
            None => has_id,
        };
        log(id, Some(&when))
    };
    // `WHERE` for the row NEW names.
    let this_row = t.each_key(" AND ", |k| format!("{k} = NEW.{k}"));
    match d {
        Dialect::Sqlite => {
            let key_changed = t.each_key(" OR ", |k| format!("OLD.{k} IS NOT NEW.{k}"));
            vec![
                format!("CREATE INDEX IF NOT EXISTS {idx} ON {table} ({upd}, {keys})"),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {ins_name} AFTER INSERT ON {table} BEGIN \
                     UPDATE {table} SET {upd} = strftime('%Y-%m-%dT%H:%M:%fZ','now') \
                       WHERE {this_row} AND NEW.{upd} = '{SQLITE_UNSTAMPED}'; \
                     {}; END",
                    log(&new_id, None)
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {mark_name} BEFORE UPDATE OF {upd} ON {table} BEGIN \
                     INSERT OR REPLACE INTO {TS_MARKS}(collection, id) VALUES ('{c}', {new_id}); END"
                ),
                // As for the bridge's own tables: an UPDATE that does not assign the time gets
                // the current one, or last-writer-wins could take the edit for a stale copy.
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {upd_name} AFTER UPDATE ON {table} BEGIN \
                     UPDATE {table} SET {upd} = strftime('%Y-%m-%dT%H:%M:%fZ','now') \
                       WHERE {this_row} AND NEW.{upd} IS OLD.{upd} \
                       AND NOT EXISTS (SELECT 1 FROM {TS_MARKS} WHERE collection = '{c}' AND id = {new_id}); \
                     DELETE FROM {TS_MARKS} WHERE collection = '{c}' AND id = {new_id}; \
                     {}; {}; END",
                    log(&new_id, None),
                    log(&old_id, Some(&format!("({key_changed})")))
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {del_name} AFTER DELETE ON {table} BEGIN \
                     {}; END",
                    log(&old_id, None)
                ),
            ]
        }
        Dialect::Postgres => {
            let cap = q(&format!("_syncbridge_capture_{c}"));
            let mark = q(&format!("_syncbridge_mark_{c}"));
            let stamp = q(&format!("_syncbridge_stamp_{c}"));
            let key_changed = t.each_key(" OR ", |k| format!("OLD.{k} IS DISTINCT FROM NEW.{k}"));
            vec![
                format!("CREATE INDEX IF NOT EXISTS {idx} ON {table} ({upd}, {keys})"),
                format!(
                    "CREATE OR REPLACE FUNCTION {cap}() RETURNS trigger LANGUAGE plpgsql AS $fn$
                     BEGIN
                       IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND ({key_changed})) THEN
                         {old_row};
                       END IF;
                       IF TG_OP <> 'DELETE' THEN
                         {new_row};
                       END IF;
                       PERFORM pg_notify('{NOTIFY_CHANNEL}', '{c}');
                       RETURN NULL;
                     END $fn$",
                    old_row = log(&old_id, None),
                    new_row = log(&new_id, None),
                ),
                format!(
                    "CREATE OR REPLACE FUNCTION {mark}() RETURNS trigger LANGUAGE plpgsql AS $fn$
                     BEGIN
                       PERFORM set_config('syncbridge.ts_assigned', {new_id}, true);
                       RETURN NEW;
                     END $fn$"
                ),
                format!(
                    "CREATE OR REPLACE FUNCTION {stamp}() RETURNS trigger LANGUAGE plpgsql AS $fn$
                     DECLARE assigned BOOLEAN := coalesce(current_setting('syncbridge.ts_assigned', true), '') = {new_id};
                     BEGIN
                       PERFORM set_config('syncbridge.ts_assigned', '', true);
                       IF NOT assigned AND NEW.{upd} IS NOT DISTINCT FROM OLD.{upd}
                          AND to_jsonb(NEW) IS DISTINCT FROM to_jsonb(OLD) THEN
                         NEW.{upd} := clock_timestamp();
                       END IF;
                       RETURN NEW;
                     END $fn$"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER \"_syncbridge_capture\" AFTER INSERT OR UPDATE OR DELETE \
                     ON {table} FOR EACH ROW EXECUTE FUNCTION {cap}()"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER \"_syncbridge_mark\" BEFORE UPDATE OF {upd} \
                     ON {table} FOR EACH ROW EXECUTE FUNCTION {mark}()"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER \"_syncbridge_stamp\" BEFORE UPDATE \
                     ON {table} FOR EACH ROW EXECUTE FUNCTION {stamp}()"
                ),
            ]
        }
        // Stamping is the column's own ON UPDATE CURRENT_TIMESTAMP.
        Dialect::Mysql => {
            let same_key = t.each_key(" AND ", |k| format!("OLD.{k} <=> NEW.{k}"));
            vec![
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {ins_name} AFTER INSERT ON {table} \
                     FOR EACH ROW {}",
                    log(&new_id, None)
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {upd_name} AFTER UPDATE ON {table} \
                     FOR EACH ROW BEGIN {}; {}; END",
                    log(&new_id, None),
                    log(&old_id, Some(&format!("NOT ({same_key})")))
                ),
                format!(
                    "CREATE TRIGGER IF NOT EXISTS {del_name} AFTER DELETE ON {table} \
                     FOR EACH ROW {}",
                    log(&old_id, None)
                ),
            ]
        }
    }
}

/// A record id from a row's key texts: one column's text as it is; several, each with `~`
/// and `:` escaped as `~7E` and `~3A`, joined with `:` (`12:3`, `a~3Ab:7`). Readable for the
/// common integer keys, and reversible ([`decode_key`]) whatever the values hold.
fn encode_key(parts: &[String]) -> String {
    if let [one] = parts {
        return one.clone();
    }
    parts
        .iter()
        .map(|p| p.replace('~', "~7E").replace(':', "~3A"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The key texts of an id made by [`encode_key`] for `n` columns; `None` if it is not one.
fn decode_key(id: &str, n: usize) -> Option<Vec<String>> {
    if n == 1 {
        return Some(vec![id.to_string()]);
    }
    let parts: Vec<&str> = id.split(':').collect();
    if parts.len() != n {
        return None;
    }
    parts
        .into_iter()
        .map(|p| {
            let mut out = String::with_capacity(p.len());
            let mut rest = p;
            while let Some(i) = rest.find('~') {
                out.push_str(&rest[..i]);
                let esc = rest.get(i..i + 3)?;
                out.push(match esc {
                    "~7E" => '~',
                    "~3A" => ':',
                    _ => return None,
                });
                rest = &rest[i + 3..];
            }
            out.push_str(rest);
            Some(out)
        })
        .collect()
}

/// [`encode_key`] in SQL, over the key columns' text expressions (for the triggers).
fn key_id_sql(d: Dialect, parts: &[String]) -> String {
    if let [one] = parts {
        return one.clone();
    }
    let escaped: Vec<String> = parts
        .iter()
        .map(|p| format!("REPLACE(REPLACE({p}, '~', '~7E'), ':', '~3A')"))
        .collect();
    match d {
        Dialect::Mysql => format!("CONCAT({})", escaped.join(", ':', ")),
        Dialect::Sqlite | Dialect::Postgres => escaped.join(" || ':' || "),
    }
}

/// A column's value as exact text, in SQL.
fn read_expr(d: Dialect, c: &Column) -> String {
    read_expr_on(d, c, "")
}

/// [`read_expr`] of the column in `row` (`NEW.`, `OLD.` in a trigger; empty for the table).
fn read_expr_on(d: Dialect, c: &Column, row: &str) -> String {
    let n = format!("{row}{}", q(&c.name));
    match (d, c.kind) {
        (Dialect::Sqlite, Kind::Blob) => format!("hex({n})"),
        (Dialect::Sqlite, _) => format!("CAST({n} AS TEXT)"),
        (Dialect::Postgres, Kind::Blob) => format!("encode({n}, 'hex')"),
        (Dialect::Postgres, Kind::Timestamp) => {
            format!("to_char({n} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        }
        (Dialect::Postgres, Kind::DateTime) => {
            format!("to_char({n}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')")
        }
        (Dialect::Postgres, _) => format!("{n}::text"),
        (Dialect::Mysql, Kind::Blob) => format!("HEX({n})"),
        // A trigger runs in the application's session time zone: from the instant itself
        // (seconds since the epoch, exact to the microsecond), not from its local reading.
        (Dialect::Mysql, Kind::Timestamp) if !row.is_empty() => format!(
            "DATE_FORMAT(DATE_ADD('1970-01-01 00:00:00', INTERVAL ROUND(UNIX_TIMESTAMP({n}) * 1000000) MICROSECOND), \
             '%Y-%m-%dT%H:%i:%s.%fZ')"
        ),
        // The bridge's sessions run in UTC, so a TIMESTAMP reads back as UTC.
        (Dialect::Mysql, Kind::Timestamp) => format!("DATE_FORMAT({n}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
        (Dialect::Mysql, Kind::DateTime) => format!("DATE_FORMAT({n}, '%Y-%m-%dT%H:%i:%s.%f')"),
        (Dialect::Mysql, _) => format!("CAST({n} AS CHAR)"),
    }
}

/// The modification time as RFC 3339 UTC text (a zoneless column is read as UTC).
fn ts_expr(d: Dialect, c: &Column) -> String {
    let n = q(&c.name);
    match d {
        Dialect::Sqlite => n,
        Dialect::Postgres if c.kind == Kind::DateTime => {
            format!("to_char({n}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        }
        Dialect::Mysql => format!("DATE_FORMAT({n}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
        Dialect::Postgres => read_expr(d, c),
    }
}

/// Placeholders, numbered as the statement goes (MySQL's are positional anyway).
struct Params {
    d: Dialect,
    n: usize,
    binds: Vec<Option<String>>,
}

impl Params {
    fn new(d: Dialect) -> Params {
        Params {
            d,
            n: 0,
            binds: Vec::new(),
        }
    }

    fn raw(&mut self, value: Option<String>) -> String {
        self.n += 1;
        self.binds.push(value);
        self.d.p(self.n)
    }

    /// A value for column `c`, cast to its type in the database.
    fn value(&mut self, c: &Column, value: Option<String>) -> String {
        let p = self.raw(value);
        match (self.d, c.kind) {
            (Dialect::Sqlite, Kind::Blob) => format!("unhex({p})"),
            (Dialect::Sqlite, _) => p,
            (Dialect::Postgres, Kind::Blob) => format!("decode({p}, 'hex')"),
            (Dialect::Postgres, _) => format!("CAST({p} AS {})", c.cast_type),
            (Dialect::Mysql, Kind::Blob) => format!("UNHEX({p})"),
            (Dialect::Mysql, _) => p,
        }
    }

    /// A modification time (RFC 3339 UTC text) for column `c`.
    fn ts(&mut self, c: &Column, ts: String) -> String {
        let p = self.raw(Some(ts));
        match self.d {
            Dialect::Sqlite => p,
            Dialect::Postgres if c.kind == Kind::DateTime => format!("CAST({p} AS timestamp)"),
            Dialect::Postgres => format!("CAST({p} AS timestamptz)"),
            Dialect::Mysql => format!("STR_TO_DATE({p}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
        }
    }

    fn query(self, sql: String) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for b in self.binds {
            query = query.bind(b);
        }
        query
    }
}

/// A column's text as JSON.
fn to_json(kind: Kind, text: &str) -> std::result::Result<Value, String> {
    Ok(match kind {
        Kind::Int => {
            if let Ok(i) = text.parse::<i64>() {
                Value::from(i)
            } else if let Ok(u) = text.parse::<u64>() {
                Value::from(u)
            } else {
                return Err(format!("{text:?} is not an integer"));
            }
        }
        Kind::Float => {
            let f: f64 = text
                .parse()
                .map_err(|_| format!("{text:?} is not a number"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("{text:?} has no JSON form"))?
        }
        Kind::Bool => match text {
            "1" | "t" | "true" => Value::Bool(true),
            "0" | "f" | "false" => Value::Bool(false),
            other => return Err(format!("{other:?} is not a boolean")),
        },
        Kind::Json => serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?,
        Kind::Blob => {
            let bytes = hex::decode(text).map_err(|e| format!("bad hex from the database: {e}"))?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Kind::Decimal | Kind::Text | Kind::Timestamp | Kind::DateTime => {
            Value::String(text.to_string())
        }
    })
}

/// A document field as the text the database casts into column `c`; `Err` says why the
/// value cannot go there.
fn from_json(d: Dialect, c: &Column, v: &Value) -> std::result::Result<Option<String>, String> {
    let bad = |what: &str| {
        Err(format!(
            "column {} ({}) cannot hold {what}",
            c.name, c.sql_type
        ))
    };
    Ok(Some(match (c.kind, v) {
        (_, Value::Null) => return Ok(None),
        (Kind::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        (Kind::Int, Value::String(s)) if s.parse::<i64>().is_ok() || s.parse::<u64>().is_ok() => {
            s.clone()
        }
        (Kind::Int, _) => return bad(&format!("{v}: not an integer")),
        (Kind::Float | Kind::Decimal, Value::Number(n)) => n.to_string(),
        (Kind::Float | Kind::Decimal, Value::String(s)) if s.trim().parse::<f64>().is_ok() => {
            s.trim().to_string()
        }
        (Kind::Float | Kind::Decimal, _) => return bad(&format!("{v}: not a number")),
        (Kind::Bool, Value::Bool(b)) => match (d, b) {
            (Dialect::Postgres, b) => b.to_string(),
            (_, true) => "1".into(),
            (_, false) => "0".into(),
        },
        (Kind::Bool, _) => return bad(&format!("{v}: not a boolean")),
        (Kind::Json, v) => v.to_string(),
        (Kind::Blob, Value::String(s)) => match base64::engine::general_purpose::STANDARD.decode(s)
        {
            Ok(bytes) => hex::encode(bytes),
            Err(_) => return bad("a string that is not base64"),
        },
        (Kind::Blob, _) => return bad(&format!("{v}: binary columns take base64 strings")),
        (Kind::Timestamp | Kind::DateTime, Value::String(s)) => match timestamp_text(s) {
            Some(t) => t,
            None => return bad(&format!("{s:?}: not an RFC 3339 timestamp")),
        },
        (Kind::Timestamp | Kind::DateTime, _) => return bad(&format!("{v}: not a timestamp")),
        (Kind::Text, Value::String(s)) => s.clone(),
        (Kind::Text, Value::Number(n)) => n.to_string(),
        (Kind::Text, Value::Bool(b)) => b.to_string(),
        (Kind::Text, _) => return bad("an object or array"),
    }))
}

/// RFC 3339 (any offset) or a zoneless `YYYY-MM-DD[T ]HH:MM:SS[.f]` (taken as UTC), as the
/// `YYYY-MM-DD HH:MM:SS.ffffff` UTC text every SQL dialect reads.
fn timestamp_text(s: &str) -> Option<String> {
    let naive = chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.naive_utc())
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"))
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
        .ok()?;
    Some(naive.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
}

/// How a failed statement ends for the record, if it is the record's fault.
fn classify(e: &sqlx::Error) -> Option<ApplyOutcome> {
    use sqlx::error::ErrorKind;
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let msg = db.message().to_string();
    let code = db.code().map(|c| c.to_string()).unwrap_or_default();
    let mysql_number = db
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|m| m.number());
    match db.kind() {
        ErrorKind::ForeignKeyViolation => Some(ApplyOutcome::Deferred(format!(
            "waiting for a row it references (or that references it): {msg}"
        ))),
        ErrorKind::NotNullViolation | ErrorKind::CheckViolation => {
            Some(ApplyOutcome::Rejected(msg))
        }
        // SQLSTATE class 22: data exception (too long, out of range, bad value for the type
        // or enum); MySQL strict mode reports some of its own under other classes.
        _ if code.starts_with("22") => Some(ApplyOutcome::Rejected(msg)),
        _ if matches!(
            mysql_number,
            Some(1048 | 1263 | 1264 | 1265 | 1292 | 1366 | 1406 | 1452 | 1451 | 4025)
        ) =>
        {
            if matches!(mysql_number, Some(1451 | 1452)) {
                Some(ApplyOutcome::Deferred(msg))
            } else {
                Some(ApplyOutcome::Rejected(msg))
            }
        }
        // SQLite reports type mismatches on STRICT tables as SQLITE_CONSTRAINT_DATATYPE.
        _ if code == "3091" => Some(ApplyOutcome::Rejected(msg)),
        _ => None,
    }
}

impl TypedTable {
    /// The key columns, quoted, comma-separated (for `ORDER BY`, indexes, row values).
    fn key_list(&self) -> String {
        self.each_key(", ", str::to_string)
    }

    /// `each(quoted column name)` for every key column, joined with `sep`.
    fn each_key(&self, sep: &str, each: impl Fn(&str) -> String) -> String {
        self.key
            .iter()
            .map(|k| each(&q(&k.name)))
            .collect::<Vec<_>>()
            .join(sep)
    }

    /// The key columns' texts, then the time, then the synced columns.
    fn select_list(&self, d: Dialect) -> String {
        let mut cols: Vec<String> = self.key.iter().map(|k| read_expr(d, k)).collect();
        cols.push(format!("{} AS ts", ts_expr(d, &self.updated_at)));
        cols.extend(self.columns.iter().map(|c| read_expr(d, c)));
        cols.join(", ")
    }

    /// The key columns' texts for `id`, or why it cannot be a key of this table at all (an
    /// id "abc" cannot be an integer key: such a record is absent, and a write of it is
    /// refused).
    fn key_texts(&self, d: Dialect, id: &str) -> std::result::Result<Vec<String>, String> {
        let parts = decode_key(id, self.key.len()).ok_or_else(|| {
            format!(
                "not a key of {} ({} values joined with ':')",
                self.table,
                self.key.len()
            )
        })?;
        // Each part is the database's text for the value (as `read_expr` gives it: hex for
        // binary, `t`/`1` for booleans): through its JSON form back to the text this dialect
        // casts into the column, which also refuses a part the column cannot hold.
        self.key
            .iter()
            .zip(parts)
            .map(|(k, part)| {
                let value = to_json(k.kind, &part).map_err(|e| format!("key {}: {e}", k.name))?;
                from_json(d, k, &value)?.ok_or_else(|| "an empty key".to_string())
            })
            .collect()
    }

    /// `k1 = v1 AND k2 = v2 ...` for the key texts of one record.
    fn key_match(&self, p: &mut Params, texts: &[String]) -> String {
        self.key
            .iter()
            .zip(texts)
            .map(|(k, t)| format!("{} = {}", q(&k.name), p.value(k, Some(t.clone()))))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The key texts of one record as placeholders cast to their columns, in key order.
    fn key_values(&self, p: &mut Params, texts: &[String]) -> Vec<String> {
        self.key
            .iter()
            .zip(texts)
            .map(|(k, t)| p.value(k, Some(t.clone())))
            .collect()
    }

    /// The key texts of one record as a SQL row value `(v1, v2)` (one column: `v1`).
    fn key_row(&self, p: &mut Params, texts: &[String]) -> String {
        let values = self.key_values(p, texts);
        if values.len() == 1 {
            values.into_iter().next().expect("one")
        } else {
            format!("({})", values.join(", "))
        }
    }

    /// A row as a slot.
    fn row_slot(&self, row: &AnyRow) -> Result<(String, Slot, Vec<Option<String>>)> {
        let k = self.key.len();
        let mut doc = Map::new();
        let mut problem = None;
        let mut parts = Vec::with_capacity(k);
        for (i, key) in self.key.iter().enumerate() {
            let text: Option<String> = row.try_get(i)?;
            let Some(text) = text else {
                problem.get_or_insert(format!("key column {} is NULL", key.name));
                parts.push(String::new());
                continue;
            };
            match to_json(key.kind, &text) {
                Ok(v) => {
                    doc.insert(key.name.clone(), v);
                }
                Err(e) => {
                    problem.get_or_insert(format!("key {}: {e}", key.name));
                }
            }
            parts.push(text);
        }
        let id = encode_key(&parts);
        let ts: Option<String> = row.try_get(k)?;
        let mut texts: Vec<Option<String>> = vec![ts.clone()];
        for (i, c) in self.columns.iter().enumerate() {
            let text: Option<String> = row.try_get(k + 1 + i)?;
            let value = match &text {
                None => Value::Null,
                Some(t) => match to_json(c.kind, t) {
                    Ok(v) => v,
                    Err(e) => {
                        problem.get_or_insert(format!("column {}: {e}", c.name));
                        Value::Null
                    }
                },
            };
            doc.insert(c.name.clone(), value);
            texts.push(text);
        }
        let Some(ms) = ts.as_deref().and_then(parse_ts) else {
            let slot = Slot::Invalid(format!(
                "{}.{} {ts:?} is not an RFC 3339 timestamp (SQLite tables keep it as \
                 strftime('%Y-%m-%dT%H:%M:%fZ') text)",
                self.table, self.updated_at.name
            ));
            return Ok((id, slot, texts));
        };
        if let Some(p) = problem {
            return Ok((id, Slot::Invalid(p), texts));
        }
        let etag = serde_json::to_string(&texts).expect("strings serialize");
        let slot = Slot::Present(StoredRecord {
            id: id.clone(),
            doc: with_updated_at(Value::Object(doc), ms),
            updated_at_ms: Some(ms),
            etag,
        });
        Ok((id, slot, texts))
    }

    /// Reads these ids, one slot each, in order.
    pub(super) async fn read<'e, E>(&self, d: Dialect, exec: E, ids: &[String]) -> Result<Vec<Slot>>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let mut p = Params::new(d);
        let mut placeholders = Vec::new();
        for id in ids {
            if let Ok(k) = self.key_texts(d, id) {
                placeholders.push(self.key_row(&mut p, &k));
            }
        }
        let mut found: BTreeMap<String, Slot> = BTreeMap::new();
        if !placeholders.is_empty() {
            let keys = if self.key.len() == 1 {
                self.key_list()
            } else {
                format!("({})", self.key_list())
            };
            let sql = format!(
                "SELECT {} FROM {} WHERE {keys} IN ({})",
                self.select_list(d),
                q(&self.table),
                placeholders.join(",")
            );
            for row in p.query(sql).fetch_all(exec).await? {
                let (id, slot, _) = self.row_slot(&row)?;
                found.insert(id, slot);
            }
        }
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or(Slot::Absent))
            .collect())
    }

    /// One page of rows changed at or after `since_ms`, in `(updated_at, key)` order.
    pub(super) async fn scan(
        &self,
        d: Dialect,
        pool: &AnyPool,
        since_ms: Option<i64>,
        cursor: Option<String>,
        limit: usize,
    ) -> Result<crate::stores::ScanPage> {
        let (upd, keys) = (q(&self.updated_at.name), self.key_list());
        let mut p = Params::new(d);
        // Rows with a NULL key part have no id: not synced (see `capture_ddl`).
        let mut conds: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{} IS NOT NULL", q(&k.name)))
            .collect();
        if let Some(s) = since_ms {
            conds.push(format!("{upd} >= {}", p.ts(&self.updated_at, format_ts(s))));
        }
        if let Some((ts, id)) = cursor.as_deref().and_then(|c| c.split_once('\n')) {
            let texts = self
                .key_texts(d, id)
                .map_err(|e| anyhow::anyhow!("scan cursor of {}: {e}", self.table))?;
            let t1 = p.ts(&self.updated_at, ts.to_string());
            if d == Dialect::Mysql {
                let t2 = p.ts(&self.updated_at, ts.to_string());
                let k = self.key_row(&mut p, &texts);
                let (lhs, rhs) = if self.key.len() == 1 {
                    (keys.clone(), k)
                } else {
                    (format!("({keys})"), k)
                };
                conds.push(format!(
                    "({upd} > {t1} OR ({upd} = {t2} AND {lhs} > {rhs}))"
                ));
            } else {
                // One index range (see the bridge's own tables' scan).
                let values = self.key_values(&mut p, &texts);
                conds.push(format!("({upd}, {keys}) > ({t1}, {})", values.join(", ")));
            }
        }
        let sql = format!(
            "SELECT {} FROM {} {} ORDER BY {upd}, {keys} LIMIT {}",
            self.select_list(d),
            q(&self.table),
            if conds.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conds.join(" AND "))
            },
            limit.max(1)
        );
        let rows = p.query(sql).fetch_all(pool).await?;
        let mut page = crate::stores::ScanPage::default();
        let full = rows.len() >= limit.max(1);
        let mut last = None;
        for row in rows {
            let (id, slot, texts) = self.row_slot(&row)?;
            match slot {
                Slot::Present(r) => {
                    // The cursor carries the time at the database's full precision.
                    let ts = texts[0].clone().unwrap_or_default();
                    last = Some(format!("{ts}\n{id}"));
                    page.records.push(r);
                }
                Slot::Invalid(reason) => {
                    let ts = texts[0].clone().unwrap_or_default();
                    last = Some(format!("{ts}\n{id}"));
                    page.invalid.push((id, reason));
                }
                Slot::Absent => {}
            }
        }
        page.next = if full { last } else { None };
        Ok(page)
    }

    /// The guard of a conditional write: the row still holds exactly what the etag says.
    fn guard(&self, d: Dialect, p: &mut Params, etag: &str) -> Result<String> {
        let texts: Vec<Option<String>> =
            serde_json::from_str(etag).context("malformed etag for a typed table")?;
        if texts.len() != self.columns.len() + 1 {
            bail!("stale etag: the table's columns changed since it was read");
        }
        let mut exprs = vec![ts_expr(d, &self.updated_at)];
        exprs.extend(self.columns.iter().map(|c| read_expr(d, c)));
        Ok(exprs
            .into_iter()
            .zip(texts)
            .map(|(e, t)| {
                let ph = p.raw(t);
                match d {
                    Dialect::Sqlite => format!("{e} IS {ph}"),
                    Dialect::Postgres => format!("{e} IS NOT DISTINCT FROM {ph}"),
                    // Byte for byte: the default collations ignore case and trailing spaces.
                    Dialect::Mysql => format!("CAST({e} AS BINARY) <=> CAST({ph} AS BINARY)"),
                }
            })
            .collect::<Vec<_>>()
            .join(" AND "))
    }

    /// The column texts of a document to write, or why it cannot be written here.
    fn values(&self, d: Dialect, doc: &Value) -> std::result::Result<Vec<Option<String>>, String> {
        let Value::Object(fields) = doc else {
            return Err("the document is not an object".into());
        };
        for name in fields.keys() {
            if name != "updatedAt"
                && !self.key.iter().any(|k| &k.name == name)
                && !self.columns.iter().any(|c| &c.name == name)
            {
                return Err(format!(
                    "field {name:?} has no column in table {} (synced columns: {})",
                    self.table,
                    self.columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        self.columns
            .iter()
            .map(|c| from_json(d, c, fields.get(&c.name).unwrap_or(&Value::Null)))
            .collect()
    }

    /// Applies one conditional write in its own savepoint, so a refused value does not
    /// abort the rest of the batch (PostgreSQL aborts a transaction at its first error).
    pub(super) async fn apply_one(
        &self,
        d: Dialect,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        record: &ChangeRecord,
        expected: Option<&str>,
    ) -> Result<ApplyOutcome> {
        let key = match self.key_texts(d, &record.id) {
            Ok(k) => k,
            Err(e) => return Ok(ApplyOutcome::Rejected(format!("id {:?}: {e}", record.id))),
        };
        let t = q(&self.table);
        let mut p = Params::new(d);
        let sql = match (&record.doc, record.op, expected) {
            (Some(doc), Op::Upsert, expected) => {
                let values = match self.values(d, doc) {
                    Ok(v) => v,
                    Err(e) => return Ok(ApplyOutcome::Rejected(e)),
                };
                match expected {
                    None => {
                        let mut names = Vec::new();
                        let mut exprs = Vec::new();
                        names.extend(self.key.iter().map(|k| q(&k.name)));
                        exprs.extend(self.key_values(&mut p, &key));
                        for (c, v) in self.columns.iter().zip(values) {
                            names.push(q(&c.name));
                            exprs.push(p.value(c, v));
                        }
                        names.push(q(&self.updated_at.name));
                        exprs.push(p.ts(&self.updated_at, format_ts(record.updated_at_ms)));
                        format!(
                            "INSERT INTO {t} ({}) VALUES ({})",
                            names.join(", "),
                            exprs.join(", ")
                        )
                    }
                    Some(etag) => {
                        let mut sets = Vec::new();
                        for (c, v) in self.columns.iter().zip(values) {
                            sets.push(format!("{} = {}", q(&c.name), p.value(c, v)));
                        }
                        sets.push(format!(
                            "{} = {}",
                            q(&self.updated_at.name),
                            p.ts(&self.updated_at, format_ts(record.updated_at_ms))
                        ));
                        let this = self.key_match(&mut p, &key);
                        let guard = self.guard(d, &mut p, etag)?;
                        format!(
                            "UPDATE {t} SET {} WHERE {this} AND {guard}",
                            sets.join(", ")
                        )
                    }
                }
            }
            (_, _, Some(etag)) => {
                let this = self.key_match(&mut p, &key);
                let guard = self.guard(d, &mut p, etag)?;
                format!("DELETE FROM {t} WHERE {this} AND {guard}")
            }
            (_, _, None) => String::new(),
        };
        let mut affected = 0;
        let mut duplicate = false;
        if !sql.is_empty() {
            let mut sp = tx.begin().await?;
            match p.query(sql).execute(&mut *sp).await {
                Ok(done) => {
                    affected = done.rows_affected();
                    sp.commit().await?;
                }
                Err(e) => {
                    sp.rollback().await?;
                    if let sqlx::Error::Database(db) = &e
                        && db.kind() == sqlx::error::ErrorKind::UniqueViolation
                    {
                        duplicate = true;
                    } else if let Some(outcome) = classify(&e) {
                        return Ok(outcome);
                    } else {
                        return Err(e.into());
                    }
                }
            }
        }
        if affected >= 1 {
            return Ok(ApplyOutcome::Applied);
        }
        // Not applied: the store already holds the result (a replay), or it moved on.
        let current = self
            .read(d, &mut **tx, std::slice::from_ref(&record.id))
            .await?
            .pop()
            .unwrap_or(Slot::Absent);
        Ok(match (current, &record.doc, record.op) {
            (Slot::Absent, _, Op::Delete) => ApplyOutcome::Unchanged,
            (Slot::Absent, _, _) if duplicate => ApplyOutcome::Rejected(format!(
                "a unique column of {} already holds one of this row's values",
                self.table
            )),
            (Slot::Present(cur), Some(doc), Op::Upsert)
                if canonical_hash(&cur.doc) == canonical_hash(doc) =>
            {
                ApplyOutcome::Unchanged
            }
            _ => ApplyOutcome::Conflict,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_ids_are_readable_and_decode_exactly() {
        let parts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(encode_key(&parts(&["12", "3"])), "12:3");
        assert_eq!(encode_key(&parts(&["a:b", "~"])), "a~3Ab:~7E");
        // One column: the value itself, whatever it holds.
        assert_eq!(encode_key(&parts(&["a:b~"])), "a:b~");
        assert_eq!(decode_key("a:b~", 1), Some(parts(&["a:b~"])));
        for v in [
            parts(&["12", "3"]),
            parts(&["", ":"]),
            parts(&["~3A", "~7E~"]),
            parts(&["x", "y", "z:~:"]),
        ] {
            assert_eq!(
                decode_key(&encode_key(&v), v.len()),
                Some(v.clone()),
                "{v:?}"
            );
        }
        assert_eq!(decode_key("1:2:3", 2), None, "too many parts");
        assert_eq!(decode_key("12", 2), None, "too few");
        assert_eq!(decode_key("a~zz:1", 2), None, "not an escape");
        assert_eq!(decode_key("a~3:1", 2), None, "a cut escape");
    }

    proptest::proptest! {
        #[test]
        fn composite_ids_round_trip(parts in proptest::collection::vec(".*", 2..4)) {
            proptest::prop_assert_eq!(decode_key(&encode_key(&parts), parts.len()), Some(parts));
        }
    }

    fn col(kind: Kind) -> Column {
        Column {
            name: "c".into(),
            kind,
            sql_type: "t".into(),
            cast_type: "t".into(),
        }
    }

    #[test]
    fn key_parts_are_database_texts() {
        let t = TypedTable {
            collection: "c".into(),
            table: "t".into(),
            key: vec![col(Kind::Blob), col(Kind::Bool), col(Kind::Int)],
            updated_at: col(Kind::Timestamp),
            columns: Vec::new(),
        };
        // As the reads give them: hex, the dialect's boolean text, digits.
        assert_eq!(
            t.key_texts(Dialect::Postgres, "00ff10:t:12"),
            Ok(vec!["00ff10".to_string(), "true".into(), "12".into()])
        );
        assert_eq!(
            t.key_texts(Dialect::Mysql, "00ff10:1:12"),
            Ok(vec!["00ff10".to_string(), "1".into(), "12".into()])
        );
        assert!(t.key_texts(Dialect::Sqlite, "zz:1:12").is_err(), "not hex");
        assert!(
            t.key_texts(Dialect::Sqlite, "00:1:x").is_err(),
            "not an integer"
        );
        assert!(
            t.key_texts(Dialect::Sqlite, "00:1").is_err(),
            "two parts of three"
        );
    }

    #[test]
    fn values_round_trip_through_their_text() {
        let cases: &[(Kind, &str, Value)] = &[
            (
                Kind::Int,
                "9007199254740993",
                serde_json::json!(9007199254740993_i64),
            ),
            (
                Kind::Int,
                "18446744073709551615",
                serde_json::json!(u64::MAX),
            ),
            (Kind::Decimal, "250.10", serde_json::json!("250.10")),
            (Kind::Bool, "1", Value::Bool(true)),
            (
                Kind::Json,
                "{\"a\":[1,2]}",
                serde_json::json!({"a": [1, 2]}),
            ),
            (Kind::Blob, "00FF10", serde_json::json!("AP8Q")),
            (Kind::Text, "pending", serde_json::json!("pending")),
        ];
        for (kind, text, json) in cases {
            assert_eq!(&to_json(*kind, text).unwrap(), json, "{kind:?} {text}");
            let back = from_json(Dialect::Mysql, &col(*kind), json)
                .unwrap()
                .unwrap();
            let again = to_json(*kind, &back.to_uppercase()).unwrap_or(Value::Null);
            if *kind != Kind::Text && *kind != Kind::Json {
                assert_eq!(&again, json, "{kind:?} {back}");
            }
        }
        assert_eq!(
            from_json(Dialect::Mysql, &col(Kind::Int), &Value::Null),
            Ok(None)
        );
    }

    #[test]
    fn values_a_column_cannot_hold_are_refused_with_the_reason() {
        let e = from_json(
            Dialect::Postgres,
            &col(Kind::Int),
            &serde_json::json!("abc"),
        )
        .unwrap_err();
        assert!(e.contains("not an integer"), "{e}");
        assert!(
            from_json(
                Dialect::Mysql,
                &col(Kind::Decimal),
                &serde_json::json!({"a": 1})
            )
            .is_err()
        );
        assert!(from_json(Dialect::Mysql, &col(Kind::Blob), &serde_json::json!("%%%")).is_err());
        assert!(
            from_json(
                Dialect::Mysql,
                &col(Kind::Timestamp),
                &serde_json::json!("yesterday")
            )
            .is_err()
        );
        assert!(from_json(Dialect::Mysql, &col(Kind::Text), &serde_json::json!([1])).is_err());
    }

    #[test]
    fn timestamps_are_normalized_to_utc() {
        assert_eq!(
            timestamp_text("2026-11-25T10:00:00.5+01:00").unwrap(),
            "2026-11-25 09:00:00.500000"
        );
        assert_eq!(
            timestamp_text("2026-11-25T10:00:00").unwrap(),
            "2026-11-25 10:00:00.000000"
        );
        assert!(timestamp_text("25/11/2026").is_none());
    }

    #[test]
    fn catalog_types_map_to_kinds() {
        assert_eq!(kind_of(Dialect::Mysql, "tinyint", "tinyint(1)"), Kind::Bool);
        assert_eq!(kind_of(Dialect::Mysql, "tinyint", "tinyint(4)"), Kind::Int);
        assert_eq!(
            kind_of(Dialect::Mysql, "decimal", "decimal(10,2)"),
            Kind::Decimal
        );
        assert_eq!(kind_of(Dialect::Mysql, "enum", "enum('a','b')"), Kind::Text);
        assert_eq!(
            kind_of(Dialect::Postgres, "numeric", "numeric(10,2)"),
            Kind::Decimal
        );
        assert_eq!(
            kind_of(Dialect::Postgres, "timestamp with time zone", "x"),
            Kind::Timestamp
        );
        assert_eq!(kind_of(Dialect::Sqlite, "INTEGER", "INTEGER"), Kind::Int);
        assert_eq!(
            kind_of(Dialect::Sqlite, "VARCHAR(20)", "VARCHAR(20)"),
            Kind::Text
        );
        assert_eq!(
            kind_of(Dialect::Sqlite, "DECIMAL(10,2)", "DECIMAL(10,2)"),
            Kind::Decimal
        );
    }
}
