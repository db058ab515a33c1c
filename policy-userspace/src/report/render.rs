//! The report as Markdown, for a ticket.

use std::{collections::BTreeMap, fmt::Write};

use super::summary::{duration_text, short_sha, Listed, Ranked, Report, SourceRow};

/// The Markdown form of `r`.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_markdown(&mut out, r);
    out
}

fn write_markdown(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(o, "# smtpguard incident report\n")?;
    let files: Vec<String> = r.files.iter().map(|f| code(f)).collect();
    write!(o, "Generated {} from {}", r.generated, files.join(", "))?;
    match &r.since {
        Some(s) => writeln!(o, ", events since {s}.\n")?,
        None => writeln!(o, ".\n")?,
    }

    let p = &r.period;
    writeln!(o, "## Period\n")?;
    writeln!(o, "| first event | last event | events | lines read | skipped |")?;
    writeln!(o, "|---|---|--:|--:|--:|")?;
    let skipped = p.skipped.unparsable + p.skipped.too_long + p.skipped.undated + p.skipped.before_since;
    writeln!(o, "| {} | {} | {} | {} | {} |\n", or_dash(&p.first), or_dash(&p.last), p.events, p.lines_read, skipped)?;
    if skipped > 0 || p.blank_lines > 0 {
        writeln!(
            o,
            "Skipped: {} unparsable, {} too long, {} without a time, {} before --since; {} blank.\n",
            p.skipped.unparsable, p.skipped.too_long, p.skipped.undated, p.skipped.before_since, p.blank_lines
        )?;
    }
    if !r.events.is_empty() {
        writeln!(o, "Events by kind: {}.\n", counts_text(&r.events))?;
    }
    if !r.unknown_kinds.is_empty() {
        writeln!(o, "**Kinds this smtpguard does not know** (listed with the notable events): {}.\n", counts_text(&r.unknown_kinds))?;
    }

    writeln!(o, "## Timeline\n")?;
    if r.timeline.buckets.is_empty() {
        writeln!(o, "No events.\n")?;
    } else {
        writeln!(o, "Buckets of {}.\n", duration_text(r.timeline.bucket_s.max(0) as u64))?;
        writeln!(o, "| start | events | drops | bans | rate trips | reloads | suspects |")?;
        writeln!(o, "|---|--:|--:|--:|--:|--:|--:|")?;
        for b in &r.timeline.buckets {
            writeln!(o, "| {} | {} | {} | {} | {} | {} | {} |", b.start, b.events, b.drops, b.bans, b.rate_trips, b.reloads, b.suspects)?;
        }
        writeln!(o)?;
    }

    writeln!(o, "## Notable events\n")?;
    writeln!(o, "Escalated bans, manual bans, tenant suspects, policy reloads, rollbacks, scheduled switches to enforce, missing uplinks, bypass switches (enforcement off or on), unknown kinds.\n")?;
    list(o, &r.notable, "| time | event | what |\n|---|---|---|", |n| format!("| {} | {} | {} |", cell(&n.time), cell(&n.event), cell(&n.summary)))?;

    writeln!(o, "## Top sources\n")?;
    writeln!(o, "Outside sources by sampled drops ({} dropped, {} would drop in monitor mode; {} samples had another verdict).\n", r.drops.dropped, r.drops.would_drop, r.drops.other_verdicts)?;
    sources(o, &r.sources, true)?;

    let t = &r.bans.totals;
    writeln!(o, "## Bans\n")?;
    writeln!(o, "{} added ({} escalated, strikes > 1), {} expired, {} manual; {} rate-limit trips.\n", t.added, t.escalations, t.expired, t.manual, t.rate_trips)?;
    if !r.bans.by_source.rows.is_empty() {
        writeln!(o, "| source | ban events | added | max strikes | escalations | longest | expired | manual | first | last |")?;
        writeln!(o, "|---|--:|--:|--:|--:|--:|--:|--:|---|---|")?;
        for b in &r.bans.by_source.rows {
            writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&b.source),
                count_text(b.events, b.overcount),
                b.added,
                b.max_strikes,
                b.escalations,
                duration_text(b.longest_s),
                b.expired,
                b.manual,
                or_dash(&b.first),
                or_dash(&b.last)
            )?;
        }
        writeln!(o)?;
        exactness(o, &r.bans.by_source)?;
    }
    if r.bans.manual.shown.is_empty() {
        writeln!(o, "No manual bans.\n")?;
    } else {
        writeln!(o, "### Manual bans\n")?;
        list(o, &r.bans.manual, "| time | source | for | reason |\n|---|---|---|---|", |m| {
            format!("| {} | {} | {} | {} |", cell(&m.time), cell(&m.source), duration_text(m.duration_s), cell(m.reason.as_deref().unwrap_or("-")))
        })?;
    }

    writeln!(o, "## Countries\n")?;
    writeln!(o, "Sampled drops by the peer's country ({} without one).\n", r.drops.no_country)?;
    if !r.countries.rows.is_empty() {
        writeln!(o, "| country | drops |\n|---|--:|")?;
        for c in &r.countries.rows {
            writeln!(o, "| {} | {} |", cell(&c.country), count_text(c.drops, c.overcount))?;
        }
        writeln!(o)?;
        exactness(o, &r.countries)?;
    }

    writeln!(o, "## Tenants\n")?;
    writeln!(o, "### Blocked outbound attempts\n")?;
    writeln!(o, "Tenant sources by sampled egress drops.\n")?;
    sources(o, &r.tenants.drops, false)?;
    writeln!(o, "### Suspects\n")?;
    list(o, &r.tenants.suspects, "| time | interface | source | blocked | window | quarantine |\n|---|---|---|--:|---|---|", |s| {
        let quarantine = if s.quarantine_s > 0 { duration_text(s.quarantine_s) } else { "none (reported only)".into() };
        format!("| {} | {} | {} | {} | {} | {} |", cell(&s.time), cell(&s.interface), cell(&s.src), s.blocked, duration_text(s.window_s), quarantine)
    })?;

    writeln!(o, "## Policy reloads\n")?;
    writeln!(o, "{} applied, {} rejected.\n", r.reloads.ok, r.reloads.rejected)?;
    list(o, &r.reloads.events, "| time | result | trigger | generation | policy | sha256 | changed by | errors |\n|---|---|---|--:|---|---|---|---|", |e| {
        let mut errors = e.errors.join("; ");
        if e.more_errors > 0 {
            errors += &format!(" (and {} more)", e.more_errors);
        }
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&e.time),
            cell(&e.result),
            cell(&e.trigger),
            e.generation,
            cell(e.policy.as_deref().unwrap_or("-")),
            e.sha256.as_deref().map(|s| code(short_sha(s))).unwrap_or_else(|| "-".into()),
            cell(e.changed_by.as_deref().unwrap_or("-")),
            if errors.is_empty() { "-".into() } else { cell(&errors) }
        )
    })?;
    Ok(())
}

fn sources(o: &mut String, t: &Ranked<SourceRow>, countries: bool) -> std::fmt::Result {
    if t.rows.is_empty() {
        return writeln!(o, "None.\n");
    }
    if countries {
        writeln!(o, "| source | drops | reasons | countries |\n|---|--:|---|---|")?;
    } else {
        writeln!(o, "| source | drops | reasons |\n|---|--:|---|")?;
    }
    for s in &t.rows {
        write!(o, "| {} | {} | {} |", cell(&s.source), count_text(s.drops, s.overcount), cell(&by_count(&s.reasons)))?;
        if countries {
            write!(o, " {} |", if s.countries.is_empty() { "-".into() } else { cell(&by_count(&s.countries)) })?;
        }
        writeln!(o)?;
    }
    writeln!(o)?;
    exactness(o, t)
}

/// Says whether the table's counts are exact, and what they are when not.
fn exactness<R>(o: &mut String, t: &Ranked<R>) -> std::fmt::Result {
    if t.exact {
        writeln!(o, "Counts are exact: {} distinct, within the table's {} counters.\n", t.tracked, t.capacity)
    } else {
        writeln!(
            o,
            "More keys than the table's {} counters: a count shown as `N (at least M)` may be over the truth by N-M (and its reasons count only since then); a plain count is exact.\n",
            t.capacity
        )
    }
}

fn list<T>(o: &mut String, l: &Listed<T>, header: &str, row: impl Fn(&T) -> String) -> std::fmt::Result {
    if l.shown.is_empty() {
        return writeln!(o, "None.\n");
    }
    writeln!(o, "{header}")?;
    for item in &l.shown {
        writeln!(o, "{}", row(item))?;
    }
    writeln!(o)?;
    if l.omitted > 0 {
        writeln!(o, "{} more not shown (the earliest {} are).\n", l.omitted, l.shown.len())?;
    }
    Ok(())
}

fn count_text(count: u64, overcount: u64) -> String {
    if overcount == 0 {
        count.to_string()
    } else {
        format!("{count} (at least {})", count - overcount)
    }
}

/// `a 3, b 1`, highest first.
fn by_count(m: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    v.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

fn counts_text(m: &BTreeMap<String, u64>) -> String {
    cell(&by_count(m))
}

fn or_dash(s: &Option<String>) -> String {
    s.as_deref().map(cell).unwrap_or_else(|| "-".into())
}

/// Text from the file made inert for a table cell: it cannot end the
/// cell or the row, nor make a link, an image, HTML, code or emphasis of
/// its own (each such character escaped; an underscore inside a word
/// cannot emphasise, so `deny_acl` stays as it is).
fn cell(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        let inside_word = |j: Option<usize>| j.and_then(|j| chars.get(j)).is_some_and(|c| c.is_alphanumeric());
        match c {
            '\n' | '\r' => out.push(' '),
            '_' if inside_word(i.checked_sub(1)) && inside_word(Some(i + 1)) => out.push('_'),
            '\\' | '|' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '~' | '&' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// Text from the file as a code span: fenced by more backticks than it
/// holds in a row, so nothing in it ends the span.
fn code(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ").replace('|', "\\|");
    let longest = s.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') { " " } else { "" };
    format!("{fence}{pad}{s}{pad}{fence}")
}
