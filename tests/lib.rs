//! Fixtures for smtpguard's privileged tests and benchmarks: crafted
//! frames, a seeded datapath, and network namespaces that clean up.
pub mod etcd;
pub mod fixtures;
pub mod fleetlab;
pub mod hvlab;
pub mod peers;
pub mod livegen;
pub mod netns;
pub mod nftlab;
pub mod packet;
pub mod pairlab;
pub mod postfix;
pub mod rawtcp;
pub mod randomized;
pub mod rng;
pub mod scenario;
pub mod testrun;

/// Privileged tests are `#[ignore]`d, so a plain `cargo test` reports them
/// as ignored instead of passing them; `cargo xtask test` runs them with
/// `--include-ignored` as root. Run without root, one fails here saying so.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "this test loads BPF programs and creates network namespaces: run it as root (cargo xtask test)");
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
