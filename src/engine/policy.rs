//! The conflict policy: given what both stores hold now and the version they last agreed on,
//! decide which state wins and where it must be written.
//!
//! This is a pure function, so every rule is unit-tested here without a store. The rules
//! (see `../shared/design-notes.md`):
//! - Both sides equal: in sync; if that is also the agreed version, the change was an echo.
//! - One side changed since the agreed version: it wins, unless its version is *older* than the
//!   agreed one (a stale write, e.g. an edit with an old `updatedAt` after a synced delete);
//!   then the agreed winner is written back to it. A record is never resurrected by a stale write.
//! - Both changed: last writer wins by [`Version`] order (time, then hash), so every side picks
//!   the same winner whichever change it saw first. A delete with a known time competes by that
//!   time; a delete whose time nobody knows loses to a live edit.

use super::state::Pending;
use crate::record::{Side, Version, with_updated_at};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// Which way changes may flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Both ways, last writer wins.
    #[default]
    #[serde(alias = "both-ways")]
    Both,
    /// Only local changes are copied, to cloud.
    LocalToCloud,
    /// Only cloud changes are copied, to local.
    CloudToLocal,
    /// Make local an exact copy of cloud, deletions included.
    OverwriteLocal,
    /// Make cloud an exact copy of local, deletions included.
    OverwriteCloud,
}

impl Mode {
    /// Whether this mode lets the bridge write to `side` (beyond stamping a missing `updatedAt`).
    fn may_write(self, side: Side) -> bool {
        match self {
            Mode::Both => true,
            Mode::LocalToCloud | Mode::OverwriteCloud => side == Side::Cloud,
            Mode::CloudToLocal | Mode::OverwriteLocal => side == Side::Local,
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "both" | "both-ways" => Ok(Mode::Both),
            "local-to-cloud" => Ok(Mode::LocalToCloud),
            "cloud-to-local" => Ok(Mode::CloudToLocal),
            "overwrite-local" => Ok(Mode::OverwriteLocal),
            "overwrite-cloud" => Ok(Mode::OverwriteCloud),
            other => Err(format!(
                "unknown mode {other:?}: use both, local-to-cloud, cloud-to-local, overwrite-local or overwrite-cloud"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Both => "both",
            Mode::LocalToCloud => "local-to-cloud",
            Mode::CloudToLocal => "cloud-to-local",
            Mode::OverwriteLocal => "overwrite-local",
            Mode::OverwriteCloud => "overwrite-cloud",
        })
    }
}

/// How a conflict (both sides changed since they last agreed) is decided, per collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// The later version (`updatedAt`, then hash) wins.
    #[default]
    Lww,
    /// The local side's version wins, deletes included.
    LocalWins,
    /// The cloud side's version wins, deletes included.
    CloudWins,
    /// Field-level three-way merge against the last agreed document.
    Merge,
    /// Neither side is changed; the conflict is parked for a person to resolve.
    Manual,
}

impl ConflictPolicy {
    /// Name as in the config, for logs, status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::Lww => "lww",
            ConflictPolicy::LocalWins => "local-wins",
            ConflictPolicy::CloudWins => "cloud-wins",
            ConflictPolicy::Merge => "merge",
            ConflictPolicy::Manual => "manual",
        }
    }
}

/// For `merge`: whose value a field changed on both sides takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MergePrefer {
    /// The side with the later version.
    #[default]
    Latest,
    /// Always local's.
    Local,
    /// Always cloud's.
    Cloud,
}

/// The conflict rules of one collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rules {
    /// How conflicts are decided.
    pub conflict: ConflictPolicy,
    /// For `merge`: who wins a field changed on both sides.
    pub merge_prefer: MergePrefer,
}

/// What one store holds for a record, as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum SideState {
    /// A live document.
    Present {
        /// Its version.
        version: Version,
        /// The document with `updatedAt` normalized (stamped if it had none).
        doc: Value,
        /// The writer gave no `updatedAt`: the bridge stamped one and must write it back.
        stamped: bool,
    },
    /// No record; `deleted_at` is when it was deleted, if the store said.
    Absent {
        /// Deletion time in ms, when known.
        deleted_at: Option<i64>,
    },
}

impl SideState {
    /// A document read from a store; one without `updatedAt` is stamped with `now`.
    pub fn present(doc: Value, updated_at_ms: Option<i64>, now: i64) -> SideState {
        let stamped = updated_at_ms.is_none();
        let ms = updated_at_ms.unwrap_or(now);
        let doc = if stamped {
            with_updated_at(doc, ms)
        } else {
            doc
        };
        SideState::Present {
            version: Version::of_doc(ms, &doc),
            doc,
            stamped,
        }
    }

    /// The version this state competes with; an absent record of unknown deletion time gets
    /// `None` (it loses to any live document).
    fn version(&self) -> Option<Version> {
        match self {
            SideState::Present { version, .. } => Some(version.clone()),
            SideState::Absent { deleted_at } => deleted_at.map(Version::tombstone),
        }
    }

    /// Whether this state is exactly `v` (a delete holds any tombstone).
    fn holds(&self, v: &Version) -> bool {
        match self {
            SideState::Present {
                version, stamped, ..
            } => !stamped && !v.deleted && version.hash == v.hash,
            SideState::Absent { .. } => v.deleted,
        }
    }

    fn same_content(&self, other: &SideState) -> bool {
        match (self, other) {
            (SideState::Absent { .. }, SideState::Absent { .. }) => true,
            (SideState::Present { version: a, .. }, SideState::Present { version: b, .. }) => {
                a.hash == b.hash
            }
            _ => false,
        }
    }

    /// Whether this state differs from the last agreed version.
    fn changed_since(&self, agreed: Option<&Version>) -> bool {
        match (self, agreed) {
            (SideState::Absent { .. }, None) => false,
            (SideState::Absent { .. }, Some(a)) => !a.deleted,
            (SideState::Present { .. }, None) => true,
            (
                SideState::Present {
                    version, stamped, ..
                },
                Some(a),
            ) => *stamped || a.deleted || version.hash != a.hash,
        }
    }
}

/// The state every side should end up with.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// This document.
    Live {
        /// Its version.
        version: Version,
        /// The document, `updatedAt` normalized.
        doc: Value,
    },
    /// No record; the tombstone's version.
    Deleted(Version),
}

impl Target {
    /// The version recorded as agreed once every side holds this.
    pub fn version(&self) -> &Version {
        match self {
            Target::Live { version, .. } | Target::Deleted(version) => version,
        }
    }
}

/// Why the policy decided what it did; counted in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Both sides already equal.
    InSync,
    /// Only `Side` changed; its change is copied.
    Changed(Side),
    /// Only `Side` changed, to a version older than the agreed one; it is put back.
    Stale(Side),
    /// Both changed; `Side` won by last-writer-wins (`tie_break` when the times were equal).
    Conflict {
        /// The winning side.
        winner: Side,
        /// Decided by the hash because both `updatedAt`s were equal.
        tie_break: bool,
    },
    /// An overwrite mode copies `Side` whatever changed.
    Overwrite(Side),
    /// Both changed; the `merge` policy combined them field by field.
    Merged,
    /// Both changed; the `manual` policy parks the conflict and writes nothing.
    Parked,
    /// The mode does not allow the needed write; left as is.
    NotThisWay,
}

/// What to do with one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Why.
    pub reason: Reason,
    /// The state to write, to the sides in `write_to`.
    pub target: Option<Target>,
    /// Sides that must be written (conditionally) to hold `target`.
    pub write_to: Vec<Side>,
    /// The version to record as agreed once the writes are durable; `None` leaves it.
    pub agree: Option<Version>,
}

/// Decides one record. `base` is the last agreed document (kept for `merge` collections);
/// `now` is the bridge's clock, used for tombstones of unknown time.
pub fn decide(
    mode: Mode,
    rules: Rules,
    agreed: Option<&Version>,
    base: Option<&Value>,
    local: &SideState,
    cloud: &SideState,
    now: i64,
) -> Decision {
    let state = |side: Side| if side == Side::Local { local } else { cloud };

    if local.same_content(cloud) && !is_stamped(local) && !is_stamped(cloud) {
        let agree = match local {
            SideState::Present { version, .. } => Some(version.clone()),
            // Both gone: remember the delete only if the record had been synced live.
            SideState::Absent { .. } => match agreed {
                Some(a) if !a.deleted => {
                    // Known times count as they are; with none, the earliest time after the
                    // version it replaced (see `unknown_delete_time`).
                    let at = [local.version(), cloud.version()]
                        .into_iter()
                        .flatten()
                        .map(|v| v.updated_at_ms)
                        .max()
                        .unwrap_or(i64::MIN);
                    Some(Version::tombstone(
                        at.max(unknown_delete_time(a.updated_at_ms, now)),
                    ))
                }
                _ => None,
            },
        };
        return Decision {
            reason: Reason::InSync,
            target: None,
            write_to: Vec::new(),
            agree: agree.filter(|v| Some(v) != agreed),
        };
    }

    let (winner, reason) = match mode {
        Mode::OverwriteLocal => (Side::Cloud, Reason::Overwrite(Side::Cloud)),
        Mode::OverwriteCloud => (Side::Local, Reason::Overwrite(Side::Local)),
        _ => match pick_winner(agreed, local, cloud) {
            (_, Reason::Conflict { .. }) if rules.conflict != ConflictPolicy::Lww => {
                match resolve_conflict(rules, base, local, cloud) {
                    Resolution::Winner(side) => (
                        side,
                        Reason::Conflict {
                            winner: side,
                            tie_break: false,
                        },
                    ),
                    Resolution::Merged(target) => return merged(mode, target, local, cloud),
                    Resolution::Park => {
                        return Decision {
                            reason: Reason::Parked,
                            target: None,
                            write_to: Vec::new(),
                            agree: None,
                        };
                    }
                    Resolution::Lww => pick_winner(agreed, local, cloud),
                }
            }
            picked => picked,
        },
    };
    let target = match state(winner) {
        SideState::Present { version, doc, .. } => Target::Live {
            version: version.clone(),
            doc: doc.clone(),
        },
        SideState::Absent { deleted_at } => {
            // A tombstone must not sort below the version it replaces.
            let floor = agreed.map(|a| a.updated_at_ms).unwrap_or(i64::MIN);
            let loser_time = state(winner.other())
                .version()
                .map(|v| v.updated_at_ms)
                .unwrap_or(i64::MIN);
            let at = match *deleted_at {
                Some(t) => t.max(floor).max(loser_time),
                None => unknown_delete_time(floor.max(loser_time), now),
            };
            Target::Deleted(Version::tombstone(at))
        }
    };
    let loser = winner.other();
    let mut write_to = Vec::new();
    if !state(loser).same_content(state(winner)) || is_stamped(state(loser)) {
        if !mode.may_write(loser) {
            return Decision {
                reason: Reason::NotThisWay,
                target: None,
                write_to: Vec::new(),
                agree: None,
            };
        }
        write_to.push(loser);
    }
    if is_stamped(state(winner)) {
        // Stamping a missing updatedAt is normalization, allowed in every mode.
        write_to.push(winner);
    }
    Decision {
        reason,
        agree: Some(target.version().clone()),
        target: Some(target),
        write_to,
    }
}

/// The time given to a delete nobody knows the time of (a Redis `DEL`, a key a sweep finds
/// missing): the earliest it can have happened, 1 ms after the version it removed.
///
/// Not the time the bridge saw it. That is only an upper bound, and a write that follows the
/// delete on the same store can carry an `updatedAt` below it (the writer stamped it before the
/// bridge looked): the tombstone would then outvote that later write and the bridge would delete
/// it again, losing it. Taken as early as possible, the delete loses to every edit made after
/// the version it removed, on either side; that is the rule for deletes of unknown time anyway
/// (a live edit wins, as in CouchDB). `now` stands in only when nothing was there before.
pub fn unknown_delete_time(replaced_ms: i64, now: i64) -> i64 {
    if replaced_ms == i64::MIN {
        now
    } else {
        replaced_ms.saturating_add(1)
    }
}

/// The version to decide a record against: the agreed one, or the one an interrupted decision
/// had finished putting in place (`pending`).
///
/// The bridge writes `pending` down, with the stores it is about to write, before it applies a
/// decision, and replaces it with the agreed version after. Killed in between, the stores hold
/// the new version while the agreed one is old: against it, the store just written looks like
/// a fresh edit, and a delete made on the other store meanwhile would lose to it and the record
/// come back. So when every store the decision wrote holds `pending`, the writes are done and
/// `pending` is the base. If one of them does not, the writes did not finish (or failed) and the
/// decision is simply made again from the agreed version, as before it started.
pub fn base_version<'a>(
    agreed: Option<&'a Version>,
    pending: Option<&'a Pending>,
    local: &SideState,
    cloud: &SideState,
) -> (Option<&'a Version>, bool) {
    let state = |side: Side| if side == Side::Local { local } else { cloud };
    match pending {
        Some(p)
            if !p.targets.is_empty()
                && p.targets.iter().all(|&side| state(side).holds(&p.version)) =>
        {
            (Some(&p.version), true)
        }
        _ => (agreed, false),
    }
}

/// How a non-LWW policy settles a conflict.
enum Resolution {
    /// This side's state wins.
    Winner(Side),
    /// A merged document, for both sides.
    Merged(Target),
    /// Nobody wins yet: park it.
    Park,
    /// The policy does not apply (merge with a delete): last writer wins.
    Lww,
}

fn resolve_conflict(
    rules: Rules,
    base: Option<&Value>,
    local: &SideState,
    cloud: &SideState,
) -> Resolution {
    match rules.conflict {
        ConflictPolicy::Lww => Resolution::Lww,
        ConflictPolicy::LocalWins => Resolution::Winner(Side::Local),
        ConflictPolicy::CloudWins => Resolution::Winner(Side::Cloud),
        ConflictPolicy::Manual => Resolution::Park,
        ConflictPolicy::Merge => match (local, cloud) {
            (
                SideState::Present {
                    version: lv,
                    doc: ld,
                    ..
                },
                SideState::Present {
                    version: cv,
                    doc: cd,
                    ..
                },
            ) => {
                let prefer = match rules.merge_prefer {
                    MergePrefer::Local => Side::Local,
                    MergePrefer::Cloud => Side::Cloud,
                    MergePrefer::Latest if lv > cv => Side::Local,
                    MergePrefer::Latest => Side::Cloud,
                };
                let at = lv.updated_at_ms.max(cv.updated_at_ms);
                let doc = with_updated_at(super::merge::merge(base, ld, cd, prefer), at);
                Resolution::Merged(Target::Live {
                    version: Version::of_doc(at, &doc),
                    doc,
                })
            }
            // An edit against a delete has no fields to merge.
            _ => Resolution::Lww,
        },
    }
}

/// The decision that writes a merged document to every side that does not hold it yet.
fn merged(mode: Mode, target: Target, local: &SideState, cloud: &SideState) -> Decision {
    let version = target.version().clone();
    let mut write_to = Vec::new();
    for (side, state) in [(Side::Local, local), (Side::Cloud, cloud)] {
        let holds = matches!(state, SideState::Present { version: v, stamped: false, .. } if v.hash == version.hash);
        if !holds && mode.may_write(side) {
            write_to.push(side);
        }
    }
    Decision {
        reason: Reason::Merged,
        agree: Some(version),
        target: Some(target),
        write_to,
    }
}

fn is_stamped(s: &SideState) -> bool {
    matches!(s, SideState::Present { stamped: true, .. })
}

/// Last-writer-wins with the agreed version as the base.
fn pick_winner(agreed: Option<&Version>, local: &SideState, cloud: &SideState) -> (Side, Reason) {
    let l_changed = local.changed_since(agreed);
    let c_changed = cloud.changed_since(agreed);
    let one_sided = match (l_changed, c_changed) {
        (true, false) => Some(Side::Local),
        (false, true) => Some(Side::Cloud),
        _ => None,
    };
    if let Some(side) = one_sided {
        let (changed, _) = if side == Side::Local {
            (local, cloud)
        } else {
            (cloud, local)
        };
        let stale = match (changed, agreed) {
            (SideState::Present { version, .. }, Some(a)) => version < a,
            _ => false,
        };
        return if stale {
            (side.other(), Reason::Stale(side))
        } else {
            (side, Reason::Changed(side))
        };
    }
    // Both changed (or neither side matches a base that never existed): a real conflict.
    let (lv, cv) = (local.version(), cloud.version());
    let winner = match (&lv, &cv) {
        (Some(l), Some(c)) => {
            if l > c {
                Side::Local
            } else {
                Side::Cloud
            }
        }
        (Some(_), None) => Side::Local,
        (None, _) => Side::Cloud,
    };
    let tie_break = matches!((&lv, &cv), (Some(l), Some(c)) if l.updated_at_ms == c.updated_at_ms);
    (winner, Reason::Conflict { winner, tie_break })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::with_updated_at;
    use serde_json::json;

    const NOW: i64 = 1_000_000;

    fn decide_lww(
        mode: Mode,
        agreed: Option<&Version>,
        l: &SideState,
        c: &SideState,
        now: i64,
    ) -> Decision {
        decide(mode, Rules::default(), agreed, None, l, c, now)
    }

    fn with(conflict: ConflictPolicy) -> Rules {
        Rules {
            conflict,
            merge_prefer: MergePrefer::Latest,
        }
    }

    #[test]
    fn priority_policies_pick_their_side_even_against_a_later_write_or_a_delete() {
        let base = version(&live("base", 1));
        let (l, c) = (live("local", 20), live("cloud", 30));
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::LocalWins),
            Some(&base),
            None,
            &l,
            &c,
            NOW,
        );
        assert_eq!(
            d.reason,
            Reason::Conflict {
                winner: Side::Local,
                tie_break: false
            }
        );
        assert_eq!(d.write_to, vec![Side::Cloud]);
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::CloudWins),
            Some(&base),
            None,
            &gone(Some(40)),
            &c,
            NOW,
        );
        assert_eq!(d.write_to, vec![Side::Local]);
        assert!(matches!(d.target, Some(Target::Live { .. })));
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::LocalWins),
            Some(&base),
            None,
            &gone(Some(5)),
            &c,
            NOW,
        );
        assert!(
            matches!(d.target, Some(Target::Deleted(_))),
            "the priority side's delete wins"
        );
    }

    #[test]
    fn merge_writes_the_combined_document_to_both_sides() {
        let base_doc = with_updated_at(json!({"name": "Ada", "city": "London"}), 1);
        let base = Version::of_doc(1, &base_doc);
        let l = SideState::present(
            with_updated_at(json!({"name": "Ada L.", "city": "London"}), 20),
            Some(20),
            NOW,
        );
        let c = SideState::present(
            with_updated_at(json!({"name": "Ada", "city": "Paris"}), 30),
            Some(30),
            NOW,
        );
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::Merge),
            Some(&base),
            Some(&base_doc),
            &l,
            &c,
            NOW,
        );
        assert_eq!(d.reason, Reason::Merged);
        assert_eq!(d.write_to, vec![Side::Local, Side::Cloud]);
        match d.target {
            Some(Target::Live { doc, version }) => {
                assert_eq!(doc["name"], "Ada L.");
                assert_eq!(doc["city"], "Paris");
                assert_eq!(version.updated_at_ms, 30);
            }
            other => panic!("{other:?}"),
        }
        // An edit against a delete has nothing to merge: last writer wins.
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::Merge),
            Some(&base),
            Some(&base_doc),
            &gone(Some(40)),
            &c,
            NOW,
        );
        assert_eq!(
            d.reason,
            Reason::Conflict {
                winner: Side::Local,
                tie_break: false
            }
        );
    }

    #[test]
    fn manual_parks_and_writes_nothing_but_one_sided_changes_still_flow() {
        let base = version(&live("base", 1));
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::Manual),
            Some(&base),
            None,
            &live("l", 2),
            &live("c", 3),
            NOW,
        );
        assert_eq!(d.reason, Reason::Parked);
        assert!(d.write_to.is_empty() && d.agree.is_none());
        let d = decide(
            Mode::Both,
            with(ConflictPolicy::Manual),
            Some(&base),
            None,
            &live("l", 2),
            &live("base", 1),
            NOW,
        );
        assert_eq!(d.reason, Reason::Changed(Side::Local));
    }

    fn live(name: &str, t: i64) -> SideState {
        SideState::present(with_updated_at(json!({ "name": name }), t), Some(t), NOW)
    }
    fn version(s: &SideState) -> Version {
        s.version().unwrap()
    }
    fn gone(at: Option<i64>) -> SideState {
        SideState::Absent { deleted_at: at }
    }

    #[test]
    fn equal_sides_matching_the_agreed_version_are_an_echo() {
        let a = live("ada", 10);
        let d = decide_lww(Mode::Both, Some(&version(&a)), &a, &a.clone(), NOW);
        assert_eq!(d.reason, Reason::InSync);
        assert!(d.write_to.is_empty());
        assert_eq!(d.agree, None, "nothing new to record");
    }

    #[test]
    fn a_new_record_on_one_side_is_copied() {
        let a = live("ada", 10);
        let d = decide_lww(Mode::Both, None, &a, &gone(None), NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Local));
        assert_eq!(d.write_to, vec![Side::Cloud]);
        assert_eq!(d.agree, Some(version(&a)));
    }

    #[test]
    fn a_one_sided_delete_of_a_synced_record_propagates() {
        let a = live("ada", 10);
        let d = decide_lww(Mode::Both, Some(&version(&a)), &a, &gone(None), NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Cloud));
        assert_eq!(d.write_to, vec![Side::Local]);
        let agreed = d.agree.unwrap();
        assert!(agreed.deleted && agreed.updated_at_ms >= 10);
    }

    #[test]
    fn a_deleted_and_synced_record_is_never_resurrected_by_a_stale_write() {
        let tomb = Version::tombstone(50);
        let old_edit = live("ada", 40);
        let d = decide_lww(Mode::Both, Some(&tomb), &old_edit, &gone(None), NOW);
        assert_eq!(d.reason, Reason::Stale(Side::Local));
        assert_eq!(d.write_to, vec![Side::Local]);
        assert!(matches!(d.target, Some(Target::Deleted(_))));
        // A genuinely later edit does bring it back.
        let new_edit = live("ada", 60);
        let d = decide_lww(Mode::Both, Some(&tomb), &new_edit, &gone(None), NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Local));
        assert_eq!(d.write_to, vec![Side::Cloud]);
    }

    #[test]
    fn conflicts_pick_the_same_winner_whichever_side_is_which() {
        let base = version(&live("base", 1));
        let x = live("x", 20);
        let y = live("y", 30);
        let d1 = decide_lww(Mode::Both, Some(&base), &x, &y, NOW);
        let d2 = decide_lww(Mode::Both, Some(&base), &y, &x, NOW);
        assert_eq!(
            d1.reason,
            Reason::Conflict {
                winner: Side::Cloud,
                tie_break: false
            }
        );
        assert_eq!(
            d2.reason,
            Reason::Conflict {
                winner: Side::Local,
                tie_break: false
            }
        );
        assert_eq!(d1.agree, d2.agree);
        // Equal times: the hash decides, identically both ways round.
        let p = live("p", 20);
        let d1 = decide_lww(Mode::Both, Some(&base), &x, &p, NOW);
        let d2 = decide_lww(Mode::Both, Some(&base), &p, &x, NOW);
        assert!(matches!(
            d1.reason,
            Reason::Conflict {
                tie_break: true,
                ..
            }
        ));
        assert_eq!(d1.agree, d2.agree);
        assert_eq!(d1.write_to.len(), 1);
    }

    #[test]
    fn a_delete_older_than_an_edit_on_the_other_side_loses() {
        let base = version(&live("base", 10));
        let edit = live("edit", 30);
        let d = decide_lww(Mode::Both, Some(&base), &gone(Some(20)), &edit, NOW);
        assert_eq!(
            d.reason,
            Reason::Conflict {
                winner: Side::Cloud,
                tie_break: false
            }
        );
        assert_eq!(d.write_to, vec![Side::Local]);
        let d = decide_lww(Mode::Both, Some(&base), &gone(Some(40)), &edit, NOW);
        assert_eq!(
            d.reason,
            Reason::Conflict {
                winner: Side::Local,
                tie_break: false
            }
        );
        assert!(matches!(d.target, Some(Target::Deleted(_))));
        // A delete whose time nobody knows loses to the live edit.
        let d = decide_lww(Mode::Both, Some(&base), &gone(None), &edit, NOW);
        assert_eq!(
            d.reason,
            Reason::Conflict {
                winner: Side::Cloud,
                tie_break: false
            }
        );
    }

    #[test]
    fn a_delete_of_unknown_time_loses_to_a_write_that_followed_it() {
        // Synced at 10; the cloud's writer deletes, then writes again at 12 while the bridge
        // had seen only the delete (at NOW, far later). The tombstone is dated 11, not NOW.
        let base = version(&live("base", 10));
        let d = decide_lww(Mode::Both, Some(&base), &live("base", 10), &gone(None), NOW);
        let tomb = d.agree.unwrap();
        assert_eq!(tomb, Version::tombstone(11));
        let again = live("again", 12);
        let d = decide_lww(Mode::Both, Some(&tomb), &gone(None), &again, NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Cloud));
        assert_eq!(d.write_to, vec![Side::Local]);
        // Both gone, neither time known: also just after what was removed.
        let d = decide_lww(Mode::Both, Some(&base), &gone(None), &gone(None), NOW);
        assert_eq!(d.agree, Some(Version::tombstone(11)));
        // A known time is kept as it is.
        let d = decide_lww(Mode::Both, Some(&base), &gone(Some(500)), &gone(None), NOW);
        assert_eq!(d.agree, Some(Version::tombstone(500)));
    }

    #[test]
    fn a_write_in_flight_when_the_bridge_died_is_not_taken_for_an_edit() {
        // Agreed at 10; the bridge decided to copy the cloud's 20 to local, wrote `pending`,
        // applied it to local and was killed before recording it. Meanwhile the cloud's writer
        // deleted the record. Against the stale agreed version, local's 20 would look like an
        // edit and beat the delete of unknown time; against `pending` it is unchanged.
        let agreed = version(&live("old", 10));
        let copied = live("new", 20);
        let pending = Pending {
            version: version(&copied),
            targets: vec![Side::Local],
        };
        let (base, from_pending) =
            base_version(Some(&agreed), Some(&pending), &copied, &gone(None));
        assert!(from_pending);
        let d = decide_lww(Mode::Both, base, &copied, &gone(None), NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Cloud));
        assert_eq!(d.write_to, vec![Side::Local]);
        assert_eq!(d.agree, Some(Version::tombstone(21)));
        // Killed before the apply: local still holds the old version. The decision is made
        // again from the agreed version, and copies the cloud's again.
        let old = live("old", 10);
        let (base, from_pending) = base_version(Some(&agreed), Some(&pending), &old, &copied);
        assert_eq!((base, from_pending), (Some(&agreed), false));
        let d = decide_lww(Mode::Both, base, &old, &copied, NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Cloud));
        assert_eq!(d.write_to, vec![Side::Local]);
        // A first copy the target refused (nothing there): not a delete; the copy is retried.
        let (base, _) = base_version(None, Some(&pending), &gone(None), &copied);
        let d = decide_lww(Mode::Both, base, &gone(None), &copied, NOW);
        assert_eq!(d.reason, Reason::Changed(Side::Cloud));
        assert_eq!(d.write_to, vec![Side::Local]);
    }

    #[test]
    fn a_document_without_updated_at_is_stamped_on_both_sides() {
        let raw = SideState::present(json!({"name": "ada"}), None, NOW);
        let d = decide_lww(Mode::Both, None, &raw, &gone(None), NOW);
        assert_eq!(d.write_to, vec![Side::Cloud, Side::Local]);
        match d.target {
            Some(Target::Live { doc, version }) => {
                assert_eq!(version.updated_at_ms, NOW);
                assert!(doc.get("updatedAt").is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_way_modes_only_write_one_way() {
        let a = live("ada", 10);
        let d = decide_lww(Mode::LocalToCloud, None, &gone(None), &a, NOW);
        assert_eq!(d.reason, Reason::NotThisWay);
        assert!(d.write_to.is_empty());
        let d = decide_lww(Mode::CloudToLocal, None, &gone(None), &a, NOW);
        assert_eq!(d.write_to, vec![Side::Local]);
    }

    #[test]
    fn overwrite_copies_deletions_and_older_versions_too() {
        let newer_local = live("mine", 99);
        let older_cloud = live("theirs", 1);
        let d = decide_lww(Mode::OverwriteLocal, None, &newer_local, &older_cloud, NOW);
        assert_eq!(d.reason, Reason::Overwrite(Side::Cloud));
        assert_eq!(d.write_to, vec![Side::Local]);
        let d = decide_lww(Mode::OverwriteLocal, None, &newer_local, &gone(None), NOW);
        assert_eq!(d.write_to, vec![Side::Local]);
        assert!(matches!(d.target, Some(Target::Deleted(_))));
    }
}
