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
pub use parse::{load_file, load_str, LoadOptions};
