//! Ordered lanes: at most one message of a lane is being handled at any time, lanes run in
//! parallel on a fixed number of workers.
//!
//! A lane is a partition (the default) or a (partition, key) pair (`ordering = "key"`). Lanes are
//! not hashed onto a fixed set of queues: every lane with work has its own queue, and a worker
//! takes the next *ready* lane. So a message that is retrying for minutes holds back only the
//! messages of its own lane, never a different key that happens to hash alike.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Semaphore;

/// A set of lane queues shared by the dispatcher (which pushes) and the workers (which take).
#[derive(Debug)]
pub struct Lanes<K, T> {
    state: Mutex<State<K, T>>,
    /// One permit per lane in `ready`; closed when the lanes close.
    ready_count: Semaphore,
}

#[derive(Debug)]
struct State<K, T> {
    /// Every lane with queued or running work. A lane is in `ready` or being worked on, never
    /// both.
    queues: HashMap<K, VecDeque<T>>,
    ready: VecDeque<K>,
    closed: bool,
}

impl<K: Eq + Hash + Clone, T> Default for Lanes<K, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, T> Lanes<K, T> {
    /// No lanes yet.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                queues: HashMap::new(),
                ready: VecDeque::new(),
                closed: false,
            }),
            ready_count: Semaphore::new(0),
        }
    }

    /// Queues `item` at the end of lane `key`. Returns the item back if the lanes are closed.
    pub fn push(&self, key: K, item: T) -> Result<(), T> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.closed {
            return Err(item);
        }
        match s.queues.get_mut(&key) {
            Some(q) => q.push_back(item),
            None => {
                s.queues.insert(key.clone(), VecDeque::from([item]));
                s.ready.push_back(key);
                self.ready_count.add_permits(1);
            }
        }
        Ok(())
    }

    /// Waits for a ready lane and takes its first item; the lane stays busy until
    /// [`Self::done`]. `None` once the lanes are closed.
    pub async fn take(&self) -> Option<(K, T)> {
        let (key, mut items) = self.take_batch(1).await?;
        let item = items.pop()?;
        Some((key, item))
    }

    /// Like [`Self::take`], but takes up to `max` queued items of the lane at once (in order,
    /// at least one). The lane stays busy until [`Self::done`].
    pub async fn take_batch(&self, max: usize) -> Option<(K, Vec<T>)> {
        let max = max.max(1);
        loop {
            let permit = self.ready_count.acquire().await.ok()?;
            permit.forget();
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(key) = s.ready.pop_front() else {
                continue;
            };
            if let Some(q) = s.queues.get_mut(&key)
                && !q.is_empty()
            {
                let n = q.len().min(max);
                let items: Vec<T> = q.drain(..n).collect();
                return Some((key, items));
            }
            s.queues.remove(&key);
        }
    }

    /// Marks lane `key` idle: its next item (if any) becomes ready.
    pub fn done(&self, key: &K) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.closed {
            return;
        }
        match s.queues.get(key) {
            Some(q) if !q.is_empty() => {
                s.ready.push_back(key.clone());
                self.ready_count.add_permits(1);
            }
            _ => {
                s.queues.remove(key);
            }
        }
    }

    /// Stops handing out work and returns every queued item that was not started (to be
    /// abandoned: not acknowledged, so the broker redelivers it).
    pub fn close(&self) -> Vec<T> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.closed = true;
        s.ready.clear();
        self.ready_count.close();
        s.queues.drain().flat_map(|(_, q)| q).collect()
    }

    /// Items queued (not counting those being worked on).
    pub fn queued(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.queues.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_item_per_lane_at_a_time_in_order() {
        let lanes = Lanes::new();
        lanes.push("a", 1).unwrap();
        lanes.push("a", 2).unwrap();
        lanes.push("b", 10).unwrap();
        let (k1, v1) = lanes.take().await.unwrap();
        let (k2, v2) = lanes.take().await.unwrap();
        assert_eq!((k1, v1, k2, v2), ("a", 1, "b", 10));
        // Lane a is busy: its second item is not ready until `done`.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), lanes.take())
                .await
                .is_err()
        );
        lanes.done(&"a");
        assert_eq!(lanes.take().await.unwrap(), ("a", 2));
        lanes.done(&"a");
        lanes.done(&"b");
        assert_eq!(lanes.queued(), 0);
        lanes.push("a", 3).unwrap();
        assert_eq!(lanes.take().await.unwrap(), ("a", 3));
    }

    #[tokio::test]
    async fn batches_take_up_to_max_in_order_and_keep_the_lane_busy() {
        let lanes = Lanes::new();
        for i in 1..=5 {
            lanes.push("a", i).unwrap();
        }
        lanes.push("b", 10).unwrap();
        assert_eq!(lanes.take_batch(3).await.unwrap(), ("a", vec![1, 2, 3]));
        assert_eq!(lanes.take_batch(3).await.unwrap(), ("b", vec![10]));
        lanes.push("a", 6).unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), lanes.take_batch(3))
                .await
                .is_err()
        );
        lanes.done(&"a");
        assert_eq!(lanes.take_batch(0).await.unwrap(), ("a", vec![4]));
        lanes.done(&"a");
        assert_eq!(lanes.take_batch(10).await.unwrap(), ("a", vec![5, 6]));
    }

    #[tokio::test]
    async fn close_returns_unstarted_items_and_ends_takers() {
        let lanes = Lanes::new();
        lanes.push(1, "x").unwrap();
        lanes.push(1, "y").unwrap();
        lanes.push(2, "z").unwrap();
        let (_, first) = lanes.take().await.unwrap();
        assert_eq!(first, "x");
        let mut left = lanes.close();
        left.sort_unstable();
        assert_eq!(left, vec!["y", "z"]);
        assert!(lanes.take().await.is_none());
        assert_eq!(lanes.push(3, "w"), Err("w"));
    }
}
