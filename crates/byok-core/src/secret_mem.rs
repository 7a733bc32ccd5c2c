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

/// The pool, even if a thread panicked while holding it: its free lists are
/// changed only by single `push`/`pop`/`extend` calls, which leave them valid
/// (at worst a region's chunks are not all listed, and are never handed out),
/// so the poison carries no information worth failing an allocation over.
fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Pages of `len` bytes (a multiple of the page size) excluded from core dumps.
fn map_region(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: with a null hint and no MAP_FIXED, mmap picks fresh addresses and
    // cannot replace any existing mapping, so no memory Rust knows about
    // changes; MAP_ANONYMOUS takes no file (fd -1, offset 0). Failure is
    // MAP_FAILED, checked before the pointer is used.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `ptr..ptr + len` is exactly the mapping just created, which no
    // one else knows of yet; MADV_DONTDUMP changes only whether core dumps
    // include it, not its contents or protection.
    if unsafe { libc::madvise(ptr, len, libc::MADV_DONTDUMP) } != 0 {
        // Deliberately not an error (best effort): a kernel without
        // MADV_DONTDUMP (before Linux 3.4) still gets memory that is wiped on
        // drop, and refusing to hold keys at all would be worse;
        // `is_excluded_from_core_dumps` tells whether it took effect.
    }
    NonNull::new(ptr.cast())
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
    let mut pool = pool();
    if pool.free[class].is_empty() {
        let region = map_region(REGION).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let base = region.as_ptr() as usize;
        pool.free[class].extend((0..REGION / size).rev().map(|i| base + i * size));
    }
    let address = pool.free[class].pop().expect("a region was just added");
    NonNull::new(address as *mut u8).expect("mapped addresses are not null")
}

/// Wipes the chunk at `ptr` and gives it back (to its size class's free list,
/// or to the kernel for a region of its own).
///
/// # Safety
///
/// `ptr` must have been returned by [`allocate`] for this same `layout`, not
/// released since, and nothing may use the chunk afterwards (no reference or
/// pointer to it may outlive this call).
unsafe fn release(ptr: NonNull<u8>, layout: Layout) {
    for i in 0..layout.size() {
        // SAFETY: `allocate(layout)` handed out at least `layout.size()` bytes
        // at `ptr`, still mapped and owned by the caller (see `# Safety`), so
        // every offset below `layout.size()` is in bounds and unaliased. A
        // volatile write, so the wipe of a dead value is not optimized away.
        unsafe { std::ptr::write_volatile(ptr.as_ptr().add(i), 0) };
    }
    match class_of(layout) {
        Some(class) => pool().free[class].push(ptr.as_ptr() as usize),
        None => {
            let len = layout.size().next_multiple_of(page_size());
            // SAFETY: for a layout without a size class, `allocate` mapped a
            // region of its own of exactly this length (same computation, and
            // the page size is fixed for the process) starting at `ptr`; the
            // caller guarantees nothing refers to it any more, so unmapping it
            // invalidates no live reference.
            if unsafe { libc::munmap(ptr.as_ptr().cast(), len) } != 0 {
                // Deliberately ignored: munmap of a whole mapping we made fails
                // only on invalid arguments, which the above rules out, and the
                // bytes are already wiped, so a failure would leak address
                // space, never a key (while a panic here, inside `Drop`, could
                // abort the process).
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes a plain integer, touches no memory of ours and is
    // thread-safe; _SC_PAGESIZE is a valid name (the result is still checked).
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

/// A value of `T` in memory excluded from core dumps, wiped when dropped.
pub struct SecretBox<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: a SecretBox is the unique owner of its T, like Box<T>: its chunk
// was popped from the pool under the pool's lock (or mapped for it alone) and
// goes back only in its own `drop`, so no other value points at it. Sending
// the box sends the T, hence `T: Send`; the pool itself is behind a Mutex, so
// dropping on another thread is sound.
unsafe impl<T: Send> Send for SecretBox<T> {}
// SAFETY: through `&SecretBox<T>` only `&T` is reachable (`Deref`); `&mut T`
// needs `&mut SecretBox<T>`. So sharing the box shares exactly a `&T`, which
// is sound when `T: Sync`, as for Box<T>.
unsafe impl<T: Sync> Sync for SecretBox<T> {}

impl<T> SecretBox<T> {
    pub fn new(value: T) -> Self {
        // Chunks are aligned to their size class (at most MAX_CLASS) and
        // regions to pages (at least 4 KiB); a stricter alignment would not be
        // met by the large-value path.
        const { assert!(std::mem::align_of::<T>() <= MAX_CLASS) };
        let layout = Layout::new::<T>();
        let ptr = allocate(layout).cast::<T>();
        // SAFETY: `allocate(layout)` returned a chunk of at least
        // `size_of::<T>()` bytes, aligned for T (a class chunk sits at a multiple
        // of its power-of-two size, which `class_of` makes at least
        // `align_of::<T>()`, in a page-aligned region; a large value's region
        // is page-aligned and T's alignment is at most MAX_CLASS, asserted
        // above), and handed to no one else; `write` does not read or drop the
        // uninitialized bytes it replaces.
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
        // SAFETY: `ptr` holds the T written in `new`, aligned and initialized,
        // and stays valid until `drop`; the box owns it alone (see the `Send`
        // impl), and `&self` only permits shared access while this borrow lives.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for SecretBox<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, `ptr` holds a live, initialized T owned by
        // this box alone; `&mut self` guarantees no other borrow of it exists
        // while the returned `&mut T` lives.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for SecretBox<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds the initialized T written in `new`, and `drop`
        // runs once, so the T is dropped exactly once; nothing reads it after.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        // SAFETY: `ptr` came from `allocate(Layout::new::<T>())` in `new`, is
        // released only here, and the box (the only pointer to it) is going away.
        unsafe { release(self.ptr.cast(), Layout::new::<T>()) };
    }
}

impl<T: Clone> Clone for SecretBox<T> {
    fn clone(&self) -> Self {
        SecretBox::new((**self).clone())
    }
}

/// Whether the memory at `address` is excluded from core dumps (reads
/// `/proc/self/smaps`; for tests and diagnostics). `None` when that cannot be
/// told: no `/proc` (another OS, a sandbox), or `address` not mapped.
pub fn is_excluded_from_core_dumps(address: usize) -> Option<bool> {
    // The read error is dropped on purpose: every cause means "cannot tell",
    // which is what `None` says (its only callers are the tests below).
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
        // SAFETY: a 700-byte value lives in a size-class region, and those are
        // never unmapped, so the freed chunk is still readable memory of this
        // process; no other test uses the 1 KiB class, so nothing writes it
        // while we read (the pool hands it out again only below).
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
