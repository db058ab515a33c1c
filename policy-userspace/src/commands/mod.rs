//! What the `smtpguard` subcommands do; `main.rs` only parses arguments.
//! [`policy`]: the commands about a policy file; [`state`]: the commands
//! about the pinned state of a running (or detached-but-pinned) datapath;
//! [`trace`]: following one address's packets through the datapath;
//! [`recovery`]: `bypass` and `rollback`, the levers for a policy that
//! blocks legitimate mail;
//! [`assets`]: the man pages and completions a package installs.

pub mod assets;
pub mod policy;
pub mod recovery;
pub mod state;
pub mod trace;

use std::process::ExitCode;

pub use self::{
    policy::{check, explain, schema, ExplainArgs},
    state::{ban, bans, detach, reload, status, tenants, unban},
};

/// Prints an error chain and turns it into the exit code.
pub fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtpguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
