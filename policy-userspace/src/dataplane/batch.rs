//! BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH, which aya 0.14 does not
//! wrap: one syscall per chunk instead of one per entry, the difference
//! between seconds and a fraction of one when a policy holds a million
//! prefixes. Keys and values are passed as packed byte arrays.

use std::os::fd::RawFd;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per syscall: bounded so the kernel's copy of a chunk stays small.
const CHUNK: usize = 65_536;

/// Writes `count` keys (each `keys.len() / count` bytes) with their values.
pub fn update(fd: RawFd, keys: &[u8], values: &[u8], count: usize) -> std::io::Result<()> {
    run(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values), count)
}

/// Deletes `count` keys; every one must exist.
pub fn delete(fd: RawFd, keys: &[u8], count: usize) -> std::io::Result<()> {
    run(BPF_MAP_DELETE_BATCH, fd, keys, None, count)
}

fn run(cmd: libc::c_long, fd: RawFd, keys: &[u8], values: Option<&[u8]>, count: usize) -> std::io::Result<()> {
    if count == 0 {
        return Ok(());
    }
    let key_size = keys.len() / count;
    let value_size = values.map_or(0, |v| v.len() / count);
    let mut done = 0;
    while done < count {
        let n = CHUNK.min(count - done);
        // bpf_attr.batch: in_batch, out_batch, keys, values, count | map_fd << 32, elem_flags, flags.
        let mut attr = [0u64; 8];
        attr[2] = keys[done * key_size..].as_ptr() as u64;
        attr[3] = values.map_or(0, |v| v[done * value_size..].as_ptr() as u64);
        attr[4] = n as u64 | (fd as u64) << 32;
        // SAFETY: the buffers hold `n` keys and values from `done` on, and
        // the attr is laid out as the kernel's batch struct.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        done += n;
    }
    Ok(())
}

/// The bytes of a plain-data value, for the batch buffers.
pub fn bytes_of<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: Pod types have no padding and any bit pattern is valid.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Every cell of a per-CPU array map, summed over `cpus` (the kernel's
/// possible CPUs), in index order.
pub fn per_cpu_sums<T: aya::Pod + Default + std::ops::Add<Output = T>>(fd: RawFd, entries: u32, cpus: usize) -> std::io::Result<Vec<T>> {
    // The kernel lays each CPU's value out rounded up to 8 bytes; the
    // types read here are already multiples of 8.
    const { assert!(std::mem::size_of::<T>().is_multiple_of(8)) };
    let mut out: Vec<T> = Vec::with_capacity(entries as usize);
    for_each_chunk(fd, entries, cpus, |chunk: &[T]| out.extend(chunk.chunks(cpus).map(|per_cpu| per_cpu.iter().fold(T::default(), |s, v| s + *v))))?;
    Ok(out)
}

/// Calls `f` with the values of an array map in index order, a chunk at a
/// time (each entry `per_entry` consecutive `T`s), so a large table is
/// read without holding all of it.
pub fn for_each_chunk<T: aya::Pod>(fd: RawFd, entries: u32, per_entry: usize, mut f: impl FnMut(&[T])) -> std::io::Result<()> {
    const LOOKUP_CHUNK: usize = 4096;
    let mut keys = vec![0u32; LOOKUP_CHUNK];
    let mut values: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(LOOKUP_CHUNK * per_entry);
    let mut read = 0usize;
    // The batch token: for arrays, the next index.
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut attr = [0u64; 8];
        attr[0] = if first { 0 } else { &token as *const u32 as u64 };
        let mut next = 0u32;
        attr[1] = &mut next as *mut u32 as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = LOOKUP_CHUNK as u64 | (fd as u64) << 32;
        // SAFETY: the buffers hold LOOKUP_CHUNK keys and values; the kernel
        // writes at most that many and reports the number in attr[4].
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr[4] & 0xffff_ffff) as usize;
        // SAFETY: the kernel filled the first `n` entries.
        let filled = unsafe { std::slice::from_raw_parts(values.as_ptr() as *const T, n * per_entry) };
        f(filled);
        read += n;
        match err {
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
            None if read >= entries as usize => return Ok(()),
            None => {}
        }
        token = next;
        first = false;
    }
}
