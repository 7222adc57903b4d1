//! Helpers of the fuzz targets (mutation fuzzing under `cargo test`, on stable Rust): a global allocator for
//! test binaries that records, per thread, the largest single allocation and the peak of bytes held (the
//! targets report it to show that a small hostile file cannot make the reader allocate what it declares), the
//! blind byte mutations every target starts from, and the one-line report.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: runtime::fuzz::Probe = runtime::fuzz::Probe;
//! let (result, largest_bytes) = runtime::fuzz::largest_allocation(|| parse(&bytes));
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    // bytes this thread allocated minus those it freed, and the highest that reached
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The system allocator, noting the largest request of the calling thread.
pub struct Probe;

fn note(size: usize) {
    // `try_with`: no note while the thread's locals are being torn down
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    live(size as isize);
}

fn live(delta: isize) {
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + delta);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
}

unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        live(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        live(-(layout.size() as isize));
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the largest single allocation (bytes) this thread asked for meanwhile
/// (0 when the binary's allocator is not [`Probe`]). Allocation requests that fail are counted too.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LARGEST.with(|l| l.replace(0));
    let r = f();
    let largest = LARGEST.with(|l| l.replace(before.max(l.get())));
    (r, largest)
}

/// Runs `f` and returns its result with the peak of the bytes this thread held meanwhile beyond what it held
/// when `f` began (0 when the binary's allocator is not [`Probe`]): the working memory of `f`.
pub fn peak_memory<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(|l| l.get());
    let before = PEAK.with(|p| p.replace(start));
    let r = f();
    let peak = PEAK.with(|p| p.replace(before.max(p.get())));
    (r, (peak - start).max(0) as usize)
}

/// A blind mutation of a file's bytes: 1-3 random bytes overwritten, a truncation, or up to `max_extend`
/// random bytes appended (each a third of the time). Targets add their own structured mutations beside it.
pub fn mutate_bytes(f: &mut Vec<u8>, rng: &mut impl rand::Rng, max_extend: usize) {
    match rng.gen_range(0..3) {
        0 if !f.is_empty() => {
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..f.len());
                f[i] = rng.gen();
            }
        }
        1 if !f.is_empty() => f.truncate(rng.gen_range(0..f.len())),
        _ => f.extend((0..rng.gen_range(1..=max_extend.max(1))).map(|_| rng.gen::<u8>())),
    }
}

/// A fuzz target's one-line summary (the figures benches/RESULTS.md quotes): inputs tried, accepted and
/// refused (a panic fails the test before this line), and the largest single allocation any input caused.
pub fn report(target: &str, accepted: usize, refused: usize, largest: usize) -> String {
    let line = format!(
        "fuzz {target}: {} inputs, {accepted} accepted, {refused} refused with an error, 0 panics, largest allocation {largest} bytes",
        accepted + refused
    );
    eprintln!("{line}");
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probe_sees_the_largest_request_of_its_thread_only() {
        let (v, largest) = super::largest_allocation(|| vec![0u8; 3 << 20].len());
        assert_eq!(v, 3 << 20);
        assert!(largest >= 3 << 20, "{largest}");
        let (_, small) = super::largest_allocation(|| Box::new(7u64));
        assert!(small < 1 << 20, "{small}");
    }

    #[test]
    fn peak_memory_counts_what_is_held_at_once_not_what_passes_through() {
        let (_, one_at_a_time) = super::peak_memory(|| (0..8).map(|_| vec![1u8; 1 << 20].len()).sum::<usize>());
        assert!(((1 << 20)..(2 << 20)).contains(&one_at_a_time), "{one_at_a_time}");
        let (held, all) = super::peak_memory(|| (0..8).map(|_| vec![1u8; 1 << 20]).collect::<Vec<_>>());
        assert!(all >= 8 << 20, "{all}");
        drop(held);
    }
}
