//! The SMTP command filter: every command line of a segment's payload, up
//! to `SCAN_BYTES`, run through the shared scanner (`policy_common::smtp_scan`).
//!
//! The payload is copied into a per-CPU buffer with one helper call, then
//! read a word at a time: inside a line (the common case) a word without
//! CR or LF is skipped whole; other words step byte by byte.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use policy_common::smtp_scan::{self, SCAN_BYTES};

use crate::{frame::Frame, stats};

#[repr(C, align(8))]
pub struct ScanBuf([u8; SCAN_BYTES]);

/// Key 0: the payload being scanned. Writer and reader: this module.
#[map]
static SCAN_BUF: PerCpuArray<ScanBuf> = PerCpuArray::with_max_entries(1, 0);

const WORDS: usize = SCAN_BYTES / 8;
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Does `word` hold a byte equal to `b`? (No false negatives; false
/// positives only make a word take the byte-wise path.)
#[inline(always)]
fn has_byte(word: u64, b: u8) -> bool {
    let x = word ^ (ONES * b as u64);
    x.wrapping_sub(ONES) & !x & HIGHS != 0
}

/// Is a blocked command on any line of the `len` payload bytes at
/// `offset`? Bytes past `SCAN_BYTES` are counted, not scanned.
#[inline(always)]
pub fn blocked_command<F: Frame>(frame: &F, offset: usize, len: u32, blocked: u8) -> bool {
    let mut n = len;
    if n as usize > SCAN_BYTES {
        stats::record_scan_truncated();
        n = SCAN_BYTES as u32;
    }
    let Some(buf) = SCAN_BUF.get_ptr_mut(0) else { return false };
    // SAFETY: the buffer holds SCAN_BYTES >= n bytes.
    n != 0 && unsafe { frame.copy_to(offset, buf.cast(), n) } && smtp_scan_copied(n, blocked as u32) != 0
}

/// Scans the first `n` bytes of `SCAN_BUF`. A global function: the
/// verifier checks it once, on its own, instead of once per path of the
/// pipeline that reaches it (the word loop alone is thousands of steps).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn smtp_scan_copied(n: u32, blocked: u32) -> u32 {
    let Some(buf) = SCAN_BUF.get_ptr_mut(0) else { return 0 };
    let n = n as usize;
    let blocked = blocked as u8;
    let words = buf as *const u64;
    let mut states = smtp_scan::AT_LINE_START;
    for w in 0..WORDS {
        let start = w * 8;
        if start >= n {
            break;
        }
        // SAFETY: w < WORDS, within the buffer; the buffer is 8-aligned.
        let word = unsafe { *words.add(w) };
        if smtp_scan::only_in_line(states) && start + 8 <= n && !has_byte(word, b'\n') && !has_byte(word, b'\r') {
            continue;
        }
        for j in 0..8 {
            if start + j >= n {
                break;
            }
            let out = smtp_scan::step(blocked, (word >> (8 * j)) as u8, states);
            if out & smtp_scan::BLOCKED != 0 {
                return 1;
            }
            states = out & smtp_scan::STATES_MASK;
        }
    }
    smtp_scan::verb_at_end(states) as u32
}
