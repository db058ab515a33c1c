//! The policy language: YAML in, validated [`Policy`] out, compiled into
//! exactly the map entries the datapath loads.

pub mod analyze;
pub mod compile;
mod countries;
pub mod diag;
pub mod geo;
pub mod input;
pub mod lists;
pub mod model;
pub mod parse;
pub mod schema;
pub mod time;
pub mod yaml;

pub use compile::{compile, compile_with, Compiled};
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use model::Policy;
pub use parse::{load_file, load_str, ReadOptions};

use std::path::Path;

/// Loads, validates, analyzes and compiles a policy: everything `check`
/// does, warnings included.
pub fn load_and_compile(path: &Path, options: &ReadOptions) -> (Option<(Policy, Compiled)>, Diagnostics) {
    load(path, options, true)
}

/// What a reload needs: the policy validated and compiled, errors only
/// (the controller logs no warnings on reload, so the analysis is skipped).
pub fn load_for_reload(path: &Path, options: &ReadOptions) -> (Option<(Policy, Compiled)>, Diagnostics) {
    load(path, options, false)
}

fn load(path: &Path, options: &ReadOptions, with_warnings: bool) -> (Option<(Policy, Compiled)>, Diagnostics) {
    let (policy, mut diags) = load_file(path, options);
    let Some(policy) = policy else { return (None, diags) };
    let today = options.today.unwrap_or_else(time::today);
    let compiled = if with_warnings {
        // The analysis only adds warnings: it runs beside the compiler.
        std::thread::scope(|s| {
            let compiling = s.spawn(|| compile(&policy, today));
            analyze::warnings(&policy, &mut diags);
            compiling.join().expect("the compiler does not panic")
        })
    } else {
        compile(&policy, today)
    };
    match compiled {
        Ok(c) => (Some((policy, c)), diags),
        Err(e) => {
            diags.error(path, Default::default(), "", e.to_string());
            (None, diags)
        }
    }
}
