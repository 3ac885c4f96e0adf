//! Crash points: the real `syncbridge` binary killed at the one moment the seeded fault test
//! (`tests/faults.rs`) can only hit by luck, between writing a record to a store and recording
//! the version both stores now agree on. `SYNCBRIDGE_CRASH_AFTER_APPLY=<collection>/<id>` makes
//! the bridge abort exactly there; a second, normal bridge on the same data directory must then
//! finish the job without resurrecting a delete or losing a write.
//!
//! Also here, with no crash: a write that follows a Redis `DEL` but carries an `updatedAt` from
//! before the bridge saw the delete. Both failures were seen in the fault test before the fix
//! (`r5`/`r18` resurrected, `r24` lost).

mod common;

use common::{DEADLINE, Kind, TestStore, collection, data_dir, eventually, name_of};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use syncbridge::record::now_ms;

fn doc(name: &str, at_ms: i64) -> Value {
    common::named(name, at_ms)
}

/// The binary on a config file, its stderr in a log file (appended across runs).
struct Binary {
    config: PathBuf,
    log: PathBuf,
}

impl Binary {
    fn new(local: &TestStore, cloud: &TestStore, coll: &str, dir: &Path) -> Binary {
        let config = dir.join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[local]\nuri = \"{}\"\n[cloud]\nuri = \"{}\"\n[sync]\n\
                 collections = [\"{coll}\"]\nsweep_interval_secs = 3600\nfull_sweep_interval_secs = 3600\n\
                 [api]\nenabled = false\n",
                dir.join("data").display(),
                local.uri,
                cloud.uri
            ),
        )
        .unwrap();
        Binary {
            config,
            log: dir.join("bridge.log"),
        }
    }

    /// Starts `syncbridge run`, armed to abort after applying `crash_on` if given.
    fn start(&self, crash_on: Option<&str>) -> Running {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_syncbridge"));
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(target) = crash_on {
            cmd.env("SYNCBRIDGE_CRASH_AFTER_APPLY", target);
        }
        let runs = |log: &Path| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches("syncbridge running")
                .count()
        };
        let before = runs(&self.log);
        let mut running = Running(cmd.spawn().expect("bridge starts"));
        // Running means the stores are prepared (tables made) and the listeners started.
        let started = Instant::now();
        while runs(&self.log) == before {
            assert!(
                running.0.try_wait().unwrap().is_none(),
                "bridge exited at start-up; see {}",
                self.log.display()
            );
            assert!(
                started.elapsed() < DEADLINE * 2,
                "bridge did not start; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    }

    fn stop(&self, mut running: Running) {
        Command::new("kill")
            .arg("-TERM")
            .arg(running.0.id().to_string())
            .status()
            .unwrap();
        let status = wait(&mut running.0, "stop on SIGTERM");
        assert!(
            status.success(),
            "bridge failed; see {}",
            self.log.display()
        );
    }

    /// Waits for the armed bridge to abort at its crash point.
    fn expect_crash(&self, mut running: Running) {
        let status = wait(&mut running.0, "reach its crash point");
        assert!(
            !status.success()
                && std::fs::read_to_string(&self.log)
                    .unwrap()
                    .contains("SYNCBRIDGE_CRASH_AFTER_APPLY"),
            "the bridge was to abort at its crash point, not {status}; see {}",
            self.log.display()
        );
    }
}

/// A running bridge, killed if the test fails before stopping it: a failed test must not leave
/// bridges behind to load the machine for every test after it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > DEADLINE * 2 {
            let _ = child.kill();
            panic!("the bridge did not {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a probe record written to the cloud reaches local: the listeners are live.
async fn listening(local: &TestStore, cloud: &TestStore, coll: &str) {
    let probe = format!("probe{}", now_ms());
    cloud.put(coll, &probe, &doc("probe", now_ms()));
    eventually("the probe record to reach local", || {
        name_of(local, coll, &probe).is_some()
    })
    .await;
}

async fn both(local: &TestStore, cloud: &TestStore, coll: &str, id: &str, want: Option<&str>) {
    eventually(&format!("{coll}/{id} to be {want:?} on both sides"), || {
        name_of(local, coll, id).as_deref() == want && name_of(cloud, coll, id).as_deref() == want
    })
    .await;
}

/// Local took the cloud's edit, the bridge died before recording it, and the cloud's writer
/// deleted the record while it was down. Against the old agreed version, local's copy looks
/// like a live edit that beats a delete of unknown time: the record came back (`r18`).
async fn a_crash_after_the_apply_does_not_resurrect_a_later_delete(lk: Kind) {
    let (local, cloud, coll, dir) = (
        TestStore::new(lk),
        TestStore::new(Kind::Redis),
        collection("crash_del"),
        data_dir(),
    );
    let bin = Binary::new(&local, &cloud, &coll, dir.path());
    let t = now_ms() - 10_000;
    cloud.put(&coll, "x", &doc("v0", t));
    let bridge = bin.start(None);
    both(&local, &cloud, &coll, "x", Some("v0")).await;
    bin.stop(bridge);

    let armed = bin.start(Some(&format!("{coll}/x")));
    listening(&local, &cloud, &coll).await;
    cloud.put(&coll, "x", &doc("v1", t + 1000));
    bin.expect_crash(armed);
    assert_eq!(
        name_of(&local, &coll, "x").as_deref(),
        Some("v1"),
        "the crash point comes after the apply"
    );
    cloud.delete(&coll, "x");

    let bridge = bin.start(None);
    listening(&local, &cloud, &coll).await;
    both(&local, &cloud, &coll, "x", None).await;
    bin.stop(bridge);
}

/// The cloud's writer deleted the record and wrote it again, stamping the new version before
/// the bridge, which died after applying the delete to local, had recorded the delete. Local's
/// change log dates the delete by its own clock, after that stamp: against the old agreed
/// version the delete won the conflict and the write was lost (`r24`).
async fn a_crash_after_applying_a_delete_does_not_lose_the_next_write(lk: Kind) {
    let (local, cloud, coll, dir) = (
        TestStore::new(lk),
        TestStore::new(Kind::Redis),
        collection("crash_rewrite"),
        data_dir(),
    );
    let bin = Binary::new(&local, &cloud, &coll, dir.path());
    cloud.put(&coll, "y", &doc("v0", now_ms() - 10_000));
    let bridge = bin.start(None);
    both(&local, &cloud, &coll, "y", Some("v0")).await;
    bin.stop(bridge);

    let armed = bin.start(Some(&format!("{coll}/y")));
    listening(&local, &cloud, &coll).await;
    let stamped = now_ms();
    std::thread::sleep(Duration::from_millis(5));
    cloud.delete(&coll, "y");
    bin.expect_crash(armed);
    assert_eq!(name_of(&local, &coll, "y"), None, "the delete was applied");
    cloud.put(&coll, "y", &doc("v2", stamped));

    let bridge = bin.start(None);
    listening(&local, &cloud, &coll).await;
    both(&local, &cloud, &coll, "y", Some("v2")).await;
    bin.stop(bridge);
}

/// No crash: the writer deletes, then writes again with an `updatedAt` it took before the bridge
/// got to the delete. The time the bridge saw the delete is later than that stamp; dated so,
/// the delete outvoted the write and the bridge deleted it again.
async fn a_write_after_a_delete_of_unknown_time_is_kept(lk: Kind) {
    let (local, cloud, coll, dir) = (
        TestStore::new(lk),
        TestStore::new(Kind::Redis),
        collection("unknown_del"),
        data_dir(),
    );
    let bin = Binary::new(&local, &cloud, &coll, dir.path());
    cloud.put(&coll, "z", &doc("v0", now_ms() - 10_000));
    let bridge = bin.start(None);
    both(&local, &cloud, &coll, "z", Some("v0")).await;
    let stamped = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    cloud.delete(&coll, "z");
    both(&local, &cloud, &coll, "z", None).await;
    cloud.put(&coll, "z", &doc("v1", stamped));
    both(&local, &cloud, &coll, "z", Some("v1")).await;
    // And it stays: nothing deletes it again a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    both(&local, &cloud, &coll, "z", Some("v1")).await;
    bin.stop(bridge);
}

macro_rules! crash_tests {
    ($pair:ident, $local:expr) => {
        mod $pair {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_crash_after_the_apply_does_not_resurrect_a_later_delete() {
                super::a_crash_after_the_apply_does_not_resurrect_a_later_delete($local).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_crash_after_applying_a_delete_does_not_lose_the_next_write() {
                super::a_crash_after_applying_a_delete_does_not_lose_the_next_write($local).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_write_after_a_delete_of_unknown_time_is_kept() {
                super::a_write_after_a_delete_of_unknown_time_is_kept($local).await
            }
        }
    };
}

crash_tests!(sqlite_redis, Kind::Sqlite);
crash_tests!(postgres_redis, Kind::Postgres);
crash_tests!(mysql_redis, Kind::Mysql);
