//! What a package installs beside the binary, generated from the clap
//! definitions so it never drifts from `--help`: man pages (clap_mangen;
//! `smtpguard.1` and one `smtpguard-<subcommand>.1` per visible
//! subcommand) and shell completions (clap_complete; bash, zsh, fish).
//! `cargo xtask package` runs the hidden `smtpguard generate-assets DIR`.
//!
//! Layout under `DIR`: `man/*.1` (plain roff; `cargo xtask package`
//! compresses them) and `completions/{smtpguard.bash,_smtpguard,smtpguard.fish}`.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;
use clap_mangen::{
    roff::{bold, italic, roman, Roff},
    Man,
};

/// The name the binary is installed and completed under.
pub const BIN_NAME: &str = "smtpguard";

/// The shells whose completions are generated (each distribution has a
/// vendor directory for these three).
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The files a host installation has, for the main page's FILES section:
/// (path, what it is).
const FILES: &[(&str, &str)] = &[
    ("/etc/smtpguard/smtpguard.toml", "Settings of smtpguard run (the same names as its flags); the systemd unit runs smtpguard run --config with this file."),
    ("/etc/smtpguard/policy.yaml", "The policy: validate it with smtpguard check; a running controller reloads it when it or a list it names changes."),
    ("/etc/smtpguard/lists/", "List files the policy names (paths in a policy are relative to it)."),
    ("/sys/fs/bpf/smtpguard/", "The pinned programs, links and maps. Enforcement lives here: it survives a stop or crash of the controller and a package upgrade; smtpguard detach removes it."),
    ("/run/smtpguard/controller.pid", "The running controller's pid."),
    ("/var/log/smtpguard/events.jsonl", "Events (bans, suspects, reloads) as JSON lines."),
    ("/lib/systemd/system/smtpguard.service", "The systemd unit: the user smtpguard with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only."),
    ("/usr/share/doc/smtpguard/", "README, operations guide, policy language, example policies and lists."),
];

/// Writes the man pages and completions of `cmd` (the binary's
/// `Cli::command()`) under `dir`, creating it; returns the files written.
pub fn generate(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let visible = visible_only(&cmd);
    // Pages for the subcommands, not for `help`. Building propagates the
    // names, so subcommands are displayed as smtpguard-<name>.
    let mut cmd = visible.clone().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();

    let man_dir = dir.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let main_page = man_dir.join(format!("{BIN_NAME}.1"));
    write_file(&main_page, |w| render_main_page(&cmd, w))?;
    written.push(main_page);
    for sub in visible_subcommands(&cmd) {
        let man = Man::new(sub.clone()).manual("smtpguard manual");
        let path = man_dir.join(man.get_filename());
        write_file(&path, |w| man.render(w))?;
        written.push(path);
    }

    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("creating {}", completions.display()))?;
    for shell in SHELLS {
        let path = completions.join(clap_complete::Generator::file_name(&shell, BIN_NAME));
        write_file(&path, |w| {
            clap_complete::generate(shell, &mut visible.clone(), BIN_NAME, w);
            Ok(())
        })?;
        written.push(path);
    }
    Ok(written)
}

/// `cmd` (not yet built) without its hidden subcommands, which
/// clap_complete would offer. clap cannot remove a subcommand: this is a
/// new command with the same about, arguments and visible subcommands.
fn visible_only(cmd: &Command) -> Command {
    let mut out = Command::new(BIN_NAME)
        .bin_name(BIN_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set())
        .args(cmd.get_arguments().cloned())
        .subcommands(visible_subcommands(cmd).cloned());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        out = out.long_about(about.clone());
    }
    out
}

/// Subcommands a user sees in `--help` (not the hidden `generate-assets`).
fn visible_subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// One of clap_mangen's `Man::render_*_section`.
type RenderSection = fn(&Man, &mut dyn Write) -> std::io::Result<()>;

/// The main page: what clap_mangen renders from the definitions, then
/// FILES and SEE ALSO, which a `--help` has no place for.
fn render_main_page(cmd: &Command, w: &mut dyn Write) -> std::io::Result<()> {
    let man = Man::new(cmd.clone()).manual("smtpguard manual");
    let sections: [RenderSection; 6] = [
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
        Man::render_options_section,
        Man::render_subcommands_section,
    ];
    let mut parts = Vec::new();
    for render in sections {
        let mut part = Vec::new();
        render(&man, &mut part)?;
        parts.push(part);
    }

    let mut roff = Roff::new();
    roff.control("SH", ["FILES"]);
    for (path, what) in FILES {
        roff.control("TP", []);
        roff.text([bold(*path)]);
        roff.text([roman(*what)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    // No hyphenation inside page names.
    roff.control("nh", []);
    let mut refs: Vec<(String, &str)> = visible_subcommands(cmd).map(|s| (format!("{BIN_NAME}-{}", s.get_name()), "1")).collect();
    refs.extend([("systemctl".to_owned(), "1"), ("bpftool".to_owned(), "8")]);
    let mut line = Vec::new();
    for (i, (name, section)) in refs.iter().enumerate() {
        let sep = if i + 1 < refs.len() { ", " } else { "." };
        line.push(bold(name.as_str()));
        line.push(roman(format!("({section}){sep}")));
    }
    roff.text(line);
    roff.control("hy", []);
    roff.control("PP", []);
    roff.text([roman("The operations guide and the policy language: "), italic("/usr/share/doc/smtpguard/"), roman(".")]);
    parts.push(roff.render().into_bytes());
    let mut version = Vec::new();
    man.render_version_section(&mut version)?;
    parts.push(version);

    // Each part opens with roff's two-line apostrophe preamble: keep the first.
    let preamble = Roff::new().render().into_bytes();
    for (i, part) in parts.iter().enumerate() {
        let body = if i == 0 { part.as_slice() } else { part.strip_prefix(preamble.as_slice()).unwrap_or(part) };
        w.write_all(body)?;
    }
    Ok(())
}

fn write_file(path: &Path, render: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    render(&mut w).and_then(|()| w.flush()).with_context(|| format!("writing {}", path.display()))
}
