//! The controller's log: `tracing` to stderr, one line per message with
//! its level. `SMTPGUARD_LOG` sets the filter (default `info`; `debug`
//! for more, or per module: `smtpguard::controller=debug`).

use tracing_subscriber::EnvFilter;

/// Installs the subscriber; later calls do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_env("SMTPGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(false).try_init();
}
