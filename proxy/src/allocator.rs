//! The proxy's heap allocator: glibc's malloc, with over-aligned blocks carved out of
//! ordinary malloc blocks.
//!
//! Rust's `System` allocator asks `posix_memalign` for any alignment above 16 bytes.
//! glibc serves that past its per-thread cache: it takes a block larger by the alignment
//! from the arena and splits the slack off again. tokio aligns every task to 128 bytes
//! (a cache-line pair), and the proxy spawns a task per HTTP/2 stream, so each request
//! paid ~580 instructions for that one allocation (callgrind, inbound side), where a
//! cached malloc of the same size costs about 100. Padding a malloc block by the
//! alignment and remembering the block's start just before the aligned address keeps
//! those allocations in the cache, for at most `align` bytes more per block.
//!
//! Unsafe because a global allocator is: `GlobalAlloc` is an unsafe trait whose callers
//! trust the pointers it returns, and the padding is pointer arithmetic within a block.
//! The crate allows `unsafe` only here and in [`crate::os`]. Its tests run under Miri
//! (`.ci/run`), which checks every pointer it hands out and takes back.

use std::alloc::{GlobalAlloc, Layout, System};

/// What glibc's malloc guarantees on 64-bit targets: `System` uses plain malloc up to it.
const MALLOC_ALIGN: usize = 16;

/// Alignments up to this are padded; larger ones (pages) would waste too much and are
/// rare: they go to `posix_memalign` as before.
const MAX_PADDED_ALIGN: usize = 256;

/// The global allocator of the proxy binary (`#[global_allocator]` in main.rs).
pub struct Allocator;

/// Whether a layout is served by padding a malloc block.
fn padded(layout: Layout) -> bool {
    layout.align() > MALLOC_ALIGN && layout.align() <= MAX_PADDED_ALIGN
}

/// The malloc block that holds a padded `layout`: its size plus the alignment, which
/// leaves room for the aligned address and, before it, the block's start. `None` when
/// that overflows (the caller then reports allocation failure).
fn block_layout(layout: Layout) -> Option<Layout> {
    let size = layout.size().checked_add(layout.align())?;
    Layout::from_size_align(size, MALLOC_ALIGN).ok()
}

/// The first `align`-aligned address past `block`'s start. The block is 16-aligned and
/// `align` is a larger power of two, so it lies 16 to `align` bytes in: room for a
/// pointer before it, and `align + size` bytes of block cover it.
fn aligned_start(block: *mut u8, align: usize) -> *mut u8 {
    let offset = align - (block as usize & (align - 1));
    block.wrapping_add(offset)
}

/// Where the block's start is kept for a padded allocation at `ptr`.
fn start_slot(ptr: *mut u8) -> *mut *mut u8 {
    ptr.wrapping_sub(size_of::<*mut u8>()).cast()
}

unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !padded(layout) {
            // SAFETY: the caller's contract is passed on unchanged.
            return unsafe { System.alloc(layout) };
        }
        let Some(block_layout) = block_layout(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `block_layout` has a non-zero size (at least the alignment).
        let block = unsafe { System.alloc(block_layout) };
        if block.is_null() {
            return block;
        }
        let ptr = aligned_start(block, layout.align());
        // SAFETY: `aligned_start` lies at least 16 bytes into the block, so the slot is
        // inside it, and 8-aligned because `ptr` is.
        unsafe { start_slot(ptr).write(block) };
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !padded(layout) {
            // SAFETY: `ptr` came from `System` with this layout (see `alloc`).
            return unsafe { System.dealloc(ptr, layout) };
        }
        // SAFETY: `ptr` came from `alloc` with this layout, which wrote the block's start
        // into its slot and allocated the block with `block_layout`, which succeeded then.
        unsafe {
            let block = start_slot(ptr).read();
            let block_layout = block_layout(layout).unwrap_unchecked();
            System.dealloc(block, block_layout);
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !padded(layout) {
            // SAFETY: the caller's contract is passed on unchanged.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: as for `alloc`; the zeroed bytes are the `layout.size()` bytes at `ptr`.
        unsafe {
            let ptr = self.alloc(layout);
            if !ptr.is_null() {
                ptr.write_bytes(0, layout.size());
            }
            ptr
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !padded(layout) {
            // SAFETY: `ptr` came from `System` with this layout (see `alloc`).
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // A new padded block: glibc's realloc could move the block by an amount that
        // breaks the alignment.
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout;
        // both blocks hold at least the smaller size.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new_ptr = self.alloc(new_layout);
            if !new_ptr.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new_ptr
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment the allocator handles, padded or passed on.
    const ALIGNS: [usize; 10] = [1, 2, 8, 16, 32, 64, 128, 256, 512, 4096];
    const SIZES: [usize; 6] = [1, 7, 16, 100, 384, 5000];

    #[test]
    fn blocks_are_aligned_writable_and_freed() {
        for align in ALIGNS {
            for size in SIZES {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let ptr = Allocator.alloc(layout);
                    assert!(!ptr.is_null(), "{size} bytes aligned to {align}");
                    assert_eq!(ptr as usize % align, 0, "{size} bytes aligned to {align}");
                    // The whole block is ours: writing it must not touch the start slot.
                    ptr.write_bytes(0xa5, size);
                    assert!((0..size).all(|i| *ptr.add(i) == 0xa5));
                    Allocator.dealloc(ptr, layout);
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero() {
        for align in ALIGNS {
            let layout = Layout::from_size_align(1000, align).unwrap();
            unsafe {
                // Dirty a block of that size first, so a reused one would show it.
                let dirty = Allocator.alloc(layout);
                dirty.write_bytes(0xff, 1000);
                Allocator.dealloc(dirty, layout);
                let ptr = Allocator.alloc_zeroed(layout);
                assert_eq!(ptr as usize % align, 0);
                assert!((0..1000).all(|i| *ptr.add(i) == 0), "aligned to {align}");
                Allocator.dealloc(ptr, layout);
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        for align in ALIGNS {
            for (from, to) in [(64, 4000), (4000, 64), (100, 100)] {
                let layout = Layout::from_size_align(from, align).unwrap();
                unsafe {
                    let ptr = Allocator.alloc(layout);
                    for i in 0..from {
                        *ptr.add(i) = i as u8;
                    }
                    let moved = Allocator.realloc(ptr, layout, to);
                    assert_eq!(moved as usize % align, 0, "{from} → {to}, align {align}");
                    assert!((0..from.min(to)).all(|i| *moved.add(i) == i as u8));
                    Allocator.dealloc(moved, Layout::from_size_align(to, align).unwrap());
                }
            }
        }
    }

    #[test]
    fn only_alignments_above_mallocs_are_padded() {
        let layout = |align| Layout::from_size_align(64, align).unwrap();
        assert!(!padded(layout(16)));
        assert!(padded(layout(32)));
        assert!(padded(layout(128)));
        assert!(padded(layout(256)));
        assert!(!padded(layout(4096)));
    }

    #[test]
    fn an_impossible_size_fails_instead_of_wrapping() {
        // The largest size a 128-aligned layout may have: padded, it passes isize::MAX.
        let layout = Layout::from_size_align(isize::MAX as usize - 127, 128).unwrap();
        assert!(block_layout(layout).is_none());
        assert!(unsafe { Allocator.alloc(layout) }.is_null());
    }
}
