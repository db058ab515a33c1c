//! Mappings of the `BPF_F_MMAPABLE` arrays the datapath writes too
//! (`RUNTIME`, `SOURCES`): userspace sees their 8-byte words in place and
//! reads and writes them with atomics, word by word, as the datapath does.
//! A whole value is never written back, so no writer can undo another's
//! update of a neighbouring word with a stale copy.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::AtomicU64,
};

/// A shared, writable mapping of a map's values, as 8-byte words.
pub struct SharedWords {
    ptr: NonNull<AtomicU64>,
    words: usize,
    len: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU64`s, which any
// number of threads may share; it lives until the value is dropped.
unsafe impl Send for SharedWords {}
// SAFETY: as above.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps `words` 8-byte words of the mmapable array behind `fd` (its
    /// values are 8-byte aligned and laid out back to back).
    pub fn new(fd: BorrowedFd<'_>, words: usize) -> std::io::Result<Self> {
        let len = (words * 8).next_multiple_of(4096).max(4096);
        // SAFETY: a fresh shared mapping; the kernel checks that the fd is
        // an mmapable array at least this long.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU64>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, words, len })
    }

    /// Word `index`. Panics past the end.
    #[inline]
    pub fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.words, "word {index} of {}", self.words);
        // SAFETY: in bounds, page aligned base, and the kernel's writes to
        // these words are single 8-byte stores or compare-and-swaps.
        unsafe { &*self.ptr.as_ptr().add(index) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
