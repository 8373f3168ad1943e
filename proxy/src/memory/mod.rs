//! Memory: the allocator ([`pages`], the binary's `#[global_allocator]`) and giving freed
//! memory back to the operating system after load drops (this module).
//!
//! glibc's malloc keeps freed chunks that sit between live allocations resident: after a
//! burst of tunnels ends, or idle HTTP/1.1 tunnels park and free their connection buffers
//! (listener `PARK_AFTER`), the process would stay at its peak RSS. `malloc_trim(0)`
//! (glibc >= 2.8) returns every whole free page of every arena.
//!
//! Trimming walks the arenas under their locks, so it only runs when load has really dropped:
//! open tunnels, or busy ones (open and not parked), fell by at least [`MIN_DROP`] and by a
//! quarter since the previous check. Under steady load, even with a new tunnel per request,
//! it never runs.

pub mod pages;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// How often the drop in busy tunnels is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Fewest released tunnels worth a trim.
pub const MIN_DROP: i64 = 64;

/// A gauge that remembers its highest value since the last check.
#[derive(Debug, Default)]
struct Gauge {
    now: AtomicI64,
    peak: AtomicI64,
}

impl Gauge {
    fn inc(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn dec(&self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }

    /// Did it fall by at least [`MIN_DROP`] and a quarter since the last check? Resets the peak.
    fn dropped(&self) -> bool {
        let now = self.now.load(Ordering::Relaxed);
        let peak = self.peak.swap(now, Ordering::Relaxed).max(now);
        peak - now >= MIN_DROP && now * 4 <= peak * 3
    }
}

/// Tunnel accounting for [`run`]: open tunnels, and busy ones (open and not parked).
#[derive(Debug, Default)]
pub struct Reclaim {
    open: Gauge,
    busy: Gauge,
    /// Trims done.
    pub trims: AtomicU64,
}

impl Reclaim {
    /// A tunnel opened.
    pub fn opened(&self) {
        self.open.inc();
        self.busy.inc();
    }

    /// A tunnel closed.
    pub fn closed(&self) {
        self.open.dec();
        self.busy.dec();
    }

    /// An idle tunnel parked (released its connection buffers).
    pub fn parked(&self) {
        self.busy.dec();
    }

    /// A parked tunnel woke for its next request.
    pub fn unparked(&self) {
        self.busy.inc();
    }

    /// Open tunnels that are parked now.
    pub fn parked_now(&self) -> u64 {
        let open = self.open.now.load(Ordering::Relaxed);
        let busy = self.busy.now.load(Ordering::Relaxed);
        (open - busy).max(0) as u64
    }

    /// Has load dropped enough since the last check to be worth a trim? Resets the peaks.
    fn dropped_enough(&self) -> bool {
        // Both gauges are checked (and reset) every time.
        let closed = self.open.dropped();
        let parked = self.busy.dropped();
        closed || parked
    }
}

/// Check every [`CHECK_EVERY`]; trim off the runtime's worker threads when load dropped.
pub async fn run(reclaim: std::sync::Arc<Reclaim>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Closing thousands of tunnels frees their memory over a few milliseconds to a second
    // (connection tasks end, buffers drop): a drop is trimmed at once and once more a
    // check later.
    let mut again = false;
    loop {
        tick.tick().await;
        let dropped = reclaim.dropped_enough();
        if dropped || again {
            let _ = tokio::task::spawn_blocking(trim).await;
            reclaim.trims.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(dropped, "returned free memory to the OS");
        } else {
            // Otherwise free page-pool blocks beyond each size's allowance go back (pages.rs
            // `decay`): none under steady load, a madvise per block after a burst; off the
            // worker threads, as that can be thousands of calls.
            let _ = tokio::task::spawn_blocking(crate::memory::pages::decay).await;
        }
        again = dropped;
    }
}

/// Return free pages to the OS (glibc only; other C libraries do it themselves or not at all).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: `malloc_trim` is glibc's own maintenance call: no arguments to get wrong (0 =
    // keep no extra padding), no pointers passed, and it only touches allocator-owned free
    // chunks under the arenas' locks, so it is sound to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    crate::memory::pages::release();
}

/// Return free pages to the OS (glibc only; other C libraries do it themselves or not at all).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {
    crate::memory::pages::release();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_real_drop() {
        let r = Reclaim::default();
        for _ in 0..100 {
            r.opened();
        }
        assert!(!r.dropped_enough(), "no drop yet");
        // Steady churn (a new tunnel per request): as many closed as opened.
        for _ in 0..100 {
            r.closed();
            r.opened();
        }
        assert!(!r.dropped_enough(), "steady load is not a drop");
        // Most tunnels go idle and park.
        for _ in 0..80 {
            r.parked();
        }
        assert!(r.dropped_enough(), "100 -> 20 busy tunnels is a drop");
        assert!(!r.dropped_enough(), "the peaks reset after a check");
        // The parked tunnels close: open tunnels drop although busy ones do not.
        for _ in 0..80 {
            r.unparked();
            r.closed();
        }
        assert!(r.dropped_enough(), "100 -> 20 open tunnels is a drop");
        // A small drop is not worth it.
        for _ in 0..30 {
            r.opened();
        }
        assert!(!r.dropped_enough());
        for _ in 0..30 {
            r.closed();
        }
        assert!(!r.dropped_enough(), "a drop of 30 is below MIN_DROP");
        trim();
    }
}
