//! Errors and warnings that name the file, the line, the column and the
//! field, and say what would be valid.
//!
//! Only the first [`KEPT_PER_SEVERITY`] errors and warnings are kept; the
//! rest are counted per file. A list file of a million bad lines costs
//! twenty messages and a count, in `check`, in the log and in the event.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use super::yaml::Pos;

/// Errors kept with their text, and as many warnings.
pub const KEPT_PER_SEVERITY: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    fn index(self) -> usize {
        match self {
            Severity::Error => 0,
            Severity::Warning => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub pos: Pos,
    /// Dotted path of the field, such as `ingress.deny[2].cidr`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}:{}: {level}: ", self.file.display(), self.pos.line, self.pos.col)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Collects the diagnostics of one load.
#[derive(Debug, Default)]
pub struct Diagnostics {
    /// The kept diagnostics, in the order they were found.
    pub items: Vec<Diagnostic>,
    kept: [usize; 2],
    /// Per file, errors and warnings found but not kept.
    suppressed: BTreeMap<PathBuf, [usize; 2]>,
}

impl Diagnostics {
    pub fn error(&mut self, file: &Path, pos: Pos, field: &str, message: impl Into<String>) {
        self.push(Severity::Error, file, pos, field, message.into());
    }

    pub fn warning(&mut self, file: &Path, pos: Pos, field: &str, message: impl Into<String>) {
        self.push(Severity::Warning, file, pos, field, message.into());
    }

    fn push(&mut self, severity: Severity, file: &Path, pos: Pos, field: &str, message: String) {
        if self.is_full(severity) {
            self.count_more(severity, file, 1);
            return;
        }
        self.kept[severity.index()] += 1;
        self.items.push(Diagnostic { severity, file: file.to_path_buf(), pos, field: field.to_owned(), message });
    }

    /// Whether a further diagnostic of this severity would only be counted
    /// (so a caller can skip formatting it).
    pub fn is_full(&self, severity: Severity) -> bool {
        self.kept[severity.index()] >= KEPT_PER_SEVERITY
    }

    /// Counts `n` diagnostics in `file` that are not kept.
    pub fn count_more(&mut self, severity: Severity, file: &Path, n: usize) {
        if n == 0 {
            return;
        }
        match self.suppressed.get_mut(file) {
            Some(counts) => counts[severity.index()] += n,
            None => {
                let mut counts = [0; 2];
                counts[severity.index()] = n;
                self.suppressed.insert(file.to_path_buf(), counts);
            }
        }
    }

    pub fn has_errors(&self) -> bool {
        self.error_count() > 0
    }

    /// Errors found, kept or not.
    pub fn error_count(&self) -> usize {
        self.kept[0] + self.suppressed_errors()
    }

    /// Warnings found, kept or not.
    pub fn warning_count(&self) -> usize {
        self.kept[1] + self.suppressed_warnings()
    }

    /// Errors found beyond the kept ones.
    pub fn suppressed_errors(&self) -> usize {
        self.suppressed.values().map(|c| c[0]).sum()
    }

    pub fn suppressed_warnings(&self) -> usize {
        self.suppressed.values().map(|c| c[1]).sum()
    }

    /// The kept errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    /// The kept warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Warning)
    }

    /// One line per file with diagnostics not kept, such as
    /// `list.txt: 999980 more errors not shown`.
    pub fn summaries(&self) -> impl Iterator<Item = String> + '_ {
        self.suppressed.iter().flat_map(|(file, counts)| {
            [("error", counts[0]), ("warning", counts[1])].into_iter().filter(|(_, n)| *n > 0).map(move |(what, n)| {
                let plural = if n == 1 { "" } else { "s" };
                format!("{}: {n} more {what}{plural} not shown (the first {KEPT_PER_SEVERITY} of each kind are)", file.display())
            })
        })
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.items {
            writeln!(f, "{d}")?;
        }
        for s in self.summaries() {
            writeln!(f, "{s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_are_kept_and_the_rest_counted_per_file() {
        let mut d = Diagnostics::default();
        for i in 0..1000 {
            let file = if i % 2 == 0 { "a.txt" } else { "b.txt" };
            d.error(Path::new(file), Pos { line: i + 1, col: 1 }, "", "bad");
        }
        d.warning(Path::new("p.yaml"), Pos::default(), "", "odd");
        assert_eq!(d.errors().count(), KEPT_PER_SEVERITY);
        assert_eq!(d.errors().last().unwrap().pos.line, KEPT_PER_SEVERITY);
        assert_eq!((d.error_count(), d.suppressed_errors()), (1000, 980));
        assert_eq!((d.warning_count(), d.suppressed_warnings()), (1, 0));
        let s: Vec<String> = d.summaries().collect();
        assert_eq!(s, ["a.txt: 490 more errors not shown (the first 20 of each kind are)", "b.txt: 490 more errors not shown (the first 20 of each kind are)"]);
        assert!(d.has_errors());
    }
}
