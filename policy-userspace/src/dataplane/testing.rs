//! What tests and benchmarks need beyond what the controller does: running
//! a program on a crafted frame (BPF_PROG_TEST_RUN), attaching without
//! pins, and writing single map entries to seed a state. Behind the
//! `testing` feature: the controller never does any of it.

use std::{net::IpAddr, time::Duration};

use aya::programs::{TestRun, TestRunOptions, XdpMode};
use ipnet::IpNet;
use policy_common::{
    smtp_flow::{SmtpFlowKey, SmtpFlowState},
    source::SourceSet,
    AclEntry, PolicyConfig, Runtime,
};

use super::{programs::HookProgram, Dataplane, DataplaneError, Hook, Result};

/// An ACL prefix in one generation and scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclPrefix {
    pub generation: u8,
    pub scope: u8,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Dataplane {
    /// Runs a hook's program `repeat` times on `frame`: its return value
    /// and the kernel's average duration.
    pub fn test_run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() };
        let result = self.run(hook, opts)?;
        Ok((result.return_value, result.duration))
    }

    /// Runs a hook's program once on `frame`: its return value and the
    /// frame as the program left it (a reset it rewrote the frame into).
    pub fn test_run_out(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        // Room for the frame and the headroom a program may have grown into.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..TestRunOptions::new() };
        let result = self.run(hook, opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    fn run(&mut self, hook: Hook, opts: TestRunOptions<'_>) -> Result<aya::programs::TestRunResult> {
        let name = hook.program_name();
        match self.programs.get(hook)? {
            HookProgram::Xdp(p) => p.test_run(opts),
            HookProgram::Tc(p) => p.test_run(opts),
        }
        .map_err(|source| DataplaneError::Program { name, source })
    }

    /// The loaded program of a hook, for callers that drive
    /// BPF_PROG_TEST_RUN themselves (benchmarks timing many repeats).
    pub fn program_fd(&mut self, hook: Hook) -> Result<std::os::fd::OwnedFd> {
        let name = hook.program_name();
        let program = self.programs.get(hook)?;
        let fd = program.fd().map_err(|source| DataplaneError::Program { name, source })?;
        std::os::fd::AsFd::as_fd(fd).try_clone_to_owned().map_err(|e| DataplaneError::Pin { path: name.into(), message: e.to_string() })
    }

    /// Attaches a hook's program without pins, for this value's lifetime.
    pub fn attach_unpinned(&mut self, hook: Hook, iface: &str, mode: XdpMode) -> Result<()> {
        self.programs.attach(hook, iface, mode)
    }

    /// Writes (`Some`) or removes (`None`) single ACL entries.
    pub fn edit_acls(&mut self, edits: &[(AclPrefix, Option<AclEntry>)]) -> Result<()> {
        let edits: Vec<_> = edits
            .iter()
            .map(|(p, e)| ((p.generation, p.scope, IpNet::new(p.addr, p.prefix_len).expect("prefix length fits the family")), *e))
            .collect();
        self.generations.edit(&mut self.maps, &edits)
    }

    /// Writes every runtime word the controller owns (not the network-ban flag).
    pub fn set_runtime(&mut self, runtime: Runtime) {
        self.maps.runtime_words().write_controller_words(&runtime);
    }

    /// Writes one generation's settings.
    pub fn set_policy(&mut self, generation: u32, policy: &PolicyConfig) -> Result<()> {
        self.maps.set_policy(generation, policy)
    }

    pub fn policy(&self, generation: u32) -> Result<PolicyConfig> {
        self.maps.policy(generation)
    }

    /// Sets in the source table.
    pub fn source_sets(&self) -> u32 {
        self.maps.source_table().sets()
    }

    /// One set of the source table, read word by word from the mapping.
    pub fn source_set(&self, index: u32) -> SourceSet {
        let table = self.maps.source_table();
        table.read_set(index % table.sets())
    }

    /// Overwrites one set whole (beside traffic this would undo the
    /// datapath's updates, see the source table's protocol).
    pub fn set_source_set(&self, index: u32, set: &SourceSet) {
        let table = self.maps.source_table();
        table.write_set(index % table.sets(), set);
    }

    /// Where the command filter has a client stream.
    pub fn smtp_flow(&mut self, key: &SmtpFlowKey) -> Result<Option<SmtpFlowState>> {
        match self.maps.smtp_flows().get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::Map { name: policy_common::SMTP_FLOWS, source }),
        }
    }

    /// Puts a client stream where a test wants it.
    pub fn set_smtp_flow(&mut self, key: &SmtpFlowKey, state: &SmtpFlowState) -> Result<()> {
        self.maps.smtp_flows().insert(key, state, 0).map_err(|source| DataplaneError::Map { name: policy_common::SMTP_FLOWS, source })
    }

    /// Forgets every client stream.
    pub fn clear_smtp_flows(&mut self) -> Result<()> {
        let flows = self.maps.smtp_flows();
        let keys: Vec<SmtpFlowKey> = flows.keys().filter_map(|k| k.ok()).collect();
        for key in keys {
            let _ = flows.remove(&key);
        }
        Ok(())
    }

    /// Every `STATS` cell, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<policy_common::Counter>> {
        self.maps.stats()
    }

    /// Every `GEO_DROPS` cell, summed over CPUs.
    pub fn geo_drops(&self) -> Result<Vec<u64>> {
        self.maps.geo_drops()
    }

    /// Kernel memory charged to a map, in bytes.
    pub fn map_memlock(&self, name: &'static str) -> Result<u64> {
        self.maps.memlock(name)
    }
}
