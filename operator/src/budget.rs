//! The replacement budget: how many databases' nodes are upgraded (new image or instance type) at
//! once, operator-wide, and which databases wait for a slot.
//!
//! A freed slot wakes every database queued for one at once, through the controller's
//! `reconcile_on` stream: a queued database otherwise waits for its next recheck, and in a
//! rollout of N databases those waits add up to N rechecks. The first woken to ask takes the slot;
//! the others queue again.
//!
//! A slot is freed when the upgrade ends (one live instance left), when the database is paused
//! (the move has nothing left to move) and when it is deleted: a slot kept by a database that no
//! longer upgrades would stop every upgrade after it until the operator restarts.

use std::collections::BTreeSet;
use std::sync::Mutex;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};

/// Who holds a slot and who waits for one (database UIDs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Slots {
    pub holders: BTreeSet<String>,
    pub queued: BTreeSet<String>,
}

impl Slots {
    /// Whether `uid` may replace its node now, holding a slot if so; queued if not.
    pub fn take(&mut self, uid: &str, size: usize) -> bool {
        if self.holders.contains(uid) || self.holders.len() < size {
            self.queued.remove(uid);
            self.holders.insert(uid.to_string());
            return true;
        }
        self.queued.insert(uid.to_string());
        false
    }

    /// Held whatever the size: an upgrade found under way (started by an operator that restarted
    /// since) goes on and counts against the budget.
    pub fn hold(&mut self, uid: &str) {
        self.queued.remove(uid);
        self.holders.insert(uid.to_string());
    }

    /// `uid` no longer upgrades. Returns the databases to wake: every queued one if a slot was freed.
    pub fn release(&mut self, uid: &str, size: usize) -> Vec<String> {
        self.queued.remove(uid);
        if !self.holders.remove(uid) || self.holders.len() >= size {
            return Vec::new();
        }
        self.queued.iter().cloned().collect()
    }
}

pub struct Budget {
    size: usize,
    slots: Mutex<Slots>,
    wake: UnboundedSender<String>,
}

impl Budget {
    /// The budget and the stream of database UIDs to reconcile when a slot frees.
    pub fn new(size: usize) -> (Budget, UnboundedReceiver<String>) {
        let (wake, woken) = unbounded();
        (Budget { size: size.max(1), slots: Mutex::new(Slots::default()), wake }, woken)
    }

    pub fn take(&self, uid: &str) -> bool {
        self.slots.lock().is_ok_and(|mut s| s.take(uid, self.size))
    }

    pub fn hold(&self, uid: &str) {
        if let Ok(mut s) = self.slots.lock() {
            s.hold(uid);
        }
    }

    pub fn release(&self, uid: &str) {
        let woken = self.slots.lock().map(|mut s| s.release(uid, self.size)).unwrap_or_default();
        for uid in woken {
            // Closed only once the controller stopped: nothing is left to wake.
            let _ = self.wake.unbounded_send(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_wakes_every_database_waiting_for_one() {
        let mut s = Slots::default();
        assert!(s.take("a", 1));
        assert!(s.take("a", 1), "a holder asks again");
        assert!(!s.take("b", 1));
        assert!(!s.take("c", 1));
        assert_eq!(s.release("a", 1), ["b", "c"]);
        assert!(s.take("c", 1), "whoever asks first");
        assert!(!s.take("b", 1), "the other queues again");
        assert_eq!(s.queued, BTreeSet::from(["b".to_string()]));
    }

    #[test]
    fn a_database_that_stops_waiting_or_never_held_wakes_nobody() {
        let mut s = Slots::default();
        assert!(s.take("a", 1));
        assert!(!s.take("b", 1));
        assert!(s.release("b", 1).is_empty(), "b deleted while queued");
        assert!(s.queued.is_empty());
        assert!(s.release("x", 1).is_empty());
        assert_eq!(s.holders, BTreeSet::from(["a".to_string()]));
    }

    #[test]
    fn upgrades_found_under_way_count_even_beyond_the_budget() {
        let mut s = Slots::default();
        s.hold("a");
        s.hold("b");
        assert!(!s.take("c", 1));
        assert!(s.release("a", 1).is_empty(), "b still fills the only slot");
        assert_eq!(s.release("b", 1), ["c"]);
        assert!(s.take("c", 1));
    }
}
