//! State that every worker writes on the request path, kept per thread so that workers never
//! wait on one lock or bounce one cache line between cores.
//!
//! This is Envoy's threading model for the same state: each worker has its own connection
//! pools and its own thread-local stats that the main thread merges when stats are read
//! (Envoy's `ThreadLocal` slots, "Envoy threading model" blog post). Here a thread picks its
//! shard once (a process-wide thread number modulo the shard count) and locks only that
//! shard on the request path: the lock is uncontended and its cache line stays on the
//! thread's core. Readers that need everything (the `/stats/prometheus` scrape, the pool
//! sweep) visit each shard in turn, never holding two locks at once.
//!
//! Bounded: the shard count is fixed at creation ([`default_shards`]); a thread beyond it
//! shares a shard with an earlier thread (correct, only no longer contention-free).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One shard on its own cache line pair (x86 prefetches lines in pairs), so two workers'
/// shards never share a line.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(Mutex<T>);

/// `T` per thread (see the module docs).
pub struct Sharded<T> {
    shards: Box<[Padded<T>]>,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's number, taken the first time it touches any [`Sharded`].
    static THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

fn thread_number() -> usize {
    THREAD.with(|t| match t.get() {
        Some(n) => n,
        None => {
            let n = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            t.set(Some(n));
            n
        }
    })
}

/// Twice the CPUs this process may use, at least 4, at most 64: enough that every runtime
/// worker (one per CPU by default) and the odd blocking thread gets its own shard.
pub fn default_shards() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 2).clamp(4, 64)
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded::new(default_shards())
    }
}

impl<T: Default> Sharded<T> {
    /// `count` shards (at least one).
    pub fn new(count: usize) -> Sharded<T> {
        Sharded {
            shards: (0..count.max(1)).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> Sharded<T> {
    /// This thread's shard, locked. A poisoned shard (a panic while it was held, which the
    /// code under it does not do) is still used: its data are counters and pools, each update
    /// complete on its own.
    pub fn local(&self) -> MutexGuard<'_, T> {
        let shard = &self.shards[self.local_index()].0;
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Which shard [`Sharded::local`] locks on this thread.
    pub fn local_index(&self) -> usize {
        thread_number() % self.shards.len()
    }

    /// Visit every shard, one lock at a time.
    pub fn for_each(&self, mut f: impl FnMut(&mut T)) {
        for shard in self.shards.iter() {
            let mut guard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard);
        }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Never true (there is always at least one shard); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_get_their_own_shard_and_readers_see_all() {
        let s: Sharded<u64> = Sharded::new(8);
        let indices: Vec<usize> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        for _ in 0..1000 {
                            *s.local() += 1;
                        }
                        s.local_index()
                    })
                })
                .collect();
            threads.into_iter().filter_map(|t| t.join().ok()).collect()
        });
        assert_eq!(indices.len(), 4);
        let mut expected = [0u64; 8];
        for i in &indices {
            expected[*i] += 1000;
        }
        let mut seen = Vec::new();
        s.for_each(|v| seen.push(*v));
        // Each thread counted only into its own shard, and the reader sees every count.
        assert_eq!(seen, expected);
        assert_eq!(seen.iter().sum::<u64>(), 4000);
    }

    #[test]
    fn more_threads_than_shards_still_count_everything() {
        let s: Sharded<u64> = Sharded::new(2);
        std::thread::scope(|scope| {
            for _ in 0..6 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        *s.local() += 1;
                    }
                });
            }
        });
        let mut total = 0;
        s.for_each(|v| total += *v);
        assert_eq!(total, 3000);
    }
}
