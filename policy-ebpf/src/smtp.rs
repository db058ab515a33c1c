//! The SMTP command filter: every command line of a client's stream, up to
//! `SCAN_BYTES` of each segment, run through the shared scanner
//! (`policy_common::smtp_scan`) from where the flow's entry in
//! `SMTP_FLOWS` says the stream stands (`policy_common::smtp_flow`).
//!
//! The segment's flow and its payload are written to a per-CPU job with one
//! helper call; a global function then does the rest (lookup, scan,
//! update), so the verifier checks it once, on its own, instead of once per
//! path of the pipeline that reaches it. The scan reads a word at a time:
//! inside a line (the common case) a word without CR or LF is skipped
//! whole; other words step byte by byte.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use policy_common::{
    smtp_flow::{self, SmtpFlowKey, SmtpFlowState},
    smtp_scan::{self, SCAN_BYTES},
    DEFAULT_SMTP_FLOWS_CAPACITY,
};

use crate::{frame::Frame, opaque::opaque, parse::Flow, stats};

pub use smtp_flow::CLEAN;

/// Bits of [`ScanJob::flags`].
mod job {
    /// Monitor mode: what is found reaches the host all the same.
    pub const MONITOR: u8 = 1 << 0;
    /// A first fragment: the rest of its payload is out of sight, so it
    /// moves no flow state.
    pub const PARTIAL: u8 = 1 << 1;
}

#[repr(C, align(8))]
pub struct ScanJob {
    key: SmtpFlowKey,
    /// Sequence number of the first payload byte.
    start: u32,
    /// Payload bytes of the segment (`bytes` holds the first `SCAN_BYTES`).
    len: u32,
    blocked: u8,
    flags: u8,
    pad: [u8; 6],
    bytes: [u8; SCAN_BYTES],
}
const _: () = assert!(core::mem::offset_of!(ScanJob, bytes) % 8 == 0);
const _: () = assert!(SCAN_BYTES.is_power_of_two());

/// Key 0: the segment being judged. Writer and reader: this module.
#[map]
static SCAN_BUF: PerCpuArray<ScanJob> = PerCpuArray::with_max_entries(1, 0);

/// Where each client stream stands. Writer and reader: this module; the
/// controller sizes it at load time.
#[map]
static SMTP_FLOWS: LruHashMap<SmtpFlowKey, SmtpFlowState> = LruHashMap::with_max_entries(DEFAULT_SMTP_FLOWS_CAPACITY, 0);

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

/// Judges a segment of a command-filtered flow: [`CLEAN`] or why it is
/// dropped. Called
/// for every segment, payload or not: a branch around the call would have
/// the verifier walk the rest of the pipeline once more per side.
#[inline(always)]
pub fn judge<F: Frame>(frame: &F, flow: &Flow, blocked: u8, monitor: bool) -> u32 {
    let Some(j) = SCAN_BUF.get_ptr_mut(0) else { return CLEAN };
    let mut n = if flow.payload_len as usize > SCAN_BYTES { SCAN_BYTES as u32 } else { flow.payload_len };
    // SAFETY: per-CPU value, no concurrent user; `bytes` holds SCAN_BYTES >= n.
    unsafe {
        (*j).key = SmtpFlowKey { src: flow.src, dst: flow.dst, sport: flow.seg.sport, dport: flow.seg.dport, v6: flow.seg.v6 as u8, pad: [0; 3] };
        (*j).start = flow.stream_seq;
        (*j).len = flow.payload_len;
        (*j).blocked = blocked;
        (*j).flags = (monitor as u8 * job::MONITOR) | (flow.seg.first_fragment as u8 * job::PARTIAL);
        if n != 0 {
            // The same value, but not a known one: the verifier tracks the
            // helper's size argument back to the header lengths it came
            // from and would walk every layout separately.
            n = (opaque(n as u64 - 1) & (SCAN_BYTES as u64 - 1)) as u32 + 1;
            if !frame.copy_to(flow.payload_offset, (*j).bytes.as_mut_ptr(), n) {
                (*j).len = 0;
            }
        }
    }
    smtp_judge_job()
}

/// The job's verdict. A global function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn smtp_judge_job() -> u32 {
    let Some(j) = SCAN_BUF.get_ptr_mut(0) else { return CLEAN };
    // SAFETY: per-CPU value, no concurrent user; written by `judge`.
    let j = unsafe { &*j };
    let len = j.len;
    if len == 0 {
        return CLEAN;
    }
    if len as usize > SCAN_BYTES {
        stats::record_scan_truncated();
    }
    let entry = SMTP_FLOWS.get_ptr_mut(j.key);
    // SAFETY: an LRU value of the map's type; a racing update on another
    // CPU (the same flow, reordered) costs at worst one stale read.
    let stored = entry.map(|e| unsafe { *e });
    if stored.is_none() {
        stats::record_smtp_flow_miss();
    }
    let plan = smtp_flow::plan(stored, j.start, len);
    let window = smtp_flow::window(&plan, len);
    let out = smtp_scan_range(window.0, window.0 + window.1, j.blocked as u32, plan.from as u32) as u16;
    let (monitor, partial) = (j.flags & job::MONITOR != 0, j.flags & job::PARTIAL != 0);
    let (why, next) = smtp_flow::conclude(&plan, j.start, len, window, out, monitor, partial);
    if let Some(next) = next {
        match entry {
            // SAFETY: as above.
            Some(e) => unsafe { *e = next },
            None => {
                let _ = SMTP_FLOWS.insert(j.key, next, 0);
            }
        }
    }
    why
}

/// Scans the job's `bytes[from..to]` from `states`: the states after, or
/// `smtp_scan::BLOCKED` with the states where a command was completed
/// (the scan stops there: carrying a "seen one" flag through the loop
/// tripled the verifier's work). A global function of its own: the loop is
/// verified once, for any arguments.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn smtp_scan_range(from: u32, to: u32, blocked: u32, states: u32) -> u32 {
    let Some(j) = SCAN_BUF.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU value, no concurrent user; 8-aligned `bytes`.
    let words = unsafe { (*j).bytes.as_ptr() } as *const u64;
    let (to, blocked) = (to as usize, blocked as u8);
    let mut states = states as u16;
    // Bytes up to the first word boundary, one by one.
    let mut at = from as usize;
    for _ in 0..8 {
        if at >= to || at.is_multiple_of(8) {
            break;
        }
        // SAFETY: masked into the buffer.
        let b = unsafe { *(words as *const u8).add(at & (SCAN_BYTES - 1)) };
        let out = smtp_scan::step(blocked, b, states);
        if out & smtp_scan::BLOCKED != 0 {
            return out as u32;
        }
        states = out;
        at += 1;
    }
    let first = at / 8;
    for k in 0..WORDS {
        let w = first + k;
        let start = w * 8;
        // `to` is at most SCAN_BYTES, so `w` stays below WORDS.
        if start >= to {
            break;
        }
        // SAFETY: w < WORDS, within the buffer; the mask shows the
        // verifier (a bounds check LLVM would fold away).
        let word = unsafe { *words.add(w & (WORDS - 1)) };
        if smtp_scan::only_in_line(states) && start + 8 <= to && !has_byte(word, b'\n') && !has_byte(word, b'\r') {
            continue;
        }
        for i in 0..8 {
            if start + i >= to {
                break;
            }
            let out = smtp_scan::step(blocked, (word >> (8 * i)) as u8, states);
            if out & smtp_scan::BLOCKED != 0 {
                return out as u32;
            }
            states = out;
        }
    }
    states as u32
}
