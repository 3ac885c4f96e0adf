//! Echo filter: recognizes the bridge's own writes coming back from a store's listener.
//!
//! Two layers keep echoes from looping. The first is here: stores that can say who wrote
//! (PostgreSQL triggers read `syncbridge.origin`, set by the bridge's own transactions) tag a
//! change with this bridge's instance id, and such changes are dropped before any read. The
//! second needs no tag and works on every store: the engine compares the record on both sides
//! with the version they last agreed on; an echo finds both sides equal to it and does nothing.
//! A client that writes the same key during the bridge's apply produces another version (and
//! on PostgreSQL another, untagged, change-log row), so it is never swallowed.

use crate::record::{ChangeRecord, Origin};

/// Whether `record` is known to be this bridge instance's own write.
///
/// A tag of another instance is a foreign change: when several bridges share one store, each
/// must see the others' writes.
pub fn is_own_write(record: &ChangeRecord, instance_id: &str) -> bool {
    matches!(&record.origin, Origin::Bridge(id) if id == instance_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Op, Side};

    fn rec(origin: Origin) -> ChangeRecord {
        ChangeRecord {
            side: Side::Cloud,
            collection: "c".into(),
            id: "1".into(),
            op: Op::Delete,
            doc: None,
            updated_at_ms: 0,
            origin,
        }
    }

    #[test]
    fn only_this_instances_tag_is_an_echo() {
        assert!(is_own_write(&rec(Origin::Bridge("me".into())), "me"));
        assert!(!is_own_write(
            &rec(Origin::Bridge("other-bridge".into())),
            "me"
        ));
        assert!(!is_own_write(&rec(Origin::Unknown), "me"));
    }
}
