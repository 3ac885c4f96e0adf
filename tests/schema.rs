//! End-to-end on an application's own typed schema: the offline-shop pattern (`users` and
//! `orders` with a foreign key, a DECIMAL amount, an ENUM status, `ON UPDATE
//! CURRENT_TIMESTAMP`), a local `db_a` and a central `db_b` in MariaDB, and again with
//! PostgreSQL as the central side. Every write goes through the `mysql`/`psql` CLIs, as the
//! application's own SQL; the bridge is configured with `table`/`key`/`updated_at` only.
//! Then every column type, SQL → Redis → SQL.

mod common;

use common::{Kind, TestBridge, TestStore, config, data_dir, eventually, path};
use serde_json::{Value, json};
use syncbridge::config::{CollectionConfig, Config, KeyAllocation};
use syncbridge::engine::policy::Mode;

/// The seed's schema, MariaDB flavour. `note` is shorter on the central side so that a row
/// the target cannot hold exists.
fn mysql_schema(note_len: usize) -> String {
    format!(
        "CREATE TABLE users (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(50) NOT NULL, \
           email VARCHAR(100), active TINYINT(1) NOT NULL DEFAULT 1, \
           updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)); \
         CREATE TABLE orders (id INT AUTO_INCREMENT PRIMARY KEY, user_id INT NOT NULL, \
           amount DECIMAL(10,2) NOT NULL, status ENUM('pending','paid','shipped') NOT NULL DEFAULT 'pending', \
           note VARCHAR({note_len}), \
           updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3), \
           FOREIGN KEY (user_id) REFERENCES users(id))"
    )
}

/// The same schema in PostgreSQL: an enum type, numeric, boolean, timestamptz.
const PG_SCHEMA: &str = "CREATE TYPE order_status AS ENUM ('pending','paid','shipped'); \
     CREATE TABLE users (id INT PRIMARY KEY, name VARCHAR(50) NOT NULL, email VARCHAR(100), \
       active BOOLEAN NOT NULL DEFAULT true, updated_at TIMESTAMPTZ(3) NOT NULL DEFAULT now()); \
     CREATE TABLE orders (id INT PRIMARY KEY, user_id INT NOT NULL REFERENCES users(id), \
       amount NUMERIC(10,2) NOT NULL, status order_status NOT NULL DEFAULT 'pending', note VARCHAR(10), \
       updated_at TIMESTAMPTZ(3) NOT NULL DEFAULT now())";

fn shop_config(local: &TestStore, cloud: &TestStore, dir: &std::path::Path) -> Config {
    let mut cfg = config(local, cloud, &["users", "orders"], Mode::Both, dir);
    cfg.collections = ["users", "orders"]
        .into_iter()
        .map(|name| CollectionConfig {
            name: name.into(),
            table: Some(name.into()),
            key: vec!["id".into()],
            updated_at: "updated_at".into(),
            // The seed pattern: the shop's local database allocates ids, the central one
            // receives them.
            key_allocation: Some(KeyAllocation::Local),
            ..Default::default()
        })
        .collect();
    cfg.sync.retry_max_attempts = 2;
    cfg.sync.retry_base_ms = 100;
    cfg.sync.retry_max_secs = 1;
    cfg
}

/// One column of one row, as the CLI prints it (`None`: no such row).
fn cell(store: &TestStore, sql: &str) -> Option<String> {
    let out = store.raw(&[sql]);
    let line = out.lines().next()?;
    Some(line.trim_end_matches('\r').to_string())
}

/// The scenario both pairs run: the local side is MariaDB `db_a` written with `mysql`.
async fn shop_scenario(local: &TestStore, central: &TestStore, bridge: &TestBridge) {
    // A new user and their first order, in one transaction: the order must not arrive first.
    local.raw(&[
        "START TRANSACTION; \
         INSERT INTO users (name, email) VALUES ('ann', 'ann@example.com'); \
         INSERT INTO orders (user_id, amount, status) VALUES (LAST_INSERT_ID(), 250.10, 'pending'); \
         COMMIT",
    ]);
    let uid = cell(local, "SELECT id FROM users WHERE name = 'ann'").unwrap();
    let oid = cell(local, "SELECT id FROM orders ORDER BY id DESC LIMIT 1").unwrap();
    let amount = format!("SELECT amount FROM orders WHERE id = {oid}");
    eventually("the order to arrive on the central side", || {
        cell(central, &amount).as_deref() == Some("250.10")
    })
    .await;
    assert_eq!(
        cell(central, &format!("SELECT name FROM users WHERE id = {uid}")).as_deref(),
        Some("ann")
    );
    // No foreign-key error on the way: the order was never tried before its user (a deferred
    // write would count here, then land on a retry and look the same from outside).
    let deferred = bridge.engine.stats.snapshot().deferred;
    assert_eq!(
        (deferred.local, deferred.cloud),
        (0, 0),
        "the order was written before its user"
    );
    // Status and amount updates arrive exactly.
    local.raw(&[&format!(
        "UPDATE orders SET status = 'paid', amount = 99.99 WHERE id = {oid}"
    )]);
    let status = format!("SELECT status, amount FROM orders WHERE id = {oid}");
    eventually("the paid order to arrive", || {
        cell(central, &status)
            .is_some_and(|s| s.split(['\t', '|']).collect::<Vec<_>>() == ["paid", "99.99"])
    })
    .await;
    // The central side edits too (its own SQL): the change comes back to the shop.
    central.raw(&[&format!(
        "UPDATE orders SET status = 'shipped' WHERE id = {oid}"
    )]);
    let shipped = format!("SELECT status FROM orders WHERE id = {oid}");
    eventually("the central edit to reach the shop", || {
        cell(local, &shipped).as_deref() == Some("shipped")
    })
    .await;
    // A row the target cannot hold (note longer than the central column) is dead-lettered
    // with the reason, while the rest keeps flowing.
    local.raw(&[&format!(
        "INSERT INTO orders (user_id, amount, note) VALUES ({uid}, 1.00, 'a note far too long for the central side'); \
         INSERT INTO orders (user_id, amount) VALUES ({uid}, 2.50)"
    )]);
    let bad = cell(local, "SELECT id FROM orders WHERE amount = 1.00").unwrap();
    let good = cell(local, "SELECT id FROM orders WHERE amount = 2.50").unwrap();
    eventually("the good order to arrive", || {
        cell(
            central,
            &format!("SELECT amount FROM orders WHERE id = {good}"),
        )
        .as_deref()
            == Some("2.50")
    })
    .await;
    let engine = bridge.engine.clone();
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead = engine.queue.list(true, 10).await.unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(dead[0].key, format!("orders/{bad}"));
    assert!(
        dead[0].last_error.to_lowercase().contains("too long"),
        "the reason is the database's: {}",
        dead[0].last_error
    );
    assert!(
        cell(central, &format!("SELECT id FROM orders WHERE id = {bad}")).is_none(),
        "never truncated into the column"
    );
    let status = engine.status().await.unwrap();
    let status = serde_json::to_value(&status).unwrap();
    assert!(
        status.to_string().contains("\"failed\":1"),
        "status shows the failure: {status}"
    );
    // Deletes of the orders and then the user arrive (children before the parent).
    local.raw(&[&format!(
        "DELETE FROM orders WHERE user_id = {uid}; DELETE FROM users WHERE id = {uid}"
    )]);
    eventually("the deletes to arrive", || {
        cell(
            central,
            &format!("SELECT COUNT(*) FROM users WHERE id = {uid}"),
        )
        .as_deref()
            == Some("0")
            && cell(central, "SELECT COUNT(*) FROM orders").as_deref() == Some("0")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_schema_syncs_between_two_mariadb_databases() {
    let server = TestStore::new(Kind::Mysql);
    let (db_a, db_b, dir) = (
        server.new_database("db_a"),
        server.new_database("db_b"),
        data_dir(),
    );
    db_a.raw(&[&mysql_schema(100)]);
    db_b.raw(&[&mysql_schema(10)]);
    let bridge = TestBridge::start(shop_config(&db_a, &db_b, &path(&dir))).await;
    shop_scenario(&db_a, &db_b, &bridge).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_schema_syncs_to_a_central_postgresql() {
    let (db_a, central, dir) = (
        TestStore::new(Kind::Mysql).new_database("db_a"),
        TestStore::new(Kind::Postgres).new_database("central"),
        data_dir(),
    );
    db_a.raw(&[&mysql_schema(100)]);
    central.raw(&[PG_SCHEMA]);
    let bridge = TestBridge::start(shop_config(&db_a, &central, &path(&dir))).await;
    shop_scenario(&db_a, &central, &bridge).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_way_auto_increment_without_an_allocation_rule_is_refused_at_start() {
    let server = TestStore::new(Kind::Mysql);
    let (db_a, db_b, dir) = (
        server.new_database("db_a"),
        server.new_database("db_b"),
        data_dir(),
    );
    db_a.raw(&[&mysql_schema(100)]);
    db_b.raw(&[&mysql_schema(100)]);
    let mut cfg = shop_config(&db_a, &db_b, &path(&dir));
    cfg.collections[1].key_allocation = None;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = match syncbridge::engine::pipeline::open_when_ready(cfg, &shutdown).await {
        Ok(_) => panic!("a colliding key allocation must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("orders") && err.contains("key_allocation"),
        "{err}"
    );
}

/// Waits until the bridge's dead letters hold `key`, and returns its reason.
async fn dead_letter(bridge: &TestBridge, key: &str) -> String {
    for _ in 0..200 {
        let dead = bridge.engine.queue.list(true, 100).await.unwrap();
        if let Some(d) = dead.iter().find(|d| d.key == key) {
            return d.last_error.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "{key} was not dead-lettered: {:?}",
        bridge.engine.queue.list(false, 100).await.unwrap()
    );
}

/// Every type of the README's table, MariaDB → Redis → PostgreSQL and back: the values
/// arrive exact both ways, and the Redis document shows their JSON form. The MariaDB table's
/// modification time is its `ON UPDATE CURRENT_TIMESTAMP` column, found without being named.
/// A writer session in another time zone stores the same instant. Values the target cannot
/// hold (an unknown ENUM value, NULL in a NOT NULL column) are dead-lettered with the
/// database's reason, never written half-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_round_trips_sql_redis_sql() {
    let (maria, redis, pg) = (
        TestStore::new(Kind::Mysql).new_database("types_a"),
        TestStore::new(Kind::Redis),
        TestStore::new(Kind::Postgres).new_database("types_b"),
    );
    maria.raw(&["CREATE TABLE t (id BIGINT PRIMARY KEY, big BIGINT, amount DECIMAL(20,6), \
         state ENUM('new','old'), tags SET('a','b','c'), day DATE, at_time TIME, \
         stamp TIMESTAMP(6) NULL, local_dt DATETIME(6), flag BOOLEAN, meta JSON, bin BLOB, \
         label VARCHAR(20), missing VARCHAR(5), required VARCHAR(5) NOT NULL DEFAULT 'x', \
         changed TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3))"]);
    pg.raw(&[
        "CREATE TABLE t (id BIGINT PRIMARY KEY, big BIGINT, amount NUMERIC(20,6), \
         state TEXT, tags TEXT, day DATE, at_time TIME, stamp TIMESTAMPTZ, local_dt TIMESTAMP, \
         flag BOOLEAN, meta JSONB, bin BYTEA, label VARCHAR(20), missing VARCHAR(5), required VARCHAR(5), \
         updated_at TIMESTAMPTZ(3) NOT NULL DEFAULT now())",
    ]);
    let c = common::collection("types");
    let typed = |cfg: &mut Config, side_is_local: bool| {
        cfg.collections = vec![CollectionConfig {
            name: c.clone(),
            local_table: side_is_local.then(|| "t".to_string()),
            cloud_table: (!side_is_local).then(|| "t".to_string()),
            ..Default::default()
        }];
        cfg.sync.retry_max_attempts = 2;
        cfg.sync.retry_base_ms = 100;
        cfg.sync.retry_max_secs = 1;
    };
    let (dir_a, dir_b) = (data_dir(), data_dir());
    let mut cfg_a = config(&maria, &redis, &[&c], Mode::Both, &path(&dir_a));
    typed(&mut cfg_a, true);
    let mut cfg_b = config(&redis, &pg, &[&c], Mode::Both, &path(&dir_b));
    typed(&mut cfg_b, false);
    let (a, b) = (
        TestBridge::start(cfg_a).await,
        TestBridge::start(cfg_b).await,
    );
    maria.raw(&["INSERT INTO t (id, big, amount, state, tags, day, at_time, stamp, local_dt, flag, meta, bin, label, missing) \
         VALUES (9007199254740993, -9223372036854775808, 12345678901234.123456, 'old', 'a,c', '2026-11-25', \
         '13:45:07', '2026-11-25 10:11:12.345678', '2026-11-25 23:59:59.000001', TRUE, \
         '{\"k\": [1, 2.5, \"x\"]}', X'00FF10', 'ünïcødé', NULL)"]);
    let id = "9007199254740993";
    eventually("the row to reach PostgreSQL", || {
        cell(&pg, &format!("SELECT amount FROM t WHERE id = {id}")).is_some()
    })
    .await;
    let doc: Value = redis.get(&c, id).expect("the Redis document");
    let want = json!({
        "id": 9007199254740993_i64, "big": i64::MIN, "amount": "12345678901234.123456",
        "state": "old", "tags": "a,c", "day": "2026-11-25", "at_time": "13:45:07",
        "stamp": "2026-11-25T10:11:12.345678Z", "local_dt": "2026-11-25T23:59:59.000001",
        "flag": true, "meta": {"k": [1, 2.5, "x"]}, "bin": "AP8Q", "label": "ünïcødé",
        "missing": null, "required": "x",
    });
    for (field, value) in want.as_object().unwrap() {
        assert_eq!(&doc[field], value, "field {field} in {doc}");
    }
    let row = cell(
        &pg,
        &format!(
            "SELECT concat_ws('|', big, amount, state, tags, day, at_time, \
             to_char(stamp AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), local_dt, flag, meta::text, \
             encode(bin, 'hex'), label, coalesce(missing, 'NULL'), required) FROM t WHERE id = {id}"
        ),
    )
    .unwrap();
    assert_eq!(
        row,
        "-9223372036854775808|12345678901234.123456|old|a,c|2026-11-25|13:45:07|2026-11-25 10:11:12.345678|\
         2026-11-25 23:59:59.000001|t|{\"k\": [1, 2.5, \"x\"]}|00ff10|ünïcødé|NULL|x"
    );
    // And back: an edit of every column in PostgreSQL reaches MariaDB through Redis, exact
    // (the other extreme of BIGINT, a value to NULL and one from NULL, another instant).
    pg.raw(&[&format!(
        "UPDATE t SET big = 9223372036854775807, amount = 0.000001, state = 'new', tags = 'b', \
         day = '1999-12-31', at_time = '00:00:01', stamp = '2030-01-02 03:04:05.000006+00', \
         local_dt = '2001-02-03 04:05:06.7', flag = false, meta = '{{\"z\": null, \"a\": [true]}}', \
         bin = '\\x0102'::bytea, label = NULL, missing = 'abc' WHERE id = {id}"
    )]);
    let back = format!(
        "SELECT CONCAT_WS('|', big, amount, state, tags, day, at_time, stamp, local_dt, flag, \
         JSON_EQUALS(meta, '{{\"a\": [true], \"z\": null}}'), HEX(bin), COALESCE(label, 'NULL'), missing, required) \
         FROM t WHERE id = {id}"
    );
    let want_back = "9223372036854775807|0.000001|new|b|1999-12-31|00:00:01|2030-01-02 03:04:05.000006|\
                     2001-02-03 04:05:06.700000|0|1|0102|NULL|abc|x";
    eventually("the PostgreSQL edit to reach MariaDB", || {
        cell(&maria, &back).as_deref() == Some(want_back)
    })
    .await;
    // A writer session in another time zone: TIMESTAMP columns hold instants, so the
    // document carries the UTC time, whatever the application's session said.
    maria.raw(&["SET time_zone = '+05:00'; \
         INSERT INTO t (id, stamp, label) VALUES (2, '2026-11-25 15:11:12.345678', 'tz')"]);
    eventually("the second row to reach PostgreSQL", || {
        cell(&pg, "SELECT label FROM t WHERE id = 2").as_deref() == Some("tz")
    })
    .await;
    let doc: Value = redis.get(&c, "2").expect("the Redis document");
    assert_eq!(doc["stamp"], "2026-11-25T10:11:12.345678Z", "{doc}");
    // A value the target type cannot take (an enum value MariaDB does not know) is refused,
    // not truncated: the record is dead-lettered on the bridge that writes MariaDB, with
    // MariaDB's reason.
    pg.raw(&[&format!("UPDATE t SET state = 'unknown' WHERE id = {id}")]);
    let reason = dead_letter(&a, &format!("{c}/{id}")).await;
    assert!(
        reason.contains("state"),
        "the reason names the column: {reason}"
    );
    assert_eq!(
        cell(&maria, &format!("SELECT state FROM t WHERE id = {id}")).as_deref(),
        Some("new")
    );
    // NULL into a NOT NULL column: the same.
    pg.raw(&["UPDATE t SET required = NULL, label = 'tz2' WHERE id = 2"]);
    let reason = dead_letter(&a, &format!("{c}/2")).await;
    assert!(
        reason.contains("required") && reason.to_lowercase().contains("null"),
        "{reason}"
    );
    assert_eq!(
        cell(
            &maria,
            "SELECT CONCAT_WS('|', required, label) FROM t WHERE id = 2"
        )
        .as_deref(),
        Some("x|tz"),
        "nothing of the refused row was written"
    );
    let status = serde_json::to_value(a.engine.status().await.unwrap()).unwrap();
    assert_eq!(status["queue"]["failed"], 2, "status counts both: {status}");
    a.stop().await;
    b.stop().await;
}

/// SQLite's typed tables, SQLite → Redis → SQLite: declared types map by SQLite's affinity
/// rules (plus BOOLEAN, DECIMAL and JSON by name), values arrive exact both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_typed_columns_round_trip_through_redis() {
    let (one, redis, two) = (
        TestStore::new(Kind::Sqlite),
        TestStore::new(Kind::Redis),
        TestStore::new(Kind::Sqlite),
    );
    let table = "CREATE TABLE t (id INTEGER PRIMARY KEY, big BIGINT, amount DECIMAL(10,2), \
         flag BOOLEAN, bin BLOB, meta JSON, ratio REAL, label TEXT, day DATE, missing TEXT, \
         updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))";
    one.raw(&[table]);
    two.raw(&[table]);
    let c = common::collection("sqlite_types");
    let typed = |cfg: &mut Config, side_is_local: bool| {
        cfg.collections = vec![CollectionConfig {
            name: c.clone(),
            local_table: side_is_local.then(|| "t".to_string()),
            cloud_table: (!side_is_local).then(|| "t".to_string()),
            ..Default::default()
        }];
    };
    let (dir_a, dir_b) = (data_dir(), data_dir());
    let mut cfg_a = config(&one, &redis, &[&c], Mode::Both, &path(&dir_a));
    typed(&mut cfg_a, true);
    let mut cfg_b = config(&redis, &two, &[&c], Mode::Both, &path(&dir_b));
    typed(&mut cfg_b, false);
    let (a, b) = (
        TestBridge::start(cfg_a).await,
        TestBridge::start(cfg_b).await,
    );
    one.raw(&[
        "INSERT INTO t (id, big, amount, flag, bin, meta, ratio, label, day, missing) \
         VALUES (9007199254740993, -9223372036854775808, 250.25, 1, X'00FF10', '{\"k\":[1,2.5]}', \
         0.5, 'ünïcødé', '2026-11-25', NULL)",
    ]);
    let id = "9007199254740993";
    let everything = format!(
        "SELECT big, amount, flag, hex(bin), json(meta), ratio, label, day, coalesce(missing, 'NULL') \
         FROM t WHERE id = {id}"
    );
    eventually("the row to reach the other SQLite file", || {
        cell(&two, &everything) == cell(&one, &everything) && cell(&two, &everything).is_some()
    })
    .await;
    let doc: Value = redis.get(&c, id).expect("the Redis document");
    let want = json!({
        "id": 9007199254740993_i64, "big": i64::MIN, "amount": "250.25", "flag": true,
        "bin": "AP8Q", "meta": {"k": [1, 2.5]}, "ratio": 0.5, "label": "ünïcødé",
        "day": "2026-11-25", "missing": null,
    });
    for (field, value) in want.as_object().unwrap() {
        assert_eq!(&doc[field], value, "field {field} in {doc}");
    }
    // And back, every column changed on the far side.
    two.raw(&[&format!(
        "UPDATE t SET big = 9223372036854775807, amount = 0.01, flag = 0, bin = X'0102', \
         meta = '{{\"z\":null}}', ratio = -1.25, label = NULL, day = '1999-12-31', missing = 'here' \
         WHERE id = {id}"
    )]);
    eventually("the edit to come back", || {
        cell(&one, &everything).as_deref()
            == Some("9223372036854775807|0.01|0|0102|{\"z\":null}|-1.25||1999-12-31|here")
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// A child that arrives before its parent (here: the shop's application wrote the order first,
/// with its foreign-key checks off) waits in the retry queue, not in the dead letters, and
/// lands once the parent has arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_before_its_parent_waits_and_then_lands() {
    let server = TestStore::new(Kind::Mysql);
    let (db_a, db_b, dir) = (
        server.new_database("db_a"),
        server.new_database("db_b"),
        data_dir(),
    );
    db_a.raw(&[&mysql_schema(100)]);
    db_b.raw(&[&mysql_schema(100)]);
    let bridge = TestBridge::start(shop_config(&db_a, &db_b, &path(&dir))).await;
    db_a.raw(&["SET foreign_key_checks = 0; \
         INSERT INTO orders (id, user_id, amount) VALUES (70, 7, 12.00)"]);
    let mut waiting = Vec::new();
    for _ in 0..100 {
        waiting = bridge.engine.queue.list(false, 10).await.unwrap();
        if !waiting.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0].key, "orders/70");
    assert!(!waiting[0].dead, "a missing parent never dead-letters");
    assert!(
        bridge.engine.stats.snapshot().deferred.cloud >= 1,
        "the deferral is counted"
    );
    assert!(
        waiting[0].last_error.contains("references"),
        "{}",
        waiting[0].last_error
    );
    // Several retries later (retry_max_attempts is 2 here), still waiting, not dead.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let still = bridge.engine.queue.list(false, 10).await.unwrap();
    assert!(
        still.len() == 1 && !still[0].dead && still[0].attempts >= 2,
        "{still:?}"
    );
    db_a.raw(&["INSERT INTO users (id, name) VALUES (7, 'late parent')"]);
    eventually("the order to land after its parent", || {
        cell(&db_b, "SELECT amount FROM orders WHERE id = 70").as_deref() == Some("12.00")
    })
    .await;
    bridge.stop().await;
}

/// The offline switch on the shop's schema: paused, the shop keeps selling (1,000 writes: 200
/// new users, each followed by four orders), nothing reaches the office and status counts the
/// waiting records; resumed, all 1,000 arrive, in the order they were made: every user lands
/// before its orders (so no foreign-key error, no retry), and users arrive in creation order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_a_thousand_writes_and_resume_applies_them_in_order() {
    let server = TestStore::new(Kind::Mysql);
    let (db_a, db_b) = (server.new_database("db_a"), server.new_database("db_b"));
    db_b.raw(&[&mysql_schema(100)]);
    // The office records the order rows arrive in (its own trigger, beside the bridge's).
    db_b.raw(&[
        "CREATE TABLE arrivals (seq INT AUTO_INCREMENT PRIMARY KEY, tbl VARCHAR(10), row_id INT); \
         CREATE TRIGGER arrived_user AFTER INSERT ON users FOR EACH ROW \
           INSERT INTO arrivals (tbl, row_id) VALUES ('users', NEW.id); \
         CREATE TRIGGER arrived_order AFTER INSERT ON orders FOR EACH ROW \
           INSERT INTO arrivals (tbl, row_id) VALUES ('orders', NEW.user_id)",
    ]);
    pause_and_resume_in_order(&db_a, &db_b).await;
}

/// The same with PostgreSQL as the office's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_keep_order_into_a_central_postgresql() {
    let db_a = TestStore::new(Kind::Mysql).new_database("db_a");
    let central = TestStore::new(Kind::Postgres).new_database("central");
    central.raw(&[PG_SCHEMA]);
    central.raw(&[
        "CREATE TABLE arrivals (seq SERIAL PRIMARY KEY, tbl TEXT, row_id INT); \
         CREATE FUNCTION arrived_user() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO arrivals (tbl, row_id) VALUES ('users', NEW.id); RETURN NULL; END $$; \
         CREATE FUNCTION arrived_order() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO arrivals (tbl, row_id) VALUES ('orders', NEW.user_id); RETURN NULL; END $$; \
         CREATE TRIGGER arrived_user AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION arrived_user(); \
         CREATE TRIGGER arrived_order AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION arrived_order()",
    ]);
    pause_and_resume_in_order(&db_a, &central).await;
}

/// Pauses a bridge from the shop `db_a` (MariaDB, created here) to `db_b` (schema and an
/// `arrivals (seq, tbl, row_id)` log of inserted users and orders already there), writes
/// 1,000 rows, resumes, and checks what arrived and in which order.
async fn pause_and_resume_in_order(db_a: &TestStore, db_b: &TestStore) {
    db_a.raw(&[&mysql_schema(100)]);
    let dir = data_dir();
    let bridge = TestBridge::start(shop_config(db_a, db_b, &path(&dir))).await;
    let engine = bridge.engine.clone();
    assert!(engine.pause().await.unwrap(), "it was running");
    let mut sql = String::new();
    for u in 1..=200 {
        sql.push_str(&format!(
            "INSERT INTO users (id, name) VALUES ({u}, 'user {u}'); \
             INSERT INTO orders (user_id, amount) VALUES ({u}, {u}.01), ({u}, {u}.02); \
             INSERT INTO orders (user_id, amount) VALUES ({u}, {u}.03); \
             INSERT INTO orders (user_id, amount) VALUES ({u}, {u}.04); "
        ));
    }
    db_a.raw(&[&sql]);
    let mut held = 0;
    for _ in 0..200 {
        held = engine.queue.counts().await.unwrap().held;
        if held == 1000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(held, 1000, "every write is held while paused");
    let status = serde_json::to_value(engine.status().await.unwrap()).unwrap();
    assert!(
        status.to_string().contains("\"paused\":true"),
        "status says paused: {status}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        cell(db_b, "SELECT COUNT(*) FROM arrivals").as_deref(),
        Some("0"),
        "nothing is applied while paused"
    );
    let resumed = std::time::Instant::now();
    assert!(engine.resume().await.unwrap(), "it was paused");
    eventually("all 1,000 writes to arrive", || {
        cell(db_b, "SELECT COUNT(*) FROM arrivals").as_deref() == Some("1000")
    })
    .await;
    eprintln!(
        "resume applied 1,000 held writes in {} ms",
        resumed.elapsed().as_millis()
    );
    // Every user arrived before each of its orders, and users in creation order.
    let late_orders = cell(
        db_b,
        "SELECT COUNT(*) FROM arrivals o JOIN arrivals u ON u.tbl = 'users' AND u.row_id = o.row_id \
         WHERE o.tbl = 'orders' AND o.seq < u.seq",
    );
    assert_eq!(
        late_orders.as_deref(),
        Some("0"),
        "an order arrived before its user"
    );
    let users: Vec<i64> = db_b
        .raw(&["SELECT row_id FROM arrivals WHERE tbl = 'users' ORDER BY seq"])
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(
        users,
        (1..=200).collect::<Vec<_>>(),
        "users in creation order"
    );
    assert!(
        engine.queue.list(false, 10).await.unwrap().is_empty(),
        "no retries: nothing arrived before its parent"
    );
    bridge.stop().await;
}

/// `columns` syncs only the named columns: the others stay each side's own, neither copied nor
/// overwritten. `add_updated_at`: a table without a modification-time column is refused at
/// start-up with the way out in the message, and with the setting the bridge adds the column
/// (PostgreSQL's existing rows get the time of the ALTER) and syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_named_columns_sync_and_a_missing_updated_at_is_added_only_when_asked() {
    let (local, pg) = (
        TestStore::new(Kind::Sqlite),
        TestStore::new(Kind::Postgres).new_database("cols"),
    );
    local.raw(&[
        "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT, secret TEXT, \
         updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
    ]);
    // The central table has no modification time yet, and one row already.
    pg.raw(&[
        "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT, secret TEXT); \
         INSERT INTO people VALUES ('p0', 'zero', 'central only')",
    ]);
    let dir = data_dir();
    let mut cfg = config(&local, &pg, &["people"], Mode::Both, &path(&dir));
    cfg.collections = vec![CollectionConfig {
        name: "people".into(),
        table: Some("people".into()),
        columns: Some(vec!["name".into()]),
        ..Default::default()
    }];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = match syncbridge::engine::pipeline::open_when_ready(cfg.clone(), &shutdown).await {
        Ok(_) => panic!("a table without updated_at must be refused unless add_updated_at is set"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("add_updated_at"), "{err}");
    assert_eq!(
        cell(&pg, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'people' AND column_name = 'updated_at'").as_deref(),
        Some("0"),
        "nothing was added without the setting"
    );
    cfg.collections[0].add_updated_at = true;
    let bridge = TestBridge::start(cfg).await;
    assert_eq!(
        cell(&pg, "SELECT data_type FROM information_schema.columns WHERE table_name = 'people' AND column_name = 'updated_at'").as_deref(),
        Some("timestamp with time zone")
    );
    // The existing central row arrives, its name only.
    eventually("the central row to reach the local table", || {
        cell(
            &local,
            "SELECT name || '|' || coalesce(secret, 'NULL') FROM people WHERE id = 'p0'",
        )
        .as_deref()
            == Some("zero|NULL")
    })
    .await;
    local.raw(&["INSERT INTO people (id, name, secret) VALUES ('p1', 'ann', 'local only')"]);
    eventually("the local row to reach PostgreSQL", || {
        cell(&pg, "SELECT name FROM people WHERE id = 'p1'").as_deref() == Some("ann")
    })
    .await;
    assert_eq!(
        cell(
            &pg,
            "SELECT coalesce(secret, 'NULL') FROM people WHERE id = 'p1'"
        )
        .as_deref(),
        Some("NULL"),
        "an unsynced column is not copied"
    );
    // The central side fills its own secret and renames: the name comes back, the secrets stay.
    pg.raw(&["UPDATE people SET secret = 'central only', name = 'ann b' WHERE id = 'p1'"]);
    eventually("the rename to come back", || {
        cell(&local, "SELECT name FROM people WHERE id = 'p1'").as_deref() == Some("ann b")
    })
    .await;
    assert_eq!(
        cell(&local, "SELECT secret FROM people WHERE id = 'p1'").as_deref(),
        Some("local only"),
        "an unsynced column is not overwritten"
    );
    assert_eq!(
        cell(&pg, "SELECT secret FROM people WHERE id = 'p1'").as_deref(),
        Some("central only")
    );
    bridge.stop().await;
}

/// A table keyed by two columns (an order's lines: `order_id`, `code`), MariaDB ↔ PostgreSQL:
/// inserts, updates, a change of key and deletes travel both ways row by row; ids are the key
/// values joined with `:`, with `:` and `~` inside a value escaped, so a code holding both
/// survives. Rows written while the bridge is down arrive through the start-up sweep, whose
/// pages (three rows here) are cut through rows sharing one `updated_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_sync_row_by_row() {
    let (maria, pg) = (
        TestStore::new(Kind::Mysql).new_database("lines_a"),
        TestStore::new(Kind::Postgres).new_database("lines_b"),
    );
    maria.raw(&[
        "CREATE TABLE order_lines (order_id INT NOT NULL, code VARCHAR(20) NOT NULL, \
         qty INT NOT NULL, updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) \
         ON UPDATE CURRENT_TIMESTAMP(3), PRIMARY KEY (order_id, code))",
    ]);
    pg.raw(&[
        "CREATE TABLE order_lines (order_id INT NOT NULL, code VARCHAR(20) NOT NULL, \
         qty INT NOT NULL, updated_at TIMESTAMPTZ(3) NOT NULL DEFAULT now(), \
         PRIMARY KEY (order_id, code))",
    ]);
    let dir = data_dir();
    let mut cfg = config(&maria, &pg, &["lines"], Mode::Both, &path(&dir));
    cfg.collections = vec![CollectionConfig {
        name: "lines".into(),
        table: Some("order_lines".into()),
        key: vec!["order_id".into(), "code".into()],
        ..Default::default()
    }];
    cfg.sync.batch_size = 3;
    let lines = |s: &TestStore| {
        s.raw(&["SELECT order_id, code, qty FROM order_lines ORDER BY order_id, code"])
            .lines()
            .map(|l| l.split(['\t', '|']).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    // Written before the bridge ever ran, all in one statement (one updated_at).
    maria.raw(&["INSERT INTO order_lines (order_id, code, qty) VALUES \
         (1, 'a', 2), (1, 'b:c~d', 5), (2, 'a', 1), (2, 'b', 1), (3, 'a', 7), (3, 'b', 8), (3, 'c', 9)"]);
    let bridge = TestBridge::start(cfg.clone()).await;
    eventually("the sweep to copy every line", || {
        lines(&pg) == lines(&maria) && lines(&pg).len() == 7
    })
    .await;
    let doc = bridge
        .engine
        .state
        .agreed("lines", &["1:b~3Ac~7Ed".to_string()])
        .await
        .unwrap();
    assert_eq!(doc.len(), 1, "the id is the escaped key pair: {doc:?}");
    // An update on the central side comes back.
    pg.raw(&["UPDATE order_lines SET qty = 50 WHERE order_id = 1 AND code = 'b:c~d'"]);
    eventually("the update to come back", || {
        lines(&maria).contains(&"1 b:c~d 50".to_string())
    })
    .await;
    // A change of key is a delete of the old row and an insert of the new one.
    maria.raw(&["UPDATE order_lines SET code = 'z' WHERE order_id = 2 AND code = 'a'"]);
    eventually("the re-keyed row to arrive", || {
        let l = lines(&pg);
        l.contains(&"2 z 1".to_string()) && !l.contains(&"2 a 1".to_string())
    })
    .await;
    pg.raw(&["DELETE FROM order_lines WHERE order_id = 3"]);
    eventually("the deletes to arrive", || {
        lines(&maria) == lines(&pg) && lines(&maria).len() == 4
    })
    .await;
    bridge.stop().await;
    // While the bridge is down: more lines on both sides, found by the start-up sweep.
    maria.raw(&["INSERT INTO order_lines (order_id, code, qty) VALUES (4, 'a', 1), (4, 'b', 2), (4, 'c', 3), (4, 'd', 4)"]);
    pg.raw(&["INSERT INTO order_lines (order_id, code, qty) VALUES (5, 'x:y', 1)"]);
    let bridge = TestBridge::start(cfg).await;
    eventually("the offline lines to cross", || {
        lines(&maria) == lines(&pg) && lines(&pg).len() == 9
    })
    .await;
    assert!(lines(&maria).contains(&"5 x:y 1".to_string()));
    bridge.stop().await;
}

/// A composite key in SQLite, synced with Redis: the Redis key is `<collection>:<id>` with the
/// id made of the key values; a record written to Redis lands in the row its id names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_in_sqlite_sync_with_redis() {
    let (sqlite, redis) = (TestStore::new(Kind::Sqlite), TestStore::new(Kind::Redis));
    sqlite.raw(&[
        "CREATE TABLE lines (order_id INTEGER NOT NULL, code TEXT NOT NULL, qty INTEGER, \
         updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), \
         PRIMARY KEY (order_id, code))",
    ]);
    let c = common::collection("lines");
    let dir = data_dir();
    let mut cfg = config(&sqlite, &redis, &[&c], Mode::Both, &path(&dir));
    cfg.collections = vec![CollectionConfig {
        name: c.clone(),
        local_table: Some("lines".into()),
        key: vec!["order_id".into()],
        ..Default::default()
    }];
    // A first run mapped the table by one column; its triggers log ids of one part.
    TestBridge::start(cfg.clone()).await.stop().await;
    let triggers = || {
        sqlite
            .raw(&["SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'lines' ORDER BY name"])
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let first = triggers();
    assert_eq!(first.len(), 4, "{first:?}");
    // Mapped by both columns now: the earlier triggers are replaced, not kept beside.
    cfg.collections[0].key = vec!["order_id".into(), "code".into()];
    let bridge = TestBridge::start(cfg).await;
    let second = triggers();
    assert_eq!(second.len(), 4, "{second:?}");
    assert!(
        second.iter().all(|t| !first.contains(t)),
        "{first:?} {second:?}"
    );
    sqlite.raw(&["INSERT INTO lines (order_id, code, qty) VALUES (1, 'a:b', 2)"]);
    eventually("the line to reach Redis", || {
        redis.get(&c, "1:a~3Ab").is_some()
    })
    .await;
    let doc = redis.get(&c, "1:a~3Ab").unwrap();
    assert_eq!(
        (&doc["order_id"], &doc["code"], &doc["qty"]),
        (&json!(1), &json!("a:b"), &json!(2)),
        "{doc}"
    );
    redis.put(&c, "7:q", &json!({"order_id": 7, "code": "q", "qty": 3}));
    eventually("the Redis record to land in its row", || {
        cell(
            &sqlite,
            "SELECT qty FROM lines WHERE order_id = 7 AND code = 'q'",
        )
        .as_deref()
            == Some("3")
    })
    .await;
    sqlite.raw(&["UPDATE lines SET order_id = 8 WHERE order_id = 7"]);
    eventually("the re-keyed line in Redis", || {
        redis.get(&c, "8:q").is_some() && redis.get(&c, "7:q").is_none()
    })
    .await;
    redis.delete(&c, "1:a~3Ab");
    eventually("the delete to reach SQLite", || {
        cell(&sqlite, "SELECT COUNT(*) FROM lines").as_deref() == Some("1")
    })
    .await;
    bridge.stop().await;
}

/// A MySQL `TIMESTAMP` in a composite key, written by an application whose session is not in
/// UTC: the id the trigger logs is the UTC instant, the id the bridge reads by, so the row
/// arrives (and an update of it arrives as an update, not as a delete and another row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_key_written_from_another_time_zone_keeps_its_id() {
    let (maria, redis) = (
        TestStore::new(Kind::Mysql).new_database("readings"),
        TestStore::new(Kind::Redis),
    );
    maria.raw(&["CREATE TABLE readings (device INT NOT NULL, at TIMESTAMP(3) NOT NULL, v INT, \
         changed TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3), \
         PRIMARY KEY (device, at))"]);
    let c = common::collection("readings");
    let dir = data_dir();
    let mut cfg = config(&maria, &redis, &[&c], Mode::Both, &path(&dir));
    cfg.collections = vec![CollectionConfig {
        name: c.clone(),
        local_table: Some("readings".into()),
        key: vec!["device".into(), "at".into()],
        ..Default::default()
    }];
    let bridge = TestBridge::start(cfg).await;
    maria.raw(&["SET time_zone = '+05:00'; \
         INSERT INTO readings (device, at, v) VALUES (1, '2026-11-25 15:00:00.250', 7)"]);
    let id = "1:2026-11-25T10~3A00~3A00.250000Z";
    eventually("the reading in Redis under its UTC id", || {
        redis.get(&c, id).is_some_and(|d| d["v"] == 7)
    })
    .await;
    maria.raw(&["SET time_zone = '+05:00'; \
         UPDATE readings SET v = 8 WHERE device = 1 AND at = '2026-11-25 15:00:00.250'"]);
    eventually("the update under the same id", || {
        redis.get(&c, id).is_some_and(|d| d["v"] == 8)
    })
    .await;
    assert_eq!(redis.count(&c), 1, "one record, never deleted and re-made");
    bridge.stop().await;
}
