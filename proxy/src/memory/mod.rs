//! Memory: the allocator and giving freed memory back to the OS after load drops.
//!
//! The allocator is jemalloc (tikv-jemallocator, as ztunnel ships it), installed by
//! [`install_allocator!`](crate::install_allocator) in the binary and configured by
//! [`MALLOC_CONF`]: a background thread returns dirty pages after 1 s (jemalloc's default:
//! 10 s, then 10 s more as "muzzy" pages). Issue 17 measured it against glibc, mimalloc and
//! the page pool this project used to carry (a thousand lines of its own unsafe allocator):
//! so configured, jemalloc held parked idle tunnels within 10% of the page pool (2,954 vs
//! 2,685 bytes each, 10,000 tunnels) and the memory left after they closed within 8%, at
//! equal CPU per request (benches/alloc.sh, docs/bench/2026-12-06-allocators.md). The page
//! pool did not win by the 1.5x that would have justified keeping it. jemalloc's per-thread
//! caches also keep allocation off any shared lock.
//!
//! On top of the decay, when load has really dropped (open tunnels, or busy ones, open and
//! not parked, fell by at least [`MIN_DROP`] and by a quarter since the previous check),
//! every arena is purged at once ([`trim`]): a burst's memory goes back within a second.
//! Under steady load, even with a new tunnel per request, it never runs.

/// The binary's allocator, by Cargo feature (proxy/Cargo.toml; reported by admin `/memory`).
pub const ALLOCATOR: &str = if cfg!(feature = "jemalloc") {
    "jemalloc"
} else if cfg!(feature = "alloc-mimalloc") {
    "mimalloc"
} else {
    "system"
};

/// jemalloc's options, compiled in (an `_RJEM_MALLOC_CONF` environment variable still
/// overrides them: jemalloc reads it after): dirty pages go back after 1 s from a background
/// thread, without the muzzy stage (`MADV_FREE` pages would still count in RSS).
pub const MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer with the layout of jemalloc's `const char *malloc_conf`.
#[repr(transparent)]
pub struct MallocConf(pub *const std::ffi::c_char);

// SAFETY: it points at a 'static, immutable, NUL-terminated string literal: threads sharing it
// read nothing that can change.
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}

#[cfg(feature = "jemalloc")]
pub use tikv_jemallocator::Jemalloc;

/// Install the waypoint's allocator as the binary's `#[global_allocator]` (the `waypoint`
/// binary, and the integration tests, which run the data path on it as production does).
#[cfg(feature = "jemalloc")]
#[macro_export]
macro_rules! install_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::memory::Jemalloc = $crate::memory::Jemalloc;

        /// jemalloc reads its options from this symbol when it starts (tikv-jemalloc-sys
        /// prefixes jemalloc's names with `_rjem_`).
        #[allow(unsafe_code)] // an exported symbol: this macro is its only definition.
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static MALLOC_CONF: $crate::memory::MallocConf = $crate::memory::MALLOC_CONF;
    };
}

#[cfg(all(not(feature = "jemalloc"), feature = "alloc-mimalloc"))]
pub use mimalloc::MiMalloc;

/// Install the allocator chosen by feature (benches/alloc.sh): mimalloc.
#[cfg(all(not(feature = "jemalloc"), feature = "alloc-mimalloc"))]
#[macro_export]
macro_rules! install_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::memory::MiMalloc = $crate::memory::MiMalloc;
    };
}

/// Install the allocator chosen by feature (benches/alloc.sh): the system's (glibc).
#[cfg(not(any(feature = "jemalloc", feature = "alloc-mimalloc")))]
#[macro_export]
macro_rules! install_allocator {
    () => {};
}

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
            // Off the worker threads: a purge can be thousands of madvise calls.
            let _ = tokio::task::spawn_blocking(trim).await;
            reclaim.trims.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(dropped, "returned free memory to the OS");
        }
        again = dropped;
    }
}

/// Return free pages to the OS now: every jemalloc arena purged (glibc: `malloc_trim`).
pub fn trim() {
    sys::trim();
}

/// What the allocator holds, in bytes (jemalloc's `stats.*`; zeros for the others).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes in pages holding live allocations.
    pub active: u64,
    /// Bytes the allocator keeps resident (data and metadata).
    pub resident: u64,
    /// Bytes of the allocator's own metadata.
    pub metadata: u64,
    /// Bytes mapped but given back to the OS (address space, not memory).
    pub retained: u64,
}

/// The allocator's figures now.
pub fn stats() -> Stats {
    sys::stats()
}

/// jemalloc's options in effect: (background thread, dirty decay in ms); `(false, -1)` for
/// the other allocators.
pub fn options() -> (bool, i64) {
    sys::options()
}

#[cfg(feature = "jemalloc")]
#[allow(unsafe_code)]
mod sys {
    use std::ffi::{CStr, c_void};
    use std::ptr::null_mut;

    /// `arena.<MALLCTL_ARENAS_ALL>.purge` (jemalloc 5: arena index 4096 = all).
    const PURGE_ALL_ARENAS: &CStr = c"arena.4096.purge";

    pub fn trim() {
        // SAFETY: a NUL-terminated control name and no input or output buffer, which is
        // what the purge command takes (jemalloc ctl.c: READONLY and WRITEONLY).
        unsafe {
            tikv_jemalloc_sys::mallctl(
                PURGE_ALL_ARENAS.as_ptr(),
                null_mut(),
                null_mut(),
                null_mut(),
                0,
            );
        }
    }

    /// Read a value of type `T` (the control's own type, per jemalloc's manual).
    fn read<T: Copy + Default>(name: &CStr) -> Option<T> {
        let mut v = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: the output buffer is a `T` with its exact length, the type the caller
        // names for this control; no input.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut v as *mut T).cast::<c_void>(),
                &mut len,
                null_mut(),
                0,
            )
        };
        (rc == 0 && len == std::mem::size_of::<T>()).then_some(v)
    }

    pub fn stats() -> super::Stats {
        // Statistics are a snapshot taken at the last `epoch` write: advance it first.
        let mut epoch: u64 = 1;
        let mut len = std::mem::size_of::<u64>();
        // SAFETY: `epoch` is a uint64_t, read and written through buffers of its size.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"epoch".as_ptr(),
                (&mut epoch as *mut u64).cast::<c_void>(),
                &mut len,
                (&mut epoch as *mut u64).cast::<c_void>(),
                std::mem::size_of::<u64>(),
            );
        }
        let size = |name| read::<usize>(name).unwrap_or(0) as u64;
        super::Stats {
            allocated: size(c"stats.allocated"),
            active: size(c"stats.active"),
            resident: size(c"stats.resident"),
            metadata: size(c"stats.metadata"),
            retained: size(c"stats.retained"),
        }
    }

    pub fn options() -> (bool, i64) {
        (
            read::<bool>(c"opt.background_thread").unwrap_or(false),
            read::<isize>(c"opt.dirty_decay_ms").unwrap_or(-1) as i64,
        )
    }
}

#[cfg(not(feature = "jemalloc"))]
mod sys {
    pub fn trim() {
        // SAFETY: `malloc_trim` is glibc's own maintenance call: no pointers passed, and it
        // only touches allocator-owned free chunks under the arenas' locks.
        #[cfg(all(
            target_os = "linux",
            target_env = "gnu",
            not(feature = "alloc-mimalloc")
        ))]
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }

    pub fn stats() -> super::Stats {
        super::Stats::default()
    }

    pub fn options() -> (bool, i64) {
        (false, -1)
    }
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
