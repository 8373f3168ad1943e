//! The waypoint's global allocator: glibc's malloc, except for two kinds of allocation that
//! get memory of their own: whole-page blocks of 8 to 64 KiB (a page pool) and objects aligned
//! to a cache line (a slab).
//!
//! Why: every HTTP/1.1 inner connection gets an 8 KiB read buffer and an 8 KiB write buffer
//! from hyper (`proto/h1/io.rs`, `INIT_BUFFER_SIZE`), and h2 and the upstream connections
//! have similar ones. In glibc's heap those chunks, and a request's many small objects, lie
//! between the few objects an idle tunnel keeps (its task, its `TunnelCtx`). When an idle
//! tunnel parks (listener/inner.rs `PARK_AFTER`) and frees the rest, `malloc_trim` can give back only
//! pages with nothing live on them: measured, an idle tunnel kept ~10 KB resident for ~1.3 KB
//! of live objects. With the buffers in the pool and the kept objects packed in the slab, an
//! idle tunnel costs ~2.7 KB (benches `idle`, 10,000 tunnels). glibc's own remedy for the
//! buffers (`M_MMAP_THRESHOLD` = 8 KiB) maps every such block with a header that makes 8 KiB
//! cost 12 KiB, and pays an mmap, page faults and a munmap per block: +4% CPU per request at
//! 64 connections in our benchmark; the pool costs no CPU there (measured 2-5% less).
//!
//! Contract:
//! - A request of a whole number of pages from 8 KiB to 64 KiB, alignment <= 4 KiB, gets
//!   that many page-aligned pages. One size class per page count, each a LIFO free list: a
//!   freed block is reused as is (no system call, no page fault in steady state).
//! - A class keeps up to 64 KiB of free blocks resident; the rest is given back within a
//!   second ([`decay`], oldest first). [`release`] (called by memory/mod.rs when load has
//!   dropped, next to `malloc_trim`) hands every free block's pages back with
//!   `madvise(MADV_DONTNEED)`; the block stays in its free list and faults in zeroed pages
//!   when next used.
//! - Everything else, and everything if the address range cannot be set up (another page
//!   size, `ulimit -v`, `WAYPOINT_PAGE_POOL=off`), goes to the system allocator. A class
//!   whose range is used up also falls back to it, block by block.
//! - Slab: a request aligned to 64..=4096 bytes whose size rounds up (to its alignment) to
//!   at most 4 KiB gets a slot of that size in a 64 KiB span holding only such slots. Tokio
//!   aligns its task cells to 128 bytes; types that live as long as a tunnel opt in with
//!   `#[repr(align(64))]`. A span whose last object is freed returns to the span pool, whose
//!   free spans are given back like free blocks.
//! - The address range (7.5 GiB for blocks, 1 GiB for the slab: address space, not memory) is
//!   reserved `PROT_NONE` (no memory, no commit charge) and made accessible in steps as the
//!   classes grow, so strict overcommit accounting stays honest.
//!
//! This is the one module with more than a line of `unsafe`: a global allocator cannot be
//! written without it. Each block is reasoned about where it is.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::{Mutex, MutexGuard, OnceLock};

const PAGE: usize = 4096;
/// Smallest pooled block: hyper's 8 KiB connection buffers.
const MIN_PAGES: usize = 2;
/// Largest pooled block: the access log's 64 KiB write chunks.
const MAX_PAGES: usize = 16;
const CLASSES: usize = MAX_PAGES - MIN_PAGES + 1;
/// Address space (not memory) per class: 512 MiB, e.g. 65,535 blocks of 8 KiB.
const CLASS_SPAN: usize = 512 << 20;
/// Blocks made accessible at a time as a class grows (and at most this many per `madvise`
/// batch, so allocations of that class wait at most one batch while [`release`] runs).
const GROW_BYTES: usize = 256 << 10;
const RELEASE_BATCH: u32 = 64;
/// Free memory a class (or the slab's span pool) keeps resident between trims.
const DIRTY_BYTES: usize = 64 << 10;

/// The reserved range and where each class lives in it.
struct Region {
    base: usize,
    classes: [Geometry; CLASSES],
    /// Spans for cache-line-aligned objects (see [`slab_class`]).
    slab: SlabGeometry,
}

#[derive(Clone, Copy)]
struct SlabGeometry {
    /// `SPANS` [`SpanMeta`]s.
    meta: usize,
    /// `SPANS` classes (`AtomicU32`), apart from [`SpanMeta`]: a free reads its span's class
    /// without the class lock, so no `&mut SpanMeta` (taken under the lock) may cover it.
    classes: usize,
    /// The free-span stack: `SPANS` u32 span indices.
    stack: usize,
    /// Span 0.
    spans: usize,
}

#[derive(Clone, Copy)]
struct Geometry {
    /// Block size in bytes.
    block: usize,
    /// The class's free list: `capacity` u32 block indices.
    stack: usize,
    /// Block 0.
    blocks: usize,
    capacity: u32,
}

/// A class's bookkeeping, under its own lock.
struct State {
    /// Blocks handed out at least once (indices `0..bump`).
    bump: u32,
    /// Blocks made accessible (`mprotect`ed read/write).
    mapped: u32,
    /// Free blocks: `stack[0..top]`.
    top: u32,
    /// `stack[0..clean]` have had their pages released since they were freed.
    clean: u32,
}

static REGION: OnceLock<Option<Region>> = OnceLock::new();
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Mutex<State> = Mutex::new(State {
    bump: 0,
    mapped: 0,
    top: 0,
    clean: 0,
});
static STATES: [Mutex<State>; CLASSES] = [EMPTY; CLASSES];

fn lock(class: usize) -> MutexGuard<'static, State> {
    // Nothing panics while holding it; a poisoned lock would still hold consistent state.
    STATES[class].lock().unwrap_or_else(|e| e.into_inner())
}

fn region() -> Option<&'static Region> {
    REGION.get_or_init(reserve).as_ref()
}

/// Reserve the address range. No allocation in here: we may be inside the first `alloc`.
fn reserve() -> Option<Region> {
    // SAFETY: getenv with a NUL-terminated literal; the returned pointer (if any) is read
    // as a C string at once, before anything can change the environment.
    let off = unsafe {
        let v = libc::getenv(c"WAYPOINT_PAGE_POOL".as_ptr());
        !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"off"
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if off || page != PAGE as libc::c_long {
        return None;
    }
    let total = CLASSES * CLASS_SPAN + SLAB_AREA;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; nothing else
    // can be overwritten. PROT_NONE: no memory and no commit charge until `mprotect`.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as usize;
    let mut classes = [Geometry {
        block: 0,
        stack: 0,
        blocks: 0,
        capacity: 0,
    }; CLASSES];
    for (i, g) in classes.iter_mut().enumerate() {
        let start = base + i * CLASS_SPAN;
        let block = (MIN_PAGES + i) * PAGE;
        let capacity = ((CLASS_SPAN - PAGE) / (block + 4)).min(u32::MAX as usize);
        let stack_bytes = (capacity * 4).div_ceil(PAGE) * PAGE;
        // SAFETY: [start, start + stack_bytes) lies inside the mapping made above and is
        // only ever used as this class's free list.
        if unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                stack_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } != 0
        {
            // SAFETY: unmapping exactly what we mapped; nothing was handed out yet.
            unsafe { libc::munmap(base as *mut libc::c_void, total) };
            return None;
        }
        *g = Geometry {
            block,
            stack: start,
            blocks: start + stack_bytes,
            capacity: capacity as u32,
        };
    }
    // The slab area: span metadata and the free-span stack (read/write now, touched as
    // spans are used), then the spans (made accessible as they are first used).
    let start = base + CLASSES * CLASS_SPAN;
    let meta_bytes = (SPANS
        * (std::mem::size_of::<SpanMeta>() + std::mem::size_of::<std::sync::atomic::AtomicU32>()))
    .div_ceil(PAGE)
        * PAGE;
    let stack_bytes = (SPANS * 4).div_ceil(PAGE) * PAGE;
    // SAFETY: inside the mapping made above; used only as the slab's bookkeeping.
    if unsafe {
        libc::mprotect(
            start as *mut libc::c_void,
            meta_bytes + stack_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    } != 0
    {
        // SAFETY: unmapping exactly what we mapped; nothing was handed out yet.
        unsafe { libc::munmap(base as *mut libc::c_void, total) };
        return None;
    }
    let slab = SlabGeometry {
        meta: start,
        classes: start + SPANS * std::mem::size_of::<SpanMeta>(),
        stack: start + meta_bytes,
        spans: start + meta_bytes + stack_bytes,
    };
    Some(Region {
        base,
        classes,
        slab,
    })
}

/// The class for a request, if it is pooled.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    // Whole pages only: connection buffers are (8 KiB, 16 KiB, 64 KiB); rounding other
    // sizes up would waste up to a page per block (measured: +0.5 MiB at 64 connections).
    if !(MIN_PAGES * PAGE..=MAX_PAGES * PAGE).contains(&size)
        || !size.is_multiple_of(PAGE)
        || layout.align() > PAGE
    {
        return None;
    }
    Some(size / PAGE - MIN_PAGES)
}

impl Region {
    /// The block class of a pointer, if it is one of the pool's blocks.
    fn block_class_of(&self, p: *mut u8) -> Option<usize> {
        let a = p as usize;
        (a >= self.base && a < self.slab.meta).then(|| (a - self.base) / CLASS_SPAN)
    }
}

/// The block class of a pointer we handed out, if it is ours.
fn owner(p: *mut u8) -> Option<usize> {
    REGION.get()?.as_ref()?.block_class_of(p)
}

/// A block of `class`, and whether its pages are known to be zero (never used, or
/// released since).
fn take(class: usize) -> Option<(*mut u8, bool)> {
    let region = region()?;
    let g = &region.classes[class];
    let mut st = lock(class);
    if st.top > 0 {
        st.top -= 1;
        // SAFETY: `top < capacity`, inside the class's read/write free-list area; the
        // entry was written by `give` under this lock.
        let idx = unsafe { *(g.stack as *const u32).add(st.top as usize) };
        let zeroed = st.top < st.clean;
        if zeroed {
            st.clean = st.top;
        }
        return Some(((g.blocks + idx as usize * g.block) as *mut u8, zeroed));
    }
    if st.bump == g.capacity {
        return None;
    }
    if st.bump == st.mapped {
        let step = (GROW_BYTES / g.block).max(1) as u32;
        let more = step.min(g.capacity - st.mapped);
        let at = g.blocks + st.mapped as usize * g.block;
        // SAFETY: the blocks [mapped, mapped + more) lie inside this class's span of the
        // reserved mapping and have never been handed out.
        let ok = unsafe {
            libc::mprotect(
                at as *mut libc::c_void,
                more as usize * g.block,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } == 0;
        if !ok {
            return None;
        }
        st.mapped += more;
    }
    let idx = st.bump;
    st.bump += 1;
    Some(((g.blocks + idx as usize * g.block) as *mut u8, true))
}

/// Put a block back on its class's free list.
fn give(class: usize, region: &Region, p: *mut u8) {
    let g = &region.classes[class];
    let idx = ((p as usize - g.blocks) / g.block) as u32;
    let mut st = lock(class);
    // SAFETY: at most `bump <= capacity` blocks are out, so `top < capacity` here: inside
    // the free-list area, written under the lock.
    unsafe { *(g.stack as *mut u32).add(st.top as usize) = idx };
    st.top += 1;
}

// ---------------------------------------------------------------------------------------
// Slab: objects aligned to a cache line or more (64..=4096 bytes), packed by size.
//
// Why: the objects an idle tunnel keeps (its tokio task, which tokio aligns to 128 bytes to
// keep tasks off each other's cache lines, and the tunnel's state, request/conn.rs `TunnelCtx`,
// aligned on purpose) are allocated between a request's short-lived objects. In glibc's
// heap each then pins a page of freed request memory. Here they sit in 64 KiB spans of
// equal slots, one size per span, so thousands of idle tunnels fill whole pages, and a
// span whose last object is freed goes back to a free list whose pages [`release`] gives
// back.
// ---------------------------------------------------------------------------------------

const SPAN: usize = 64 << 10;
/// Spans in the slab area: 1 GiB of address space.
const SPANS: usize = 16384;
const SLAB_AREA: usize = SPANS * SPAN
    + (SPANS * (std::mem::size_of::<SpanMeta>() + 4)).div_ceil(PAGE) * PAGE
    + (SPANS * 4).div_ceil(PAGE) * PAGE;
/// Slot sizes are multiples of 64 up to 4 KiB.
const SLOT_UNIT: usize = 64;
const SLAB_CLASSES: usize = PAGE / SLOT_UNIT;
const NO_CLASS: u32 = u32::MAX;

/// Per-span bookkeeping, in the slab area, changed only under the span's class lock (or,
/// for a free span, the span pool's lock).
#[repr(C)]
struct SpanMeta {
    live: u32,
    /// Free slots: a list through the slots themselves (slot index + 1; 0 ends it).
    free: u32,
    /// Slots never used: `bump..`.
    bump: u32,
    /// The class's list of spans with free slots (span index + 1; 0 ends it).
    prev: u32,
    next: u32,
}

/// A class's spans with free slots (span index + 1 of the first; 0: none).
struct SlabClass {
    partial: u32,
    /// Objects live (for [`stats`]).
    live: u64,
}

/// Spans not used by any class: `bump..` never used; a stack of freed ones.
struct SpanPool {
    bump: u32,
    mapped: u32,
    top: u32,
    clean: u32,
}

#[allow(clippy::declare_interior_mutable_const)]
const NO_SPANS: Mutex<SlabClass> = Mutex::new(SlabClass {
    partial: 0,
    live: 0,
});
static SLAB_CLASSES_STATE: [Mutex<SlabClass>; SLAB_CLASSES] = [NO_SPANS; SLAB_CLASSES];
static SPAN_POOL: Mutex<SpanPool> = Mutex::new(SpanPool {
    bump: 0,
    mapped: 0,
    top: 0,
    clean: 0,
});

/// The slab class for a request: alignment 64..=4096 and a slot of at most 4 KiB.
fn slab_class(layout: Layout) -> Option<usize> {
    let align = layout.align();
    if !(SLOT_UNIT..=PAGE).contains(&align) {
        return None;
    }
    // A multiple of the alignment, so every slot of the class is aligned (spans are
    // page-aligned).
    let slot = layout.size().max(1).div_ceil(align) * align;
    (slot <= PAGE).then(|| slot / SLOT_UNIT - 1)
}

fn slot_size(class: usize) -> usize {
    (class + 1) * SLOT_UNIT
}

fn slots_per_span(class: usize) -> u32 {
    (SPAN / slot_size(class)) as u32
}

impl SlabGeometry {
    /// SAFETY (callers): `span < SPANS`; the returned reference is used under the lock
    /// that owns the span's bookkeeping (see [`SpanMeta`]).
    #[allow(clippy::mut_from_ref)]
    unsafe fn meta(&self, span: u32) -> &mut SpanMeta {
        // SAFETY: the meta area holds SPANS entries, is read/write and zero-initialised
        // (a valid SpanMeta; the class, in its own array, is set before any use).
        unsafe { &mut *(self.meta as *mut SpanMeta).add(span as usize) }
    }

    /// The slab class using the span, or [`NO_CLASS`]. Read without the class lock when an
    /// object is freed: it cannot change while the span has a live object. A shared
    /// reference to an atomic in its own array, never covered by a `&mut SpanMeta`.
    fn class(&self, span: u32) -> &std::sync::atomic::AtomicU32 {
        debug_assert!((span as usize) < SPANS);
        // SAFETY: the classes area holds SPANS atomics (4-byte aligned: SpanMeta is a multiple
        // of 4 bytes and the area starts page-aligned), is read/write and zero-initialised,
        // and is only ever accessed through shared references to these atomics.
        unsafe { &*(self.classes as *const std::sync::atomic::AtomicU32).add(span as usize) }
    }

    fn span_start(&self, span: u32) -> usize {
        self.spans + span as usize * SPAN
    }

    /// The span of a pointer, if it is a slab object.
    fn span_of(&self, p: *mut u8) -> Option<u32> {
        let a = p as usize;
        (a >= self.spans && a < self.spans + SPANS * SPAN).then(|| ((a - self.spans) / SPAN) as u32)
    }
}

/// A span for `class` (taken from the free stack, or never used), or `None` when the area
/// is used up.
fn take_span(g: &SlabGeometry) -> Option<u32> {
    let mut pool = SPAN_POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.top > 0 {
        pool.top -= 1;
        if pool.top < pool.clean {
            pool.clean = pool.top;
        }
        // SAFETY: `top < SPANS`, inside the read/write stack area, written by `give_span`.
        return Some(unsafe { *(g.stack as *const u32).add(pool.top as usize) });
    }
    if pool.bump as usize == SPANS {
        return None;
    }
    if pool.bump == pool.mapped {
        let more = (GROW_BYTES / SPAN).max(1).min(SPANS - pool.mapped as usize);
        // SAFETY: spans [mapped, mapped + more) lie inside the reserved slab area and were
        // never handed out.
        let ok = unsafe {
            libc::mprotect(
                g.span_start(pool.mapped) as *mut libc::c_void,
                more * SPAN,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        } == 0;
        if !ok {
            return None;
        }
        pool.mapped += more as u32;
    }
    pool.bump += 1;
    Some(pool.bump - 1)
}

fn give_span(g: &SlabGeometry, span: u32) {
    let mut pool = SPAN_POOL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: at most SPANS spans exist, so `top < SPANS`; written under the lock.
    unsafe { *(g.stack as *mut u32).add(pool.top as usize) = span };
    pool.top += 1;
}

fn slab_lock(class: usize) -> MutexGuard<'static, SlabClass> {
    SLAB_CLASSES_STATE[class]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Unlink `span` from its class's partial list.
///
/// SAFETY (callers): the class lock is held and `span` is on its list.
unsafe fn unlink(g: &SlabGeometry, cl: &mut SlabClass, span: u32) {
    // SAFETY: under the class lock, per the contract.
    unsafe {
        let m = g.meta(span);
        let (prev, next) = (m.prev, m.next);
        if prev == 0 {
            cl.partial = next;
        } else {
            g.meta(prev - 1).next = next;
        }
        if next != 0 {
            g.meta(next - 1).prev = prev;
        }
        m.prev = 0;
        m.next = 0;
    }
}

/// Push `span` on its class's partial list.
///
/// SAFETY (callers): the class lock is held and `span` is not on the list.
unsafe fn push_partial(g: &SlabGeometry, cl: &mut SlabClass, span: u32) {
    // SAFETY: under the class lock, per the contract.
    unsafe {
        let m = g.meta(span);
        m.prev = 0;
        m.next = cl.partial;
        if cl.partial != 0 {
            g.meta(cl.partial - 1).prev = span + 1;
        }
        cl.partial = span + 1;
    }
}

fn slab_alloc(class: usize) -> Option<*mut u8> {
    let g = &region()?.slab;
    let mut cl = slab_lock(class);
    let span = match cl.partial {
        0 => {
            let span = take_span(g)?;
            // SAFETY: the span was free, so nobody else uses its bookkeeping; we hold the
            // class lock from here on.
            unsafe {
                g.class(span)
                    .store(class as u32, std::sync::atomic::Ordering::Relaxed);
                let m = g.meta(span);
                m.live = 0;
                m.free = 0;
                m.bump = 0;
                push_partial(g, &mut cl, span);
            }
            span
        }
        s => s - 1,
    };
    let size = slot_size(class);
    // SAFETY: the span is this class's and we hold the class lock; slot indices are below
    // `slots_per_span`, so every slot lies inside the span, which is read/write.
    unsafe {
        let m = g.meta(span);
        let idx = if m.free != 0 {
            let idx = m.free - 1;
            m.free = *(g.span_start(span) as *const u32).add(idx as usize * size / 4);
            idx
        } else {
            m.bump += 1;
            m.bump - 1
        };
        m.live += 1;
        cl.live += 1;
        if m.free == 0 && m.bump == slots_per_span(class) {
            unlink(g, &mut cl, span);
        }
        Some((g.span_start(span) + idx as usize * size) as *mut u8)
    }
}

fn slab_free(g: &SlabGeometry, span: u32, p: *mut u8) {
    // `p` is a live object of this span, so its class is set and stays so until we free it
    // under the class lock below.
    let class = g.class(span).load(std::sync::atomic::Ordering::Relaxed) as usize;
    let mut cl = slab_lock(class);
    let size = slot_size(class);
    // SAFETY: under the class lock; `p` is a slot of the span (ours to reuse now).
    unsafe {
        let m = g.meta(span);
        let idx = ((p as usize - g.span_start(span)) / size) as u32;
        let was_full = m.free == 0 && m.bump == slots_per_span(class);
        *(p as *mut u32) = m.free;
        m.free = idx + 1;
        m.live -= 1;
        cl.live -= 1;
        if m.live == 0 {
            g.class(span)
                .store(NO_CLASS, std::sync::atomic::Ordering::Relaxed);
            if !was_full {
                unlink(g, &mut cl, span);
            }
            drop(cl);
            give_span(g, span);
        } else if was_full {
            push_partial(g, &mut cl, span);
        }
    }
}

/// Give back the pages of spans no class uses. Returns the bytes released.
fn release_spans(g: &SlabGeometry, keep: usize) -> usize {
    let mut released = 0;
    loop {
        let mut pool = SPAN_POOL.lock().unwrap_or_else(|e| e.into_inner());
        let dirty = (pool.top - pool.clean) as usize;
        let n = dirty
            .saturating_sub(keep / SPAN)
            .min(RELEASE_BATCH as usize) as u32;
        if n == 0 {
            return released;
        }
        for i in pool.clean..pool.clean + n {
            // SAFETY: the span is on the free stack, so no object lives in it until the
            // lock is let go.
            unsafe {
                let span = *(g.stack as *const u32).add(i as usize);
                libc::madvise(
                    g.span_start(span) as *mut libc::c_void,
                    SPAN,
                    libc::MADV_DONTNEED,
                );
            }
        }
        pool.clean += n;
        released += n as usize * SPAN;
    }
}

/// Give back the pages of free blocks and spans beyond what each class may keep resident
/// ([`DIRTY_BYTES`]), oldest first: called every second (memory/mod.rs), so a burst of one size
/// does not hold memory the heap could have reused for others until load drops. Returns the
/// bytes released.
pub fn decay() -> usize {
    release_beyond(DIRTY_BYTES)
}

/// Give the pages of every free pooled block back to the OS. Returns the bytes released.
pub fn release() -> usize {
    release_beyond(0)
}

/// Release free blocks (and spans) of each class until at most `keep` bytes of them stay
/// resident.
fn release_beyond(keep: usize) -> usize {
    let Some(region) = REGION.get().and_then(|r| r.as_ref()) else {
        return 0;
    };
    let mut released = 0;
    for (class, g) in region.classes.iter().enumerate() {
        loop {
            // Batches: allocations of this class wait for one batch at most.
            let mut st = lock(class);
            let dirty = (st.top - st.clean) as usize;
            let n = dirty
                .saturating_sub(keep / g.block)
                .min(RELEASE_BATCH as usize) as u32;
            if n == 0 {
                break;
            }
            for i in st.clean..st.clean + n {
                // SAFETY: the index was written by `give` under this lock, and the block is
                // free (on the list) until the lock is let go, so nobody uses its pages.
                unsafe {
                    let idx = *(g.stack as *const u32).add(i as usize);
                    libc::madvise(
                        (g.blocks + idx as usize * g.block) as *mut libc::c_void,
                        g.block,
                        libc::MADV_DONTNEED,
                    );
                }
            }
            st.clean += n;
            released += n as usize * g.block;
        }
    }
    released + release_spans(&region.slab, keep)
}

/// What the pool holds, in bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Blocks (8-64 KiB) handed out.
    pub blocks_used: u64,
    /// Spans holding at least one slab object.
    pub slab_spans: u64,
    /// Slab objects live (slot sizes).
    pub slab_live: u64,
    /// Free blocks and spans still resident (given back by the next [`release`]).
    pub free: u64,
}

/// What the pool holds now.
pub fn stats() -> Stats {
    let Some(region) = REGION.get().and_then(|r| r.as_ref()) else {
        return Stats::default();
    };
    let mut out = Stats::default();
    for (class, g) in region.classes.iter().enumerate() {
        let st = lock(class);
        out.blocks_used += (st.bump - st.top) as u64 * g.block as u64;
        out.free += (st.top - st.clean) as u64 * g.block as u64;
    }
    for class in 0..SLAB_CLASSES {
        out.slab_live += slab_lock(class).live * slot_size(class) as u64;
    }
    let pool = SPAN_POOL.lock().unwrap_or_else(|e| e.into_inner());
    out.slab_spans += (pool.bump - pool.top) as u64 * SPAN as u64;
    out.free += (pool.top - pool.clean) as u64 * SPAN as u64;
    out
}

/// One block size of the page pool, in blocks (admin `/memory`).
#[derive(Debug, Clone, Copy)]
pub struct BlockSize {
    pub size: usize,
    pub in_use: u32,
    pub free_resident: u32,
    pub free_released: u32,
}

/// One slot size of the slab, in objects (admin `/memory`).
#[derive(Debug, Clone, Copy)]
pub struct SlotSize {
    pub size: usize,
    pub live: u64,
}

/// Every block and slot size in use, for the admin `/memory` page.
pub fn detail() -> (Vec<BlockSize>, Vec<SlotSize>) {
    let Some(region) = REGION.get().and_then(|r| r.as_ref()) else {
        return (Vec::new(), Vec::new());
    };
    let blocks = region
        .classes
        .iter()
        .enumerate()
        .filter_map(|(class, g)| {
            let st = lock(class);
            (st.bump > 0).then(|| BlockSize {
                size: g.block,
                in_use: st.bump - st.top,
                free_resident: st.top - st.clean,
                free_released: st.clean,
            })
        })
        .collect();
    let slots = (0..SLAB_CLASSES)
        .filter_map(|class| {
            let live = slab_lock(class).live;
            (live > 0).then(|| SlotSize {
                size: slot_size(class),
                live,
            })
        })
        .collect();
    (blocks, slots)
}

/// The allocator (installed by the `waypoint` binary with `#[global_allocator]`).
pub struct PagePool;

// SAFETY: every block handed out is either the system allocator's (and given back to it,
// told apart by address) or a pooled block of at least the requested size, page-aligned
// (alignment <= 4 KiB was checked), owned by nobody else until it is deallocated.
unsafe impl GlobalAlloc for PagePool {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(c) = slab_class(layout)
            && let Some(p) = slab_alloc(c)
        {
            return p;
        }
        if let Some(c) = class_of(layout)
            && let Some((p, _)) = take(c)
        {
            return p;
        }
        // SAFETY: same contract, passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(c) = slab_class(layout)
            && let Some(p) = slab_alloc(c)
        {
            // SAFETY: the slot is ours and at least `layout.size()` bytes long.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            return p;
        }
        if let Some(c) = class_of(layout)
            && let Some((p, zeroed)) = take(c)
        {
            if !zeroed {
                // SAFETY: the block is ours and at least `layout.size()` bytes long.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            }
            return p;
        }
        // SAFETY: same contract, passed through.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if let Some(region) = REGION.get().and_then(|r| r.as_ref()) {
            if let Some(span) = region.slab.span_of(p) {
                slab_free(&region.slab, span, p);
                return;
            }
            if let Some(class) = region.block_class_of(p) {
                give(class, region, p);
                return;
            }
        }
        // SAFETY: not ours, so the system allocator's, with the layout it was made with.
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow isize, which is all `from_size_align_unchecked` requires here.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let in_slab = REGION
            .get()
            .and_then(|r| r.as_ref())
            .and_then(|r| r.slab.span_of(p))
            .is_some();
        if in_slab || slab_class(new_layout).is_some() {
            // Aligned objects are rarely resized: always move.
            // SAFETY: as below.
            unsafe {
                let q = self.alloc(new_layout);
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                    self.dealloc(p, layout);
                }
                return q;
            }
        }
        let old = owner(p);
        let new = class_of(new_layout);
        match (old, new) {
            // SAFETY: the system allocator's block, resized by it.
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            // Same page count: the block already fits.
            (Some(a), Some(b)) if a == b => p,
            _ => {
                // SAFETY: a new block of the new layout; the old one is valid for
                // `layout.size()` bytes and the two do not overlap (both are live).
                unsafe {
                    let q = self.alloc(new_layout);
                    if !q.is_null() {
                        std::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                    q
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_of(p: *mut u8, len: usize) -> usize {
        // Resident pages of [p, p + len) by mincore.
        let pages = len.div_ceil(PAGE);
        let mut v = vec![0u8; pages];
        // SAFETY: p is page-aligned and the range is mapped (a pooled block).
        let r = unsafe { libc::mincore(p as *mut libc::c_void, len, v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn classes() {
        let l = |n| Layout::from_size_align(n, 8).unwrap();
        assert_eq!(class_of(l(8191)), None);
        assert_eq!(class_of(l(8192)), Some(0));
        assert_eq!(class_of(l(8193)), None, "whole pages only");
        assert_eq!(class_of(l(12288)), Some(1));
        assert_eq!(class_of(l(65536)), Some(CLASSES - 1));
        assert_eq!(class_of(l(65537)), None);
        assert_eq!(class_of(Layout::from_size_align(8192, 8192).unwrap()), None);
    }

    /// Blocks are reused LIFO, released pages read back as zero, resizing keeps the bytes,
    /// and the system allocator's blocks are told apart from ours.
    #[test]
    fn blocks_reuse_release_and_resize() {
        let pool = PagePool;
        let l8 = Layout::from_size_align(8192, 8).unwrap();
        // SAFETY (whole test): blocks are used within their layouts and freed once.
        unsafe {
            let a = pool.alloc(l8);
            assert!(!a.is_null());
            assert!(owner(a).is_some(), "8 KiB is pooled");
            assert_eq!(a as usize % PAGE, 0, "page-aligned");
            std::ptr::write_bytes(a, 0xAB, 8192);
            pool.dealloc(a, l8);
            let b = pool.alloc(l8);
            assert!(owner(b).is_some());
            pool.dealloc(b, l8);

            // A class no other test uses, so nobody takes the block between the calls.
            let l60 = Layout::from_size_align(60 << 10, 8).unwrap();
            let c = pool.alloc(l60);
            std::ptr::write_bytes(c, 0xCD, 60 << 10);
            assert_eq!(rss_of(c, 60 << 10), 15, "written pages are resident");
            pool.dealloc(c, l60);
            let again = pool.alloc(l60);
            assert_eq!(again, c, "the last block freed is the first reused");
            pool.dealloc(again, l60);
            assert!(release() >= 60 << 10);
            assert_eq!(rss_of(c, 60 << 10), 0, "released pages are gone");

            // A zeroed block is zero even when its pages were written before.
            let z = pool.alloc_zeroed(l8);
            assert!((0..8192).all(|i| *z.add(i) == 0));
            std::ptr::write_bytes(z, 0x11, 8192);
            pool.dealloc(z, l8);
            let z = pool.alloc_zeroed(l8);
            assert!((0..8192).all(|i| *z.add(i) == 0));

            // Growing out of the system allocator into the pool, within the pool, and out of
            // it again keeps the contents.
            let l4 = Layout::from_size_align(4096, 8).unwrap();
            let s = pool.alloc(l4);
            assert!(owner(s).is_none(), "4 KiB is the system allocator's");
            for i in 0..4096 {
                *s.add(i) = i as u8;
            }
            let g = pool.realloc(s, l4, 12288);
            assert!(owner(g).is_some());
            let g = pool.realloc(g, Layout::from_size_align(12288, 8).unwrap(), 16384);
            assert!(owner(g).is_some());
            let g = pool.realloc(g, Layout::from_size_align(16384, 8).unwrap(), 70_000);
            assert!(
                owner(g).is_none(),
                "beyond 64 KiB is the system allocator's"
            );
            assert!((0..4096).all(|i| *g.add(i) == i as u8));
            pool.dealloc(g, Layout::from_size_align(70_000, 8).unwrap());
            pool.dealloc(z, l8);
        }
        assert!(stats().blocks_used < 1 << 30);
    }

    #[test]
    fn slab_classes() {
        let l = |n, a| Layout::from_size_align(n, a).unwrap();
        assert_eq!(
            slab_class(l(100, 8)),
            None,
            "ordinary objects stay in the heap"
        );
        assert_eq!(slab_class(l(100, 64)), Some(1));
        assert_eq!(slab_class(l(1000, 128)), Some(1024 / 64 - 1));
        assert_eq!(slab_class(l(4096, 64)), Some(SLAB_CLASSES - 1));
        assert_eq!(slab_class(l(4097, 64)), None, "big ones go elsewhere");
        assert_eq!(slab_class(l(64, 8192)), None);
    }

    /// Aligned objects are packed into spans, aligned, distinct and intact; a span whose
    /// objects are all freed is given back, and its pages are released.
    #[test]
    fn slab_packs_and_gives_spans_back() {
        let pool = PagePool;
        // A size no other test uses (1088 bytes, 60 per span), aligned like tokio's tasks.
        let l = Layout::from_size_align(1080, 64).unwrap();
        let per = slots_per_span(slab_class(l).unwrap()) as usize;
        let n = per * 3 + 7;
        // SAFETY (whole test): objects are used within their layout and freed once.
        unsafe {
            let objs: Vec<usize> = (0..n)
                .map(|i| {
                    let p = pool.alloc(l);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % 64, 0);
                    std::ptr::write_bytes(p, i as u8, l.size());
                    p as usize
                })
                .collect();
            let g = &region().unwrap().slab;
            let spans: std::collections::BTreeSet<u32> = objs
                .iter()
                .map(|&p| g.span_of(p as *mut u8).expect("a slab object"))
                .collect();
            assert_eq!(spans.len(), 4, "{n} objects of {per} per span fill 4 spans");
            let mut sorted = objs.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), n, "all distinct");
            for (i, &p) in objs.iter().enumerate() {
                let p = p as *mut u8;
                assert!(
                    (0..l.size()).all(|k| *p.add(k) == i as u8),
                    "object {i} intact"
                );
            }
            // Free every other object, then reuse: the holes are filled first.
            for &p in objs.iter().step_by(2) {
                pool.dealloc(p as *mut u8, l);
            }
            let again: Vec<usize> = (0..n.div_ceil(2)).map(|_| pool.alloc(l) as usize).collect();
            assert!(
                again
                    .iter()
                    .all(|p| spans.contains(&g.span_of(*p as *mut u8).unwrap()))
            );
            for &p in objs.iter().skip(1).step_by(2).chain(again.iter()) {
                pool.dealloc(p as *mut u8, l);
            }
            // Every span is free again: its pages go back to the OS.
            release();
            // Another test may take some of the freed spans meanwhile (it holds fewer than
            // four at once); every one still free must have no resident page.
            let mut checked = 0;
            for &s in &spans {
                if g.class(s).load(std::sync::atomic::Ordering::Relaxed) == NO_CLASS {
                    assert_eq!(
                        rss_of(g.span_start(s) as *mut u8, SPAN),
                        0,
                        "span {s} released"
                    );
                    checked += 1;
                }
            }
            assert!(checked > 0, "the four spans were given back");
        }
    }

    /// Many threads taking and freeing blocks of several classes never get the same block.
    #[test]
    fn concurrent_blocks_are_distinct() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let pool = PagePool;
                    let mut held = Vec::new();
                    for round in 0..200usize {
                        let (size, align) = match round % 3 {
                            0 => (8192 + (round % 5) * 4096, 16),
                            1 => (200 + round % 7 * 64, 64),
                            _ => (900, 128),
                        };
                        let l = Layout::from_size_align(size, align).unwrap();
                        // SAFETY: each block is written within its size and freed once.
                        unsafe {
                            let p = pool.alloc(l);
                            std::ptr::write_bytes(p, t as u8, size);
                            held.push((p as usize, l));
                            if held.len() > 8 {
                                let (q, lq) = held.remove(0);
                                let q = q as *mut u8;
                                assert!((0..lq.size()).all(|i| *q.add(i) == t as u8));
                                pool.dealloc(q, lq);
                            }
                        }
                    }
                    for (q, lq) in held {
                        // SAFETY: as above.
                        unsafe { pool.dealloc(q as *mut u8, lq) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// Objects allocated on one thread and freed (or resized) on another, every block size
    /// and slab slot size, while other threads do the same: the pattern of a request future
    /// created on one worker and dropped on another. Every byte written survives until its
    /// free, and no block is handed out twice.
    #[test]
    fn objects_freed_and_resized_on_other_threads() {
        use std::sync::mpsc;
        let sizes: Vec<Layout> = (MIN_PAGES..=MAX_PAGES)
            .map(|pages| Layout::from_size_align(pages * PAGE, 16).unwrap())
            .chain((1..=SLAB_CLASSES).map(|i| Layout::from_size_align(i * SLOT_UNIT, 64).unwrap()))
            .collect();
        let producers = 3;
        let (tx, rx) = mpsc::sync_channel::<(usize, Layout, u8)>(64);
        let consumer = std::thread::spawn(move || {
            let pool = PagePool;
            let mut n = 0;
            for (p, l, tag) in rx {
                let p = p as *mut u8;
                // SAFETY: the producer wrote `tag` over the whole block and gave it up.
                unsafe {
                    assert!((0..l.size()).all(|i| *p.add(i) == tag), "block changed");
                    if n % 3 == 0 {
                        // Resize across classes (block -> slab -> heap and back), then free.
                        let bigger = l.size() * 3 / 2 + 1;
                        let q = pool.realloc(p, l, bigger);
                        assert!(!q.is_null());
                        assert!(
                            (0..l.size()).all(|i| *q.add(i) == tag),
                            "realloc kept the bytes"
                        );
                        pool.dealloc(q, Layout::from_size_align(bigger, l.align()).unwrap());
                    } else {
                        pool.dealloc(p, l);
                    }
                }
                n += 1;
            }
            n
        });
        let threads: Vec<_> = (0..producers)
            .map(|t| {
                let tx = tx.clone();
                let sizes = sizes.clone();
                std::thread::spawn(move || {
                    let pool = PagePool;
                    for round in 0..4 {
                        for (i, l) in sizes.iter().enumerate() {
                            let tag = (t * 61 + i + round) as u8;
                            // SAFETY: written within its size; handed to the consumer, which
                            // frees it exactly once.
                            unsafe {
                                let p = pool.alloc(*l);
                                assert!(!p.is_null());
                                assert_eq!(p as usize % l.align(), 0);
                                std::ptr::write_bytes(p, tag, l.size());
                                tx.send((p as usize, *l, tag)).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        for t in threads {
            t.join().unwrap();
        }
        let freed = consumer.join().unwrap();
        assert_eq!(freed, producers * 4 * sizes.len());
    }
}
