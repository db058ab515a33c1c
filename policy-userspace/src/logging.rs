//! The controller's log: `tracing` to stderr, one line per message with
//! its level, plain text (ANSI colours only on a terminal) or one JSON
//! object per line. The filter: `--log-level`, else `RUST_LOG`, else
//! `SMTPGUARD_LOG`, else `info` (per module too: `smtpguard::controller=debug`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain text, for a terminal or the journal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Clone, Debug, Default)]
pub struct LogSettings {
    pub level: Option<String>,
    pub format: LogFormat,
}

/// Installs the subscriber; later calls do nothing. A filter that does
/// not parse falls back to `info` and says so.
pub fn init(settings: &LogSettings) {
    let wanted = settings.level.clone().or_else(|| std::env::var("RUST_LOG").ok()).or_else(|| std::env::var("SMTPGUARD_LOG").ok());
    let (filter, bad) = match wanted.as_deref().map(EnvFilter::try_new) {
        None => (EnvFilter::new("info"), None),
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (EnvFilter::new("info"), Some(e)),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match settings.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!("the log filter {:?} does not parse ({e}); logging at info", wanted.unwrap_or_default());
    }
}
