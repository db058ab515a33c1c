//! The embedded object holds exactly the programs and maps policy-common
//! names, with the expected program types.

use aya_obj::{Object, ProgramSection};
use std::collections::BTreeSet;

#[test]
fn embedded_object_has_exactly_the_named_programs_and_maps() {
    let obj = Object::parse(smtpguard::EBPF_OBJECT).expect("parsing the embedded eBPF object");

    // Sections the compiler emits for constants (`.rodata*`) become frozen,
    // read-only maps; the datapath has no mutable globals (.data, .bss).
    let (sections, maps): (BTreeSet<&str>, BTreeSet<&str>) =
        obj.maps.keys().map(String::as_str).partition(|n| n.starts_with('.'));
    let expected_maps: BTreeSet<&str> = policy_common::ALL_MAPS.into_iter().collect();
    assert_eq!(maps, expected_maps, "maps in the object");
    for s in &sections {
        assert!(s.starts_with(".rodata"), "unexpected data section {s}: the datapath keeps state in named maps only");
    }

    let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
    let expected_programs: BTreeSet<&str> = policy_common::ALL_PROGRAMS.into_iter().collect();
    assert_eq!(programs, expected_programs, "programs in the object");

    for (name, program) in &obj.programs {
        let is_xdp = matches!(program.section, ProgramSection::Xdp { .. });
        let is_tc = matches!(program.section, ProgramSection::SchedClassifier);
        match name.as_str() {
            policy_common::PROG_XDP_INGRESS => assert!(is_xdp, "{name} is {:?}", program.section),
            _ => assert!(is_tc, "{name} is {:?}", program.section),
        }
    }
    for name in policy_common::ALL_MAPS {
        assert!(name.len() <= 15, "map name {name} is longer than the kernel keeps");
    }
    // aya-log-ebpf's ring: its size is that crate's, the metrics' figure ours.
    let logs = &obj.maps[policy_common::AYA_LOGS];
    assert_eq!(logs.max_entries(), policy_common::AYA_LOGS_BYTES, "AYA_LOGS bytes");
}

/// The verifier walks each program within its 1,000,000-instruction budget
/// with room to spare. The datapath is sensitive to this (see `opaque`):
/// a change that multiplies verifier states fails here with a number,
/// before it fails to load somewhere else.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn programs_verify_well_within_the_verifier_budget() {
    smtpguard_tests::require_root();
    const BUDGET: u32 = 1_000_000;
    let mut dp = smtpguard::dataplane::Dataplane::load(Default::default(), None).expect("loading the datapath");
    for (name, verified) in dp.programs().verified_instructions().expect("program info") {
        eprintln!("{name}: {verified} instructions verified");
        assert!(verified < BUDGET / 2, "{name} needed {verified} of the verifier's {BUDGET}");
    }
}
