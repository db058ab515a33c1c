//! Flow tracing's maps, found from the pinned programs of a running
//! datapath: the `TRACE` selector (mapped, each word stored atomically)
//! and the aya-log ring `AYA_LOGS`, read with `EbpfLogger::init_from_id`.
//! The kernel side is `policy-ebpf/src/trace.rs`; the command,
//! `commands/trace.rs`.

use std::{os::fd::AsFd, sync::atomic::Ordering};

use aya::{
    maps::{MapData, MapInfo},
    programs::ProgramInfo,
};
use aya_log::EbpfLogger;
use policy_common::trace::{trace_word, TraceSelector};

use super::{shared_words::SharedWords, Hook};
use crate::pins::Pins;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("nothing is attached: no smtpguard state pinned at {0} (start `smtpguard run` first)")]
    NotAttached(String),
    #[error("no program is pinned in {0} (`smtpguard run` pins them when it starts)")]
    NoPrograms(String),
    #[error("reading the pinned program {path}: {message}")]
    Program { path: String, message: String },
    #[error(
        "program {id} has no {map} map: it was loaded by an smtpguard build without flow tracing; \
         restart `smtpguard run` with this build (enforcement carries on across the restart)"
    )]
    MissingMap { id: u32, map: &'static str },
    #[error("map {map} of program {id}: {message}")]
    Map { id: u32, map: &'static str, message: String },
}

type Result<T, E = TraceError> = std::result::Result<T, E>;

/// The ids of the loaded hook programs pinned in `pins` (`prog_<name>`),
/// with their names.
pub fn pinned_program_ids(pins: &Pins) -> Result<Vec<(&'static str, u32)>> {
    if !pins.exists() {
        return Err(TraceError::NotAttached(pins.dir.display().to_string()));
    }
    let mut out = Vec::new();
    for hook in Hook::ALL {
        let name = hook.program_name();
        let path = pins.dir.join(format!("prog_{name}"));
        if !path.exists() {
            continue;
        }
        let info = ProgramInfo::from_pin(&path).map_err(|e| TraceError::Program { path: path.display().to_string(), message: e.to_string() })?;
        out.push((name, info.id()));
    }
    if out.is_empty() {
        return Err(TraceError::NoPrograms(pins.dir.display().to_string()));
    }
    Ok(out)
}

/// The id of the map called `map` that program `id` uses.
fn map_id_of(id: u32, map: &'static str) -> Result<u32> {
    let err = |e: &dyn std::fmt::Display| TraceError::Map { id, map, message: e.to_string() };
    let info = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .ok_or_else(|| err(&"the program is no longer loaded"))?;
    let ids = info.map_ids().map_err(|e| err(&e))?.ok_or_else(|| err(&"the kernel does not list a program's maps"))?;
    ids.into_iter()
        .find(|m| MapInfo::from_id(*m).is_ok_and(|i| i.name_as_str() == Some(map)))
        .ok_or(TraceError::MissingMap { id, map })
}

/// The programs among `ids` whose `map` differs from every earlier one's,
/// with that map's id: normally the first program alone (one object's
/// programs share their maps).
fn distinct_by_map(ids: &[u32], map: &'static str) -> Result<Vec<(u32, u32)>> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &id in ids {
        let m = map_id_of(id, map)?;
        if !out.iter().any(|(_, seen)| *seen == m) {
            out.push((id, m));
        }
    }
    Ok(out)
}

/// The `TRACE` selector of the programs, mapped: its words are stored
/// atomically, `until_ns` last when turning on and first when turning
/// off. Dropping it turns tracing off.
pub struct TraceSwitch {
    maps: Vec<SharedWords>,
}

impl TraceSwitch {
    /// The selector of each distinct `TRACE` map the programs use.
    pub fn open(program_ids: &[u32]) -> Result<Self> {
        let mut maps = Vec::new();
        for (id, map_id) in distinct_by_map(program_ids, policy_common::TRACE)? {
            let err = |e: &dyn std::fmt::Display| TraceError::Map { id, map: policy_common::TRACE, message: e.to_string() };
            let data = MapData::from_id(map_id).map_err(|e| err(&e))?;
            maps.push(SharedWords::new(data.fd().as_fd(), trace_word::COUNT).map_err(|e| err(&format!("mapping it: {e}")))?);
        }
        Ok(Self { maps })
    }

    /// Traces what `selector` selects (until its `until_ns`).
    pub fn set(&self, selector: &TraceSelector) {
        let words = selector.words();
        for m in &self.maps {
            m.word(trace_word::UNTIL).store(0, Ordering::Release);
            for w in [trace_word::ADDR_LO, trace_word::ADDR_HI, trace_word::MATCH] {
                m.word(w).store(words[w], Ordering::Release);
            }
            m.word(trace_word::UNTIL).store(words[trace_word::UNTIL], Ordering::Release);
        }
    }

    pub fn off(&self) {
        for m in &self.maps {
            m.word(trace_word::UNTIL).store(0, Ordering::Release);
        }
    }

    /// The selector as the first map holds it.
    pub fn read(&self) -> TraceSelector {
        let m = &self.maps[0];
        TraceSelector::from_words(std::array::from_fn(|w| m.word(w).load(Ordering::Acquire)))
    }
}

impl Drop for TraceSwitch {
    fn drop(&mut self) {
        self.off();
    }
}

/// An aya-log reader of each distinct log ring (`AYA_LOGS`) the programs
/// write, through `EbpfLogger::init_from_id`; records go to `logger`.
pub fn attach_loggers<T: log::Log + Clone>(program_ids: &[u32], logger: T) -> Result<Vec<EbpfLogger<T>>> {
    distinct_by_map(program_ids, policy_common::AYA_LOGS)?
        .into_iter()
        .map(|(id, _)| {
            EbpfLogger::init_from_id_with_logger(id, logger.clone())
                .map_err(|e| TraceError::Map { id, map: policy_common::AYA_LOGS, message: e.to_string() })
        })
        .collect()
}

