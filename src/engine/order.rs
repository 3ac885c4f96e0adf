//! The order collections are applied in, from their dependencies: parents before children for
//! inserts and updates, children before parents for deletes, so a foreign key on the target
//! never sees a row whose parent has not arrived (or a parent deleted under its children).
//!
//! Dependencies come from `depends_on` in the config and from the foreign keys of typed
//! tables ([`crate::stores::TableFacts::references`]). Order is an optimisation of the common
//! case, not the guarantee: a child that still arrives first (its parent in a later batch)
//! is deferred by the store and retried by the queue until the parent is there.

use crate::config::Config;
use crate::engine::policy::Mode;
use crate::record::Side;
use crate::stores::{Fatal, TableFacts};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Each collection's rank: parents have smaller ranks than their children.
pub type Ranks = HashMap<String, usize>;

/// Ranks the configured collections by their dependencies. A cycle (two tables referencing
/// each other) cannot be ordered: its members share a rank, and the queue's retries resolve
/// what arrives out of order.
pub fn ranks(config: &Config, facts: &[(Side, Vec<TableFacts>)]) -> Ranks {
    let mut parents: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for c in &config.sync.collections {
        parents.entry(c.as_str()).or_default();
    }
    for c in &config.collections {
        parents
            .entry(c.name.as_str())
            .or_default()
            .extend(c.depends_on.iter().cloned());
    }
    for (side, list) in facts {
        for f in list {
            for table in &f.references {
                // A referenced table is a parent collection if some collection lives in it.
                let parent = config
                    .collections
                    .iter()
                    .find(|c| c.table_on(*side) == Some(table.as_str()))
                    .map(|c| c.name.clone());
                if let Some(p) = parent.filter(|p| p != &f.collection) {
                    parents.entry(f.collection.as_str()).or_default().insert(p);
                }
            }
        }
    }
    // Longest path from a root: rank(c) = 1 + max(rank(parent)), cycles cut at depth n.
    let n = parents.len();
    let mut rank: Ranks = parents.keys().map(|c| (c.to_string(), 0)).collect();
    for _ in 0..n {
        let mut changed = false;
        for (c, ps) in &parents {
            let want = ps
                .iter()
                .filter_map(|p| rank.get(p))
                .map(|r| r + 1)
                .max()
                .unwrap_or(0)
                .min(n);
            if rank[*c] != want {
                rank.insert(c.to_string(), want);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    rank
}

/// Refuses a two-way sync of a table whose keys both databases allocate: two new rows, one
/// on each side, could get the same id, and one would overwrite the other.
pub fn check_key_allocation(config: &Config, facts: &[(Side, Vec<TableFacts>)]) -> Result<()> {
    if config.sync.mode != Mode::Both {
        return Ok(());
    }
    let find = |side: Side, c: &str| {
        facts
            .iter()
            .filter(|(s, _)| *s == side)
            .flat_map(|(_, l)| l.iter())
            .find(|f| f.collection == c)
    };
    for c in &config.collections {
        let (Some(l), Some(r)) = (find(Side::Local, &c.name), find(Side::Cloud, &c.name)) else {
            continue;
        };
        if !(l.auto_increment && r.auto_increment) || c.key_allocation.is_some() {
            continue;
        }
        if let (Some(a), Some(b)) = (l.key_range, r.key_range)
            && a.disjoint_from(&b)
        {
            continue;
        }
        return Err(Fatal(format!(
            "collection {}: both tables allocate their keys (auto-increment) and the sync runs both ways, \
             so a row inserted on each side could get the same id. Say who allocates ids: \
             `key_allocation = \"local\"` (only the local side's applications insert rows), \"cloud\", \
             or \"disjoint\" (the servers use auto_increment_increment/auto_increment_offset, or sequences, \
             with disjoint ranges); or use UUID keys; or sync one way",
            c.name
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CollectionConfig, KeyAllocation};
    use crate::stores::KeyRange;

    fn config(collections: Vec<CollectionConfig>) -> Config {
        let mut c = Config::default();
        c.sync.collections = collections.iter().map(|c| c.name.clone()).collect();
        c.collections = collections;
        c
    }

    fn typed(name: &str, table: &str) -> CollectionConfig {
        CollectionConfig {
            name: name.into(),
            table: Some(table.into()),
            ..Default::default()
        }
    }

    fn facts(c: &str, refs: &[&str], auto: bool) -> TableFacts {
        TableFacts {
            collection: c.into(),
            references: refs.iter().map(|s| s.to_string()).collect(),
            auto_increment: auto,
            key_range: None,
        }
    }

    #[test]
    fn foreign_keys_put_parents_first() {
        let cfg = config(vec![
            typed("order_lines", "order_lines"),
            typed("orders", "orders"),
            typed("users", "users"),
        ]);
        let f = vec![(
            Side::Local,
            vec![
                facts("orders", &["users"], false),
                facts("order_lines", &["orders"], false),
                facts("users", &[], false),
            ],
        )];
        let r = ranks(&cfg, &f);
        assert!(
            r["users"] < r["orders"] && r["orders"] < r["order_lines"],
            "{r:?}"
        );
    }

    #[test]
    fn depends_on_orders_and_cycles_terminate() {
        let mut a = typed("a", "a");
        a.depends_on = vec!["b".into()];
        let mut b = typed("b", "b");
        b.depends_on = vec!["a".into()];
        let c = CollectionConfig {
            name: "c".into(),
            depends_on: vec!["b".into()],
            ..Default::default()
        };
        let r = ranks(&config(vec![a, b, c]), &[]);
        assert_eq!(r.len(), 3);
        assert!(r["c"] >= r["b"]);
    }

    #[test]
    fn two_way_auto_increment_is_refused_unless_allocation_is_said() {
        let mut cfg = config(vec![typed("orders", "orders")]);
        let f = vec![
            (Side::Local, vec![facts("orders", &[], true)]),
            (Side::Cloud, vec![facts("orders", &[], true)]),
        ];
        let e = check_key_allocation(&cfg, &f).unwrap_err().to_string();
        assert!(e.contains("key_allocation"), "{e}");
        cfg.collections[0].key_allocation = Some(KeyAllocation::Local);
        check_key_allocation(&cfg, &f).unwrap();
        cfg.collections[0].key_allocation = None;
        cfg.sync.mode = Mode::LocalToCloud;
        check_key_allocation(&cfg, &f).unwrap();
    }

    #[test]
    fn servers_stepping_apart_need_no_setting_but_equal_offsets_are_refused() {
        let cfg = config(vec![typed("orders", "orders")]);
        let with = |step, offset| {
            let mut f = facts("orders", &[], true);
            f.key_range = Some(KeyRange { step, offset });
            f
        };
        let pair = |a, b| vec![(Side::Local, vec![a]), (Side::Cloud, vec![b])];
        // increment 2, offsets 1 and 2: odd and even ids.
        check_key_allocation(&cfg, &pair(with(2, 1), with(2, 2))).unwrap();
        // Both step by 2 from the same offset: the same ids.
        assert!(check_key_allocation(&cfg, &pair(with(2, 1), with(2, 1))).is_err());
        // Steps 2 and 3 meet (7 = 1 + 3*2 = 1 + 2*3).
        assert!(check_key_allocation(&cfg, &pair(with(2, 1), with(3, 1))).is_err());
        // Steps 4 and 6 from 1 and 2: gcd 2 does not divide 1, never equal.
        check_key_allocation(&cfg, &pair(with(4, 1), with(6, 2))).unwrap();
        // One side unknown: refused.
        assert!(check_key_allocation(&cfg, &pair(with(2, 1), facts("orders", &[], true))).is_err());
    }
}
