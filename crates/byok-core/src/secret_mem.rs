//! Memory for plaintext keys and key schedules: pages of their own, marked
//! `MADV_DONTDUMP` so a core dump of a crashed backend or broker does not
//! carry them, and zeroed when a value is dropped.
//!
//! [`SecretBox<T>`] is a `Box` whose storage comes from such pages. Values are
//! carved out of 64 KiB regions by size class (a power of two from 64 bytes to
//! 4 KiB; larger values get a region of their own); freed chunks are reused,
//! regions are never returned (key caches are bounded, so the pool is too).
//! Allocation happens on cache misses only, never per row.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

const REGION: usize = 64 * 1024;
const MIN_CLASS: usize = 64;
const MAX_CLASS: usize = 4096;
const CLASSES: usize = 7; // 64, 128, ..., 4096

struct Pool {
    free: [Vec<usize>; CLASSES],
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
});

/// Pages of `len` bytes (a multiple of the page size) excluded from core dumps.
fn map_region(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping has no preconditions; the result is
    // checked before use.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // Best effort: a kernel without MADV_DONTDUMP still gets zeroed memory.
        libc::madvise(ptr, len, libc::MADV_DONTDUMP);
        NonNull::new(ptr.cast())
    }
}

fn class_of(layout: Layout) -> Option<usize> {
    let size = layout
        .size()
        .max(layout.align())
        .max(MIN_CLASS)
        .next_power_of_two();
    (size <= MAX_CLASS)
        .then(|| size.trailing_zeros() as usize - MIN_CLASS.trailing_zeros() as usize)
}

fn allocate(layout: Layout) -> NonNull<u8> {
    let Some(class) = class_of(layout) else {
        let len = layout.size().next_multiple_of(page_size());
        return map_region(len).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
    };
    let size = MIN_CLASS << class;
    let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if pool.free[class].is_empty() {
        let region = map_region(REGION).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let base = region.as_ptr() as usize;
        pool.free[class].extend((0..REGION / size).rev().map(|i| base + i * size));
    }
    let address = pool.free[class].pop().expect("a region was just added");
    NonNull::new(address as *mut u8).expect("mapped addresses are not null")
}

fn release(ptr: NonNull<u8>, layout: Layout) {
    // SAFETY: `ptr` is a live chunk of at least `layout.size()` bytes that this
    // module handed out; volatile writes keep the wipe from being optimized away.
    unsafe {
        for i in 0..layout.size() {
            std::ptr::write_volatile(ptr.as_ptr().add(i), 0);
        }
    }
    match class_of(layout) {
        Some(class) => POOL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .free[class]
            .push(ptr.as_ptr() as usize),
        None => {
            let len = layout.size().next_multiple_of(page_size());
            // SAFETY: the region was mapped by `map_region` with this length.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

/// A value of `T` in memory excluded from core dumps, wiped when dropped.
pub struct SecretBox<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: SecretBox owns its T exactly like Box<T>.
unsafe impl<T: Send> Send for SecretBox<T> {}
// SAFETY: as Box<T>: shared access only hands out &T.
unsafe impl<T: Sync> Sync for SecretBox<T> {}

impl<T> SecretBox<T> {
    pub fn new(value: T) -> Self {
        let layout = Layout::new::<T>();
        let ptr = allocate(layout).cast::<T>();
        // SAFETY: fresh, suitably sized and aligned (chunks are aligned to
        // their power-of-two size, regions to pages) and unaliased.
        unsafe { ptr.as_ptr().write(value) };
        SecretBox {
            ptr,
            _owns: PhantomData,
        }
    }
}

impl<T> Deref for SecretBox<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: the pointer is valid and owned for the box's life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for SecretBox<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for SecretBox<T> {
    fn drop(&mut self) {
        // SAFETY: the value is dropped once, then its bytes wiped and the chunk freed.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        release(self.ptr.cast(), Layout::new::<T>());
    }
}

impl<T: Clone> Clone for SecretBox<T> {
    fn clone(&self) -> Self {
        SecretBox::new((**self).clone())
    }
}

/// Whether the memory at `address` is excluded from core dumps (reads
/// `/proc/self/smaps`; for tests and diagnostics).
pub fn is_excluded_from_core_dumps(address: usize) -> Option<bool> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            inside = (start..end).contains(&address);
            continue;
        }
        if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return Some(flags.split_whitespace().any(|f| f == "dd"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_live_in_pages_excluded_from_core_dumps() {
        let small = SecretBox::new([7u8; 32]);
        let large = SecretBox::new([9u8; 10_000]);
        assert_eq!(small[0], 7);
        assert_eq!(large[9_999], 9);
        for address in [small.ptr.as_ptr() as usize, large.ptr.as_ptr() as usize] {
            assert_eq!(is_excluded_from_core_dumps(address), Some(true));
        }
        let on_heap = Box::new([1u8; 32]);
        assert_eq!(
            is_excluded_from_core_dumps(on_heap.as_ptr() as usize),
            Some(false)
        );
    }

    #[test]
    fn freed_chunks_are_wiped_and_reused() {
        // (a size class no other test uses: tests run in parallel)
        let first = SecretBox::new([0xAAu8; 700]);
        let address = first.ptr.as_ptr() as usize;
        drop(first);
        // SAFETY: the chunk stays mapped (regions are never unmapped); reading it
        // shows the wipe.
        let wiped = unsafe { std::slice::from_raw_parts(address as *const u8, 700) };
        assert!(wiped.iter().all(|b| *b == 0));
        let second = SecretBox::new([0x55u8; 700]);
        assert_eq!(second.ptr.as_ptr() as usize, address);
    }

    #[test]
    fn alignment_and_drop_of_the_inner_value() {
        #[repr(align(256))]
        struct Aligned(u8);
        let b = SecretBox::new(Aligned(3));
        assert_eq!(b.ptr.as_ptr() as usize % 256, 0);
        assert_eq!(b.0, 3);
        let rc = std::rc::Rc::new(());
        let held = SecretBox::new(rc.clone());
        assert_eq!(std::rc::Rc::strong_count(&rc), 2);
        drop(held);
        assert_eq!(std::rc::Rc::strong_count(&rc), 1);
    }
}
