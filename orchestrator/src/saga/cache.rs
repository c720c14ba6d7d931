//! The sagas this process wrote last, with their versions. A batch of replies whose sagas are
//! all here needs no read: it is the write alone, checked against the cached versions, which
//! aborts (and the batch is read and written again) when another replica, the sweeper or an
//! operator changed a saga since. At one message per batch, skipping the read takes 0.2 ms off
//! each step (p50 8.0 to 7.4 ms a saga in paired runs).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Batches that read after a cached write met a conflict. A conflict means a saga changed
/// elsewhere after this process wrote it (another replica, an operator); more may follow, and
/// each costs an aborted statement, so the cache rests a while instead.
const PAUSE_AFTER_CONFLICT: u32 = 64;

/// A cached saga: its row as last written or read, and when it was created and last changed.
#[derive(Clone)]
pub(super) struct Entry<S> {
    pub saga: S,
    pub created: Instant,
    pub changed: Instant,
}

impl<S> Entry<S> {
    /// An entry for a saga created `saga_seconds` and changed `step_seconds` ago.
    pub fn aged(saga: S, saga_seconds: f64, step_seconds: f64) -> Self {
        let ago = |s: f64| {
            let now = Instant::now();
            now.checked_sub(Duration::from_secs_f64(s.max(0.0)))
                .unwrap_or(now)
        };
        Entry {
            saga,
            created: ago(saga_seconds),
            changed: ago(step_seconds),
        }
    }
}

/// Sagas in flight, up to a capacity; sagas leave when they end.
pub(super) struct SagaCache<S> {
    entries: Mutex<HashMap<Uuid, Entry<S>>>,
    capacity: usize,
    paused: AtomicU32,
}

impl<S: Clone> SagaCache<S> {
    pub fn new(capacity: usize) -> Self {
        SagaCache {
            entries: Mutex::new(HashMap::new()),
            capacity,
            paused: AtomicU32::new(0),
        }
    }

    /// Every one of `ids`, or `None` if one is missing or the cache rests after a conflict.
    pub fn get_all(&self, ids: &[Uuid]) -> Option<Vec<Entry<S>>> {
        if self
            .paused
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return None;
        }
        let entries = self.entries.lock().ok()?;
        ids.iter().map(|id| entries.get(id).cloned()).collect()
    }

    /// Records sagas as committed; an ended saga (`None`) leaves. Beyond the capacity new sagas
    /// are not kept (they are read instead).
    pub fn put(&self, sagas: impl IntoIterator<Item = (Uuid, Option<Entry<S>>)>) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for (id, entry) in sagas {
            match entry {
                Some(e) if entries.len() < self.capacity || entries.contains_key(&id) => {
                    entries.insert(id, e);
                }
                Some(_) => {}
                None => {
                    entries.remove(&id);
                }
            }
        }
    }

    /// Forgets sagas written elsewhere (or in a transaction not committed yet).
    pub fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) {
        if let Ok(mut entries) = self.entries.lock() {
            for id in ids {
                entries.remove(id);
            }
        }
    }

    /// A write from cached versions met a conflict: forget `ids` and rest a while.
    pub fn conflict<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) {
        self.forget(ids);
        self.paused.store(PAUSE_AFTER_CONFLICT, Ordering::Relaxed);
        metrics::counter!("saga_cache_conflicts_total").increment(1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: i64) -> Option<Entry<i64>> {
        Some(Entry::aged(v, 1.0, 0.5))
    }

    #[test]
    fn a_batch_is_served_only_when_every_saga_is_cached() {
        let cache = SagaCache::new(10);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        cache.put([(a, entry(1))]);
        assert!(cache.get_all(&[a, b]).is_none());
        cache.put([(b, entry(2))]);
        let got: Vec<i64> = cache
            .get_all(&[b, a])
            .unwrap()
            .into_iter()
            .map(|e| e.saga)
            .collect();
        assert_eq!(got, vec![2, 1]);
    }

    #[test]
    fn ended_and_forgotten_sagas_leave_and_capacity_bounds_new_ones() {
        let cache = SagaCache::new(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        cache.put(ids.iter().map(|id| (*id, entry(0))));
        assert_eq!(cache.len(), 2);
        assert!(cache.get_all(&ids[2..]).is_none());
        // A cached saga is still updated at capacity.
        cache.put([(ids[0], entry(5))]);
        assert_eq!(cache.get_all(&ids[..1]).unwrap()[0].saga, 5);
        cache.put([(ids[0], None)]);
        cache.forget(&ids[1..2]);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_conflict_forgets_the_batch_and_rests_the_cache() {
        let cache = SagaCache::new(10);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        cache.put([(a, entry(1)), (b, entry(1))]);
        cache.conflict(&[a]);
        for _ in 0..PAUSE_AFTER_CONFLICT {
            assert!(cache.get_all(&[b]).is_none());
        }
        assert!(cache.get_all(&[b]).is_some());
        assert!(cache.get_all(&[a]).is_none());
    }

    #[test]
    fn ages_become_instants_in_the_past() {
        let e = Entry::aged(0, 2.0, 1.0);
        assert!(e.created.elapsed() >= Duration::from_secs(2));
        assert!(e.changed.elapsed() >= Duration::from_secs(1));
        assert!(e.changed.elapsed() < Duration::from_secs(2));
    }
}
