//! smtpguard's controller library. Where a policy goes from YAML to map
//! entries and a packet from a hook to a counter and an event is told in
//! docs/architecture.md.

pub mod clock;
pub mod commands;
pub mod controller;
pub mod dataplane;
pub mod event_log;
pub mod events;
pub mod files;
pub mod fleet;
pub mod http;
pub mod interfaces;
pub mod known_good;
pub mod logging;
pub mod metrics;
pub mod nft;
pub mod pins;
pub mod policy;
pub mod privileges;
pub mod reference;
pub mod report;
pub mod rule_hits;
pub mod settings;
pub mod shadow;

/// The eBPF object built by `build.rs`, aligned for the ELF parser.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf.o"));
