//! Which position of a partition may be committed.
//!
//! Messages of one partition may finish out of order (per-key lanes, retries holding one key
//! back). The broker must only learn a position once *every* earlier message is done, or a crash
//! would skip the unfinished ones (docs/guarantees.md#g1). The committable position is therefore
//! the smallest offset still in flight, or one past the highest offset delivered when nothing is
//! in flight. Offsets may have gaps (compacted topics, transaction markers); nothing here assumes
//! they are dense.

use std::collections::BTreeSet;

/// Tracks in-flight offsets of one partition and the position that is safe to commit, in the
/// Kafka convention: the committed position is the offset of the *next* message to consume.
#[derive(Clone, Debug)]
pub struct OffsetTracker {
    in_flight: BTreeSet<u64>,
    /// One past the highest offset ever delivered (or the starting position).
    next_delivered: u64,
    committable: u64,
}

impl OffsetTracker {
    /// A tracker for a partition whose consumption resumes at `start` (the committed position).
    pub fn new(start: u64) -> Self {
        Self {
            in_flight: BTreeSet::new(),
            next_delivered: start,
            committable: start,
        }
    }

    /// Records that `offset` was delivered and is now being handled.
    pub fn begin(&mut self, offset: u64) {
        // Offsets below the committed position are redeliveries of finished work being replayed
        // by the broker; they must not drag the position backwards.
        if offset < self.committable {
            return;
        }
        self.in_flight.insert(offset);
        self.next_delivered = self.next_delivered.max(offset + 1);
    }

    /// Records that `offset` is done (handled, outputs acknowledged, or dead-lettered). Returns
    /// the new committable position if it advanced.
    pub fn complete(&mut self, offset: u64) -> Option<u64> {
        self.in_flight.remove(&offset);
        let position = self
            .in_flight
            .first()
            .copied()
            .unwrap_or(self.next_delivered);
        if position > self.committable {
            self.committable = position;
            Some(position)
        } else {
            None
        }
    }

    /// The position that is safe to commit now.
    pub fn committable(&self) -> u64 {
        self.committable
    }

    /// Messages delivered and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_only_over_a_contiguous_done_prefix() {
        let mut t = OffsetTracker::new(10);
        for o in 10..15 {
            t.begin(o);
        }
        assert_eq!(t.complete(12), None);
        assert_eq!(t.complete(11), None);
        assert_eq!(t.committable(), 10, "10 is still in flight");
        assert_eq!(t.complete(10), Some(13));
        assert_eq!(t.complete(14), None);
        assert_eq!(t.complete(13), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_stall_the_position() {
        let mut t = OffsetTracker::new(0);
        for o in [0, 5, 9] {
            t.begin(o);
        }
        assert_eq!(t.complete(0), Some(5));
        assert_eq!(t.complete(9), None);
        assert_eq!(t.complete(5), Some(10));
    }

    #[test]
    fn replayed_old_offsets_never_move_the_position_back() {
        let mut t = OffsetTracker::new(0);
        t.begin(0);
        t.begin(1);
        t.complete(0);
        t.complete(1);
        assert_eq!(t.committable(), 2);
        t.begin(1);
        assert_eq!(t.complete(1), None);
        assert_eq!(t.committable(), 2);
    }

    /// Every completion order of five messages: the position never passes an unfinished offset,
    /// never goes back, and ends one past the last.
    #[test]
    fn every_completion_order_is_safe() {
        fn permutations(items: Vec<u64>) -> Vec<Vec<u64>> {
            if items.len() <= 1 {
                return vec![items];
            }
            let mut out = Vec::new();
            for i in 0..items.len() {
                let mut rest = items.clone();
                let head = rest.remove(i);
                for mut p in permutations(rest) {
                    p.insert(0, head);
                    out.push(p);
                }
            }
            out
        }
        let offsets = vec![3, 4, 6, 7, 8];
        let orders = permutations(offsets.clone());
        assert_eq!(orders.len(), 120);
        for order in orders {
            let mut t = OffsetTracker::new(3);
            for o in &offsets {
                t.begin(*o);
            }
            let mut done = BTreeSet::new();
            let mut last = t.committable();
            for o in &order {
                t.complete(*o);
                done.insert(*o);
                let pos = t.committable();
                assert!(pos >= last, "went back in {order:?}");
                assert!(
                    offsets
                        .iter()
                        .filter(|x| **x < pos)
                        .all(|x| done.contains(x)),
                    "position {pos} passed an unfinished offset in {order:?}"
                );
                last = pos;
            }
            assert_eq!(t.committable(), 9);
        }
    }
}
