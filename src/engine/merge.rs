//! Field-level three-way merge, for collections with `conflict = "merge"`.
//!
//! Against the last version both sides agreed on (the *base*): a field changed on one side only
//! takes that side's value; a field changed on both takes the preferred side's value (the later
//! version's, or a configured priority side's); nested objects merge field by field; arrays and
//! other values are whole values. A field deleted on one side and unchanged on the other is
//! deleted. `updatedAt` is not merged: the caller sets the merged version's time.
//!
//! The function is pure and symmetric: swapping the two sides (and the preference with them)
//! gives the same result, so both stores end identical whichever change was seen first.

use crate::record::{Side, UPDATED_AT_FIELD};
use serde_json::{Map, Value};

/// Merges `local` and `cloud` against `base`; on a field changed differently on both sides the
/// value of `prefer` wins.
pub fn merge(base: Option<&Value>, local: &Value, cloud: &Value, prefer: Side) -> Value {
    let empty = Value::Object(Map::new());
    let merged = merge_value(
        Some(base.unwrap_or(&empty)),
        Some(local),
        Some(cloud),
        prefer,
    );
    let mut out = merged.unwrap_or(empty);
    if let Value::Object(map) = &mut out {
        map.remove(UPDATED_AT_FIELD);
    }
    out
}

/// Merges one value; `None` is "absent" (a deleted or never-set field).
fn merge_value(
    base: Option<&Value>,
    local: Option<&Value>,
    cloud: Option<&Value>,
    prefer: Side,
) -> Option<Value> {
    if local == cloud {
        return local.cloned();
    }
    if local == base {
        return cloud.cloned();
    }
    if cloud == base {
        return local.cloned();
    }
    // Changed differently on both sides.
    match (local, cloud) {
        (Some(Value::Object(l)), Some(Value::Object(c))) => {
            let b = match base {
                Some(Value::Object(b)) => Some(b),
                _ => None,
            };
            let mut keys: Vec<&String> = l
                .keys()
                .chain(c.keys())
                .chain(b.into_iter().flat_map(|b| b.keys()))
                .collect();
            keys.sort();
            keys.dedup();
            let mut out = Map::new();
            for k in keys {
                if k == UPDATED_AT_FIELD {
                    continue;
                }
                if let Some(v) = merge_value(b.and_then(|b| b.get(k)), l.get(k), c.get(k), prefer) {
                    out.insert(k.clone(), v);
                }
            }
            Some(Value::Object(out))
        }
        _ => match prefer {
            Side::Local => local.cloned(),
            Side::Cloud => cloud.cloned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn edits_to_different_fields_both_survive() {
        let base = json!({"name": "Ada", "city": "London", "tags": ["a"]});
        let local = json!({"name": "Ada L.", "city": "London", "tags": ["a"]});
        let cloud = json!({"name": "Ada", "city": "Paris", "tags": ["a"]});
        assert_eq!(
            merge(Some(&base), &local, &cloud, Side::Local),
            json!({"name": "Ada L.", "city": "Paris", "tags": ["a"]})
        );
    }

    #[test]
    fn the_same_field_changed_on_both_sides_takes_the_preferred_value() {
        let base = json!({"name": "Ada"});
        let (local, cloud) = (json!({"name": "L"}), json!({"name": "C"}));
        assert_eq!(
            merge(Some(&base), &local, &cloud, Side::Cloud),
            json!({"name": "C"})
        );
        assert_eq!(
            merge(Some(&base), &local, &cloud, Side::Local),
            json!({"name": "L"})
        );
    }

    #[test]
    fn nested_objects_merge_and_arrays_are_values_and_deletions_count() {
        let base = json!({"addr": {"street": "1 Main", "zip": "111"}, "list": [1, 2], "gone": 1});
        let local =
            json!({"addr": {"street": "2 Main", "zip": "111"}, "list": [1, 2, 3], "gone": 1});
        let cloud = json!({"addr": {"street": "1 Main", "zip": "222"}, "list": [0]});
        assert_eq!(
            merge(Some(&base), &local, &cloud, Side::Cloud),
            json!({"addr": {"street": "2 Main", "zip": "222"}, "list": [0]})
        );
    }

    #[test]
    fn updated_at_is_left_to_the_caller_and_no_base_means_empty() {
        let local = json!({"a": 1, "updatedAt": "x"});
        let cloud = json!({"b": 2, "updatedAt": "y"});
        assert_eq!(
            merge(None, &local, &cloud, Side::Local),
            json!({"a": 1, "b": 2})
        );
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (0i64..4).prop_map(Value::from),
            "[ab]{0,2}".prop_map(Value::from)
        ]
    }

    fn doc() -> impl Strategy<Value = Value> {
        let value = leaf().prop_recursive(2, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[xyz]", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        prop::collection::btree_map("[abcd]", value, 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest! {
        #[test]
        fn merging_is_order_independent(base in doc(), a in doc(), b in doc(), local_preferred in any::<bool>()) {
            let prefer = if local_preferred { Side::Local } else { Side::Cloud };
            // Swapping the sides swaps which one is preferred: the same value must win.
            let ab = merge(Some(&base), &a, &b, prefer);
            let ba = merge(Some(&base), &b, &a, prefer.other());
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn merging_is_deterministic(base in doc(), a in doc(), b in doc()) {
            prop_assert_eq!(merge(Some(&base), &a, &b, Side::Local), merge(Some(&base), &a, &b, Side::Local));
        }

        #[test]
        fn a_side_that_did_not_change_yields_the_other(base in doc(), other in doc(), local_preferred in any::<bool>()) {
            let prefer = if local_preferred { Side::Local } else { Side::Cloud };
            prop_assert_eq!(merge(Some(&base), &base, &other, prefer), other.clone());
            prop_assert_eq!(merge(Some(&base), &other, &base, prefer), other);
        }
    }
}
