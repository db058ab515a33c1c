//! smtpguard's controller library.

pub mod acl4;
mod batch;
pub mod commands;
pub mod controller;
pub mod dataplane;
pub mod event_log;
pub mod events;
pub mod http;
pub mod metrics;
pub mod model;
pub mod observe;
pub mod ops;
pub mod pins;
pub mod policy;
pub mod runtime;
mod shared;
pub mod sources;
pub mod trace;

/// The eBPF object built by `build.rs`, aligned for the ELF parser.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf.o"));
