//! The fleet: hosts that share bans and policy through etcd (v3).
//! `docs/fleet.md` has the key layout, the trust rules and what happens
//! at each kind of fault.

mod agent;
pub mod bundle;
pub mod commands;
pub mod hosts;
pub mod metrics;
pub mod record;
pub mod settings;

pub use agent::{start, FleetLink, PolicyOffer};
