//! BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH, which aya 0.14 does not
//! wrap: one syscall per chunk instead of one per entry, the difference
//! between seconds and a fraction of one when a policy holds a million
//! prefixes. Keys and values are passed as packed byte arrays.

use std::os::fd::RawFd;

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
