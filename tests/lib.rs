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

/// The `smtpguard` binary of the profile the tests were built in (they run
/// from target/<profile>/deps; the binary sits one level up).
pub fn smtpguard_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(|d| d.parent()).expect("target/<profile>").join("smtpguard")
}
