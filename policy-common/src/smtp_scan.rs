//! The SMTP command scanner: finds blocked commands (VRFY, EXPN) at the
//! start of any line of a client's byte stream, the way servers read them.
//!
//! A line starts at the stream's start and after every CR or LF (a bare CR
//! counts: some servers end lines there). Spaces, tabs, VT and FF before
//! the verb are skipped (Postfix accepts ` VRFY root`). The verb matches
//! case-insensitively and must be followed by a byte that is not a letter
//! or digit, or by the end of the data: `VRFY`, `vrfy root`, `Expn\t...`
//! match; `VRFYX` and `XVRFY` do not.
//!
//! The scanner is a set of states (an NFA run by subset), so where the
//! datapath does not know where a segment sits in its stream (it was seen
//! before, or its flow was picked up mid-way) it starts from several
//! states at once and finds a command any of them would. Each step is two
//! table lookups and no branch: the same tables drive the kernel and the
//! userspace model, so `explain` and the datapath cannot disagree.

use crate::smtp_command;

/// Payload bytes of one segment the datapath scans; the rest of a longer
/// segment is counted, not scanned. Command traffic fits (a pipelined
/// EHLO..RCPT batch is a few hundred bytes); message bodies do not need
/// it. 2048 (a whole MTU-1500 segment) cost 740,000 verified instructions.
pub const SCAN_BYTES: usize = 512;

/// Scanner states, as bit numbers of a state set.
mod state {
    /// Inside a line that is not a blocked command.
    pub const MID: u16 = 0;
    /// At a line start, possibly after spaces or tabs.
    pub const START: u16 = 1;
    /// `V`, `VR`, `VRF` matched.
    pub const V1: u16 = 2;
    pub const V2: u16 = 3;
    pub const V3: u16 = 4;
    /// `E`, `EX`, `EXP` matched.
    pub const E1: u16 = 5;
    pub const E2: u16 = 6;
    pub const E3: u16 = 7;
    /// A whole verb matched; the next byte decides.
    pub const HIT: u16 = 8;
    pub const COUNT: usize = 9;
}

/// A state set: bit `s` for state `s`.
pub type States = u16;
/// The stream's start, or a segment known to start a line.
pub const AT_LINE_START: States = 1 << state::START;
/// Inside a line.
pub const IN_LINE: States = 1 << state::MID;
/// Where a segment's place in its stream is not known exactly: it may
/// start a line or continue one, but no verb is taken to be half-typed.
pub const LINE_OR_START: States = AT_LINE_START | IN_LINE;
/// Every state: any context at all.
pub const ANY: States = (1 << state::COUNT) - 1;
/// Set in a step's result when a blocked command was completed.
pub const BLOCKED: u16 = 1 << 15;
/// The bits of a result that are states.
pub const STATES_MASK: u16 = ANY;

/// Byte classes the transitions depend on.
mod class {
    pub const LINE_BREAK: u8 = 0;
    pub const SPACE: u8 = 1;
    pub const V: u8 = 2;
    pub const R: u8 = 3;
    pub const F: u8 = 4;
    pub const Y: u8 = 5;
    pub const E: u8 = 6;
    pub const X: u8 = 7;
    pub const P: u8 = 8;
    pub const N: u8 = 9;
    /// Any other letter or digit: continues a word.
    pub const WORD: u8 = 10;
    /// Anything else: ends a verb.
    pub const OTHER: u8 = 11;
    pub const COUNT: usize = 12;
}

const fn class_of(b: u8) -> u8 {
    match b {
        b'\r' | b'\n' => class::LINE_BREAK,
        b' ' | b'\t' | 0x0b | 0x0c => class::SPACE,
        b'V' | b'v' => class::V,
        b'R' | b'r' => class::R,
        b'F' | b'f' => class::F,
        b'Y' | b'y' => class::Y,
        b'E' | b'e' => class::E,
        b'X' | b'x' => class::X,
        b'P' | b'p' => class::P,
        b'N' | b'n' => class::N,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => class::WORD,
        _ => class::OTHER,
    }
}

/// Class of every byte value.
pub static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = class_of(b as u8);
        b += 1;
    }
    t
};

/// One state's step: the next state, and whether a blocked command ended.
const fn step_one(s: u16, c: u8, blocked: u8) -> (u16, bool) {
    use state::*;
    if s == HIT {
        return match c {
            class::LINE_BREAK => (START, true),
            class::SPACE | class::OTHER => (MID, true),
            _ => (MID, false),
        };
    }
    if c == class::LINE_BREAK {
        return (START, false);
    }
    let next = match (s, c) {
        (START, class::SPACE) => START,
        (START, class::V) if blocked & smtp_command::VRFY != 0 => V1,
        (START, class::E) if blocked & smtp_command::EXPN != 0 => E1,
        (V1, class::R) => V2,
        (V2, class::F) => V3,
        (V3, class::Y) => HIT,
        (E1, class::X) => E2,
        (E2, class::P) => E3,
        (E3, class::N) => HIT,
        _ => MID,
    };
    (next, false)
}

/// Sets of [`state::COUNT`] states.
const SETS: usize = 1 << state::COUNT;
/// Blocked-command masks: `smtp_command` bits 1..=3 (0 blocks nothing).
const MASKS: usize = 4;

/// `TRANSITIONS[(mask * class::COUNT + class) * SETS + set]`: the set after
/// one byte of `class`, with [`BLOCKED`] when a command ended.
pub static TRANSITIONS: [u16; MASKS * class::COUNT * SETS] = {
    let mut t = [0u16; MASKS * class::COUNT * SETS];
    let mut mask = 0;
    while mask < MASKS {
        let mut c = 0;
        while c < class::COUNT {
            let mut set = 0;
            while set < SETS {
                let mut out = 0u16;
                let mut s = 0;
                while s < state::COUNT {
                    if set & (1 << s) != 0 {
                        let (next, hit) = step_one(s as u16, c as u8, mask as u8);
                        out |= 1 << next;
                        if hit {
                            out |= BLOCKED;
                        }
                    }
                    s += 1;
                }
                t[(mask * class::COUNT + c) * SETS + set] = out;
                set += 1;
            }
            c += 1;
        }
        mask += 1;
    }
    t
};

/// Index into [`TRANSITIONS`] of (blocked mask, byte, state set).
#[inline(always)]
pub fn transition_index(blocked: u8, byte: u8, states: States) -> usize {
    let class = CLASS[byte as usize] as usize;
    ((blocked as usize % MASKS) * class::COUNT + class) * SETS + (states & STATES_MASK) as usize
}

/// One byte's step from `states`: the new set, [`BLOCKED`] set when a
/// command ended with this byte.
#[inline(always)]
pub fn step(blocked: u8, byte: u8, states: States) -> u16 {
    // Never out of range (classes are below class::COUNT); `get` keeps a
    // panic path, which BPF cannot have, out of the datapath.
    TRANSITIONS.get(transition_index(blocked, byte, states)).copied().unwrap_or(0)
}

/// Does the data end where a blocked verb may be complete (`VRFY` as the
/// segment's last bytes)? Judged blocked: the next byte is not in sight.
#[inline(always)]
pub fn verb_at_end(states: States) -> bool {
    states & (1 << state::HIT) != 0
}

/// Only [`IN_LINE`]: the one set a run of bytes without a line break
/// leaves unchanged, which the datapath skips eight bytes at a time.
#[inline(always)]
pub fn only_in_line(states: States) -> bool {
    states == IN_LINE
}

/// The outcome of scanning some bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The state set after the bytes.
    pub states: States,
    /// A blocked command is in the bytes, or one may end with them.
    pub blocked: bool,
}

/// Scans `bytes` from `states`: what the datapath does for a segment's
/// payload (userspace and tests; the kernel runs the same steps).
pub fn scan(blocked: u8, states: States, bytes: &[u8]) -> Scan {
    let mut set = states;
    let mut hit = false;
    for &b in bytes {
        let out = step(blocked, b, set);
        hit |= out & BLOCKED != 0;
        set = out & STATES_MASK;
    }
    Scan { states: set, blocked: hit || verb_at_end(set) }
}

/// Scans `bytes` from `states` up to the first blocked command: the states
/// after, or [`BLOCKED`] with the states where a command was completed.
/// The datapath's loop, step for step (it stops there too).
pub fn scan_to_block(blocked: u8, states: States, bytes: &[u8]) -> u16 {
    let mut set = states;
    for &b in bytes {
        let out = step(blocked, b, set);
        if out & BLOCKED != 0 {
            return out;
        }
        set = out;
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: u8 = smtp_command::VRFY | smtp_command::EXPN;

    fn blocked(s: &[u8]) -> bool {
        scan(BOTH, AT_LINE_START, s).blocked
    }

    #[test]
    fn finds_commands_on_any_line_after_spaces_in_any_case() {
        for s in [
            &b"VRFY root\r\n"[..],
            b"vrfy root",
            b"VRFY",
            b"VRFY\r\n",
            b"EHLO x\r\nVRFY root\r\n",
            b"EHLO x\nexpn list\n",
            b" VRFY root",
            b"\t \x0bVrFy root",
            b"NOOP\rVRFY x",
            b"EXPN:all",
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n  eXpN staff\r\n",
        ] {
            assert!(blocked(s), "{:?}", s);
        }
    }

    #[test]
    fn leaves_other_lines_alone() {
        for s in [
            &b"EHLO x\r\n"[..],
            b"VRFYX root",
            b"XVRFY root",
            b"DATA\r\nsay vrfy to me\r\n",
            b"V RFY root",
            b"VRF",
            b"EXP",
            b"",
            b"RCPT TO:<vrfy@example.org>\r\n",
        ] {
            assert!(!blocked(s), "{:?}", s);
        }
    }

    #[test]
    fn honours_the_blocked_mask() {
        assert!(!scan(smtp_command::EXPN, AT_LINE_START, b"VRFY root").blocked);
        assert!(scan(smtp_command::EXPN, AT_LINE_START, b"EXPN root").blocked);
        assert!(!scan(smtp_command::VRFY, AT_LINE_START, b"EXPN root").blocked);
        assert!(!scan(0, AT_LINE_START, b"VRFY root").blocked);
    }

    #[test]
    fn a_command_split_anywhere_is_found_from_the_carried_states() {
        let whole = b"EHLO x\r\n VRFY root\r\n";
        for cut in 0..=whole.len() {
            let first = scan(BOTH, AT_LINE_START, &whole[..cut]);
            let second = scan(BOTH, first.states, &whole[cut..]);
            assert!(first.blocked || second.blocked, "cut at {cut}");
        }
    }

    #[test]
    fn any_context_finds_the_tail_of_a_verb() {
        assert!(scan(BOTH, ANY, b"FY root").blocked);
        assert!(scan(BOTH, ANY, b"N x").blocked);
        assert!(!scan(BOTH, LINE_OR_START, b"FY root").blocked);
        assert!(scan(BOTH, LINE_OR_START, b"VRFY root").blocked);
        assert!(scan(BOTH, LINE_OR_START, b"hello\nVRFY root").blocked);
        assert!(!scan(BOTH, LINE_OR_START, b"hello VRFY root").blocked);
    }

    #[test]
    fn a_run_without_line_breaks_keeps_in_line_unchanged() {
        for b in 0..=255u8 {
            let out = step(BOTH, b, IN_LINE);
            if b != b'\r' && b != b'\n' {
                assert_eq!(out, IN_LINE, "byte {b}");
            }
        }
    }
}
