//! Fixtures for smtpguard's privileged tests and benchmarks.
pub mod packet;
