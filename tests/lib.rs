//! Fixtures for smtpguard's privileged tests and benchmarks: crafted
//! frames, a seeded datapath, and network namespaces that clean up.
pub mod fixtures;
pub mod hvlab;
pub mod lab;
pub mod livegen;
pub mod netns;
pub mod packet;
pub mod pairlab;
pub mod rng;
pub mod scenario;
pub mod testrun;

/// Skips a privileged test with a printed reason when not root; under
/// `cargo xtask test` (SMTPGUARD_PRIVILEGED=1) a missing privilege fails.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("SMTPGUARD_PRIVILEGED").is_none(),
        "cargo xtask test runs privileged tests, but this process is not root"
    );
    eprintln!("SKIPPED: needs root (BPF and network namespaces); run `cargo xtask test`");
    false
}

/// The `smtpguard` binary of the profile the caller was built in: beside
/// it (a benchmark in target/<profile>) or one level up (a test in
/// target/<profile>/deps).
pub fn smtpguard_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    let dir = exe.parent().expect("target/<profile>");
    let beside = dir.join("smtpguard");
    if beside.is_file() {
        return beside;
    }
    dir.parent().expect("target/<profile>").join("smtpguard")
}
