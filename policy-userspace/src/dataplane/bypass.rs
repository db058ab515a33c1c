//! The fail-open switch (`BYPASS`): one mapped word, 0 while the policy
//! enforces, else the Unix time it was turned off. Its one writer is
//! `smtpguard bypass`; the datapath reads it only for packets it would
//! drop, the controller to announce a change. Pinned, so it outlasts the
//! controller until turned back on.

use std::{os::fd::BorrowedFd, sync::atomic::Ordering};

use super::shared_words::SharedWords;

pub struct BypassSwitch(SharedWords);

impl BypassSwitch {
    /// Maps the `BYPASS` array behind `fd` (it must be mmapable).
    pub fn open(fd: BorrowedFd<'_>) -> std::io::Result<Self> {
        Ok(Self(SharedWords::new(fd, 1)?))
    }

    /// Since when (Unix seconds) enforcement is bypassed; `None`: enforcing.
    pub fn since(&self) -> Option<u64> {
        Some(self.0.word(0).load(Ordering::Acquire)).filter(|s| *s != 0)
    }

    /// `smtpguard bypass` only: one store, in force for the next packet.
    pub fn set(&self, since: Option<u64>) {
        self.0.word(0).store(since.map_or(0, |s| s.max(1)), Ordering::Release);
    }
}
