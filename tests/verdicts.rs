use aya::{programs::Program, EbpfLoader};
#[test]
fn loads() {
    for name in policy_common::ALL_PROGRAMS {
        let mut ebpf = EbpfLoader::new().load(smtpguard::EBPF_OBJECT).unwrap();
        let p = ebpf.program_mut(name).unwrap();
        let r = match p { Program::Xdp(p) => p.load(), Program::SchedClassifier(p) => p.load(), _ => panic!() };
        match r {
            Ok(()) => { let info = match ebpf.program(name).unwrap() { Program::Xdp(p) => p.info().unwrap(), Program::SchedClassifier(p) => p.info().unwrap(), _ => panic!() }; eprintln!("{name}: ok verified {:?} xlated {:?}", info.verified_instruction_count(), info.size_translated()) },
            Err(e) => { let s = format!("{e:?}"); let i = s.find("processed").unwrap_or(0); eprintln!("{name}: FAIL {}", &s[i..(i+120).min(s.len())]); }
        }
    }
}
