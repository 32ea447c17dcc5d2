//! Standard `metav1.Condition` helpers shared by every status.
//!
//! Invariant: `lastTransitionTime` changes only when `status` changes, so a
//! reconcile that recomputes the same condition writes the same bytes (server-side
//! apply then makes no change and triggers no watch event).

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// Condition type: the object serves on every desired node.
pub const READY: &str = "Ready";
/// Condition type: every relevant pool has a fresh heartbeat.
pub const POOLS_REPORTING: &str = "PoolsReporting";
/// Condition type: the object is being deleted; the reason says what it waits for.
pub const DELETING: &str = "Deleting";

/// A condition to set: type, whether it holds, a CamelCase reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// Condition type.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

/// Upsert `update` into `conditions`, keeping `lastTransitionTime` of an existing
/// condition when its status is unchanged.
pub fn set(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if update.status { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = update.reason.to_owned();
            existing.message = update.message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: update.type_.to_owned(),
            status,
            reason: update.reason.to_owned(),
            message: update.message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// Remove a condition type (e.g. `Deleting` on an object that is not being deleted).
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: bool, reason: &'static str) -> ConditionUpdate {
        ConditionUpdate {
            type_: READY,
            status,
            reason,
            message: reason.to_owned(),
        }
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let t2 = Timestamp::from_second(3_000).unwrap();
        let mut conditions = Vec::new();
        set(&mut conditions, ready(false, "Warming"), Some(1), t0);
        set(&mut conditions, ready(false, "StillWarming"), Some(2), t1);
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            conditions[0].last_transition_time,
            Time(t0),
            "same status keeps the transition time"
        );
        assert_eq!(conditions[0].reason, "StillWarming");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set(&mut conditions, ready(true, "AllNodesReady"), Some(2), t2);
        assert_eq!(conditions[0].last_transition_time, Time(t2));
        assert_eq!(conditions[0].status, "True");
        remove(&mut conditions, READY);
        assert!(find(&conditions, READY).is_none());
    }
}
