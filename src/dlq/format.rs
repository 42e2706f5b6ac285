//! Dead letters for people (a table) and for machines (a JSON array).

use std::io::Write;

use serde::Serialize;

use super::{DETAIL_WIDTH, DeadLetterRecord};

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm UTC`; `-` for 0 (unknown).
pub(crate) fn format_utc_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    // `2023-11-14T22:13:20.123Z` -> `2023-11-14 22:13:20.123 UTC`
    let s = humantime::format_rfc3339_millis(t).to_string();
    format!("{} UTC", s.trim_end_matches('Z').replacen('T', " ", 1))
}

/// `detail` on one line, cut to `max` characters (with `…` when cut).
pub(crate) fn short_detail(detail: &str, max: usize) -> String {
    let one_line: String = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Shows `-` for an empty value in the table.
pub(super) fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// The table's column titles (see [`write_table_row`]).
pub(crate) fn write_table_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<27}  {:<10}  {:>3}  {:<10}  {:<56}  {:<36}  DETAIL",
        "POSITION", "FIRST FAILURE", "REASON", "TRY", "APP", "SUBJECT", "MESSAGE ID"
    )
}

/// One letter as a table row: position, first failure (UTC), reason, attempts, app, original
/// subject, message id, short detail. Columns have fixed widths (a longer value pushes the rest
/// of its row right) so rows can be written as they are read, without holding the whole queue.
pub(crate) fn write_table_row(out: &mut impl Write, r: &DeadLetterRecord) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<27}  {:<10}  {:>3}  {:<10}  {:<56}  {:<36}  {}",
        r.position,
        r.first_failure(),
        or_dash(&r.reason),
        r.attempts,
        or_dash(&r.app_id),
        or_dash(&r.subject),
        or_dash(&r.msg_id),
        short_detail(&r.detail, DETAIL_WIDTH),
    )
}

/// The JSON form of a record (`dlq list --json`): every field, the body as its exact text.
#[derive(Serialize)]
struct JsonRecord<'a> {
    position: u64,
    subject: &'a str,
    msg_id: &'a str,
    reason: &'a str,
    detail: &'a str,
    attempts: u32,
    first_failure_ms: u64,
    first_failure: String,
    app_id: &'a str,
    event: &'a str,
    channel: &'a str,
    time_ms: &'a str,
    replayable: bool,
    body: std::borrow::Cow<'a, str>,
}

/// One record as a single line of JSON.
pub(crate) fn record_json(r: &DeadLetterRecord) -> String {
    let j = JsonRecord {
        position: r.position,
        subject: &r.subject,
        msg_id: &r.msg_id,
        reason: &r.reason,
        detail: &r.detail,
        attempts: r.attempts,
        first_failure_ms: r.first_failure_ms,
        first_failure: r.first_failure(),
        app_id: &r.app_id,
        event: &r.event,
        channel: &r.channel,
        time_ms: &r.time_ms,
        replayable: r.replay_blocker().is_none(),
        body: String::from_utf8_lossy(&r.body),
    };
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_string(&j).unwrap_or_default()
}

/// Writes records as one JSON array, one record per line, as they arrive (`[]` when empty).
pub(crate) fn write_json_array(
    out: &mut impl Write,
    records: impl IntoIterator<Item = DeadLetterRecord>,
) -> std::io::Result<()> {
    let mut first = true;
    for r in records {
        out.write_all(if first { b"[\n" } else { b",\n" })?;
        out.write_all(record_json(&r).as_bytes())?;
        first = false;
    }
    out.write_all(if first { b"[]\n" } else { b"\n]\n" })
}
