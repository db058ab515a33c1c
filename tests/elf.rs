//! The embedded object holds exactly the programs and maps policy-common
//! names, with the expected program types.

use aya_obj::{Object, ProgramSection};
use std::collections::BTreeSet;

#[test]
fn embedded_object_has_exactly_the_named_programs_and_maps() {
    let obj = Object::parse(smtpguard::EBPF_OBJECT).expect("parsing the embedded eBPF object");

    let maps: BTreeSet<&str> = obj.maps.keys().map(String::as_str).collect();
    // `.rodata` holds constants the compiler emitted (frozen, read-only).
    let expected_maps: BTreeSet<&str> = policy_common::ALL_MAPS.into_iter().chain([".rodata"]).collect();
    assert_eq!(maps, expected_maps, "maps in the object");

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
}
