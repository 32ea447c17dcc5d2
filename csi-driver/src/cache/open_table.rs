//! Which cached blob versions are open, and the per-key exclusion between opening a
//! cached file and deleting it.
//!
//! A key's files (`<key>.data` and `<key>.map`) are a pair: the map describes the bytes
//! of that very data file. Opening them and deleting them must never interleave: an
//! open that got the old data file and a new, empty map (or the reverse) would later
//! record blocks in a map whose data file is gone, and the next open would trust that
//! map over a fresh, sparse data file: zeros served as cached bytes. So every key is in
//! one of three states here:
//!
//! - absent: nobody has it open; its files may be opened or deleted by whoever
//!   *claims* it first;
//! - `Live`: open (a weak reference to the one `CachedBlob` of the key, so a second
//!   opener shares it); not deletable while any strong reference exists;
//! - `Busy`: claimed by one opener or one deleter, doing disk I/O *outside* the table's
//!   lock. Others wait for that claim to end (openers) or skip the key (the evictor).
//!
//! The table's lock is held only for map operations, never over disk I/O, so opens of
//! different files never wait for each other.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
enum Slot<T> {
    Live(Weak<T>),
    Busy(Arc<Gate>),
}

/// Released when a claim ends.
#[derive(Debug, Default)]
struct Gate {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut done = self.done.lock();
        while !*done {
            self.cv.wait(&mut done);
        }
    }

    fn open(&self) {
        *self.done.lock() = true;
        self.cv.notify_all();
    }
}

#[derive(Debug)]
pub(crate) struct OpenTable<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
}

impl<T> Default for OpenTable<T> {
    fn default() -> Self {
        OpenTable {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

/// The outcome of [`OpenTable::get_or_claim`].
pub(crate) enum Claim<'a, T> {
    /// The key is open: share it.
    Open(Arc<T>),
    /// The caller holds the key: open its files, then [`KeyClaim::publish`].
    Claimed(KeyClaim<'a, T>),
}

/// Exclusive hold of one key's files. Dropped without publishing, the key goes back to
/// absent (a failed open, or a deletion done).
pub(crate) struct KeyClaim<'a, T> {
    table: &'a OpenTable<T>,
    key: String,
    gate: Arc<Gate>,
    published: bool,
}

impl<T> KeyClaim<'_, T> {
    /// Makes `value` the open instance of the key and ends the claim.
    pub fn publish(mut self, value: &Arc<T>) {
        let mut slots = self.table.slots.lock();
        // Forget closed instances now and then (amortised over opens).
        if slots.len() >= 1024 && slots.len().is_power_of_two() {
            slots.retain(|_, s| match s {
                Slot::Live(w) => w.strong_count() > 0,
                Slot::Busy(_) => true,
            });
        }
        slots.insert(self.key.clone(), Slot::Live(Arc::downgrade(value)));
        drop(slots);
        self.published = true;
        self.gate.open();
    }
}

impl<T> Drop for KeyClaim<'_, T> {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        let mut slots = self.table.slots.lock();
        if matches!(slots.get(&self.key), Some(Slot::Busy(g)) if Arc::ptr_eq(g, &self.gate)) {
            slots.remove(&self.key);
        }
        drop(slots);
        self.gate.open();
    }
}

impl<T> OpenTable<T> {
    /// The open instance of `key`, or a claim on its files for the caller to open
    /// them. Waits while another caller holds a claim on the key (an open in progress,
    /// whose result it then shares, or a deletion, after which it opens anew).
    pub fn get_or_claim(&self, key: &str) -> Claim<'_, T> {
        loop {
            let mut slots = self.slots.lock();
            let gate = match slots.get(key) {
                Some(Slot::Live(w)) => match w.upgrade() {
                    Some(v) => return Claim::Open(v),
                    None => None,
                },
                Some(Slot::Busy(g)) => Some(g.clone()),
                None => None,
            };
            match gate {
                Some(g) => {
                    drop(slots);
                    g.wait();
                }
                None => {
                    let gate = Arc::new(Gate::default());
                    slots.insert(key.to_owned(), Slot::Busy(gate.clone()));
                    return Claim::Claimed(KeyClaim {
                        table: self,
                        key: key.to_owned(),
                        gate,
                        published: false,
                    });
                }
            }
        }
    }

    /// A claim on `key` if it is neither open nor claimed (for deleting its files);
    /// `None` without waiting otherwise.
    pub fn try_claim_closed(&self, key: &str) -> Option<KeyClaim<'_, T>> {
        let mut slots = self.slots.lock();
        match slots.get(key) {
            Some(Slot::Live(w)) if w.strong_count() > 0 => return None,
            Some(Slot::Busy(_)) => return None,
            _ => {}
        }
        let gate = Arc::new(Gate::default());
        slots.insert(key.to_owned(), Slot::Busy(gate.clone()));
        Some(KeyClaim {
            table: self,
            key: key.to_owned(),
            gate,
            published: false,
        })
    }

    /// Whether `key` is open or claimed right now.
    pub fn in_use(&self, key: &str) -> bool {
        match self.slots.lock().get(key) {
            Some(Slot::Live(w)) => w.strong_count() > 0,
            Some(Slot::Busy(_)) => true,
            None => false,
        }
    }

    /// Every open instance.
    pub fn live(&self) -> Vec<Arc<T>> {
        self.slots
            .lock()
            .values()
            .filter_map(|s| match s {
                Slot::Live(w) => w.upgrade(),
                Slot::Busy(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn an_open_waits_for_a_deletion_of_the_same_key_and_then_opens_anew() {
        let table: OpenTable<u32> = OpenTable::default();
        let deleting = table.try_claim_closed("k").expect("nobody has k");
        let deleted = AtomicBool::new(false);
        std::thread::scope(|s| {
            let opener = s.spawn(|| match table.get_or_claim("k") {
                // The opener must not get the key while the deleter holds it.
                Claim::Claimed(c) => {
                    assert!(deleted.load(Ordering::SeqCst), "opened during the deletion");
                    c.publish(&Arc::new(7));
                }
                Claim::Open(_) => panic!("nothing was open"),
            });
            std::thread::sleep(Duration::from_millis(50));
            deleted.store(true, Ordering::SeqCst);
            drop(deleting);
            opener.join().unwrap();
        });
    }

    #[test]
    fn a_key_open_or_being_opened_cannot_be_claimed_for_deletion() {
        let table: OpenTable<u32> = OpenTable::default();
        let Claim::Claimed(opening) = table.get_or_claim("k") else {
            panic!("nothing was open")
        };
        assert!(
            table.try_claim_closed("k").is_none(),
            "claimed while opening"
        );
        let v = Arc::new(1);
        opening.publish(&v);
        assert!(table.try_claim_closed("k").is_none(), "claimed while open");
        assert!(table.in_use("k"));
        drop(v);
        assert!(!table.in_use("k"), "closed once the last reference is gone");
        assert!(table.try_claim_closed("k").is_some());
    }

    #[test]
    fn concurrent_openers_share_one_instance() {
        let table: OpenTable<u32> = OpenTable::default();
        let made = std::sync::atomic::AtomicU32::new(0);
        let got: Vec<Arc<u32>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| match table.get_or_claim("k") {
                        Claim::Open(v) => v,
                        Claim::Claimed(c) => {
                            made.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            let v = Arc::new(9);
                            c.publish(&v);
                            v
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(made.load(Ordering::SeqCst), 1, "one open of the files");
        assert!(got.iter().all(|v| Arc::ptr_eq(v, &got[0])));
    }

    #[test]
    fn a_failed_open_releases_the_key() {
        let table: OpenTable<u32> = OpenTable::default();
        match table.get_or_claim("k") {
            Claim::Claimed(c) => drop(c),
            Claim::Open(_) => unreachable!(),
        }
        assert!(!table.in_use("k"));
        assert!(matches!(table.get_or_claim("k"), Claim::Claimed(_)));
    }
}
