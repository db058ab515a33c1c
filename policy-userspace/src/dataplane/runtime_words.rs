//! The datapath's `RUNTIME` settings, mapped: each 8-byte word has one
//! writer (the table at [`policy_common::Runtime`]) and is stored alone,
//! with an atomic store. The controller writes its words through
//! [`super::generations`]; `smtpguard ban`/`unban` of networks
//! write the network-ban flag through [`super::bans`], and nothing else does.

use std::{os::fd::BorrowedFd, sync::atomic::Ordering};

use policy_common::{runtime_word, Runtime, PORT_FILTER_WORDS};

use super::shared_words::SharedWords;

pub struct RuntimeWords(SharedWords);

impl RuntimeWords {
    /// Maps the `RUNTIME` array behind `fd` (it must be mmapable).
    pub fn open(fd: BorrowedFd<'_>) -> std::io::Result<Self> {
        Ok(Self(SharedWords::new(fd, runtime_word::COUNT)?))
    }

    /// Every word, each read atomically (the value as a whole is not a
    /// snapshot: words written meanwhile may be older or newer).
    pub fn read(&self) -> Runtime {
        Runtime::from_words(std::array::from_fn(|i| self.0.word(i).load(Ordering::Acquire)))
    }

    /// Stores one word whose only writer is the caller.
    fn store(&self, word: usize, value: u64) {
        self.0.word(word).store(value, Ordering::Release);
    }

    /// A word of `rt`, as it lies in memory.
    fn word_of(rt: &Runtime, word: usize) -> u64 {
        rt.words()[word]
    }

    /// Writes every word the controller owns (all but the network-ban
    /// flag): a new datapath's first settings, or a test's.
    pub fn write_controller_words(&self, rt: &Runtime) {
        for word in (0..runtime_word::COUNT).filter(|w| *w != runtime_word::CIDR_BANS) {
            self.store(word, Self::word_of(rt, word));
        }
    }

    /// Controller: flips packets to `generation` (`source_sets` shares the
    /// word and keeps its value: the controller is the only writer of both).
    pub fn set_active(&self, generation: u32) {
        let mut rt = self.read();
        rt.active = generation;
        self.store(runtime_word::GENERATION, Self::word_of(&rt, runtime_word::GENERATION));
    }

    /// Controller: the event sampling settings.
    pub fn set_events(&self, drop_sample_one_in: u32, events_per_second: u32) {
        let rt = Runtime { drop_sample_one_in, events_per_second, ..Runtime::default() };
        self.store(runtime_word::EVENTS, Self::word_of(&rt, runtime_word::EVENTS));
    }

    /// Controller: the guarded-port filter, word by word (each word's bits
    /// change from one superset of the guarded ports to another).
    pub fn set_port_filter(&self, filter: [u64; PORT_FILTER_WORDS]) {
        for (i, bits) in filter.into_iter().enumerate() {
            self.store(runtime_word::PORT_FILTER + i, bits);
        }
    }

    /// Controller: the shadow generation (0: none), beside the hooks'
    /// directions in their word (the controller writes both).
    pub fn set_shadow(&self, generation: u32) {
        let mut rt = self.read();
        rt.shadow = generation as u8;
        self.store(runtime_word::HOOKS, Self::word_of(&rt, runtime_word::HOOKS));
    }

    /// Network-ban commands only (under their lock): whether the ban tries
    /// hold a ban.
    pub fn set_cidr_bans(&self, any: bool) {
        self.store(runtime_word::CIDR_BANS, u64::from(any));
    }
}
