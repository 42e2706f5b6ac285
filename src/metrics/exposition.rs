//! The two formats `/metrics` answers in. prometheus-client writes OpenMetrics only, which
//! Prometheus reads, but `promtool check metrics`, Vector's `prometheus_scrape` and Telegraf
//! read the older Prometheus text format (0.0.4): they refuse OpenMetrics' `# EOF`, its
//! `# UNIT` lines and counter families named without their `_total`. The text format is the
//! default, as in every Prometheus client; OpenMetrics is served to a scraper that asks.

/// The content type of the Prometheus text format.
pub(crate) const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which format a request's `Accept` header asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// `text/plain; version=0.0.4`: the default.
    Text,
    /// OpenMetrics 1.0, for a scraper whose `Accept` names it (Prometheus does, first).
    OpenMetrics,
}

impl Format {
    /// The format `accept` asks for: OpenMetrics when it is named with a non-zero quality,
    /// else text (a missing header, `*/*`, `text/plain`).
    pub(crate) fn of_accept(accept: Option<&str>) -> Self {
        let asks = accept.is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default();
                let zero = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !zero
            })
        });
        if asks {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The content type of the answer.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

/// The Prometheus text format of an OpenMetrics exposition: `# EOF` and `# UNIT` dropped, a
/// counter family's `# HELP` / `# TYPE` named as its samples are (`_total`), an `unknown`
/// family typed `untyped`. Everything else (gauges, histograms, labels, escaping) is written
/// the same in both.
pub(crate) fn to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.rsplit_once(' ') {
                Some((name, "counter")) => {
                    out.push_str("# TYPE ");
                    out.push_str(&total(name));
                    out.push_str(" counter\n");
                }
                Some((name, "unknown")) => {
                    out.push_str("# TYPE ");
                    out.push_str(name);
                    out.push_str(" untyped\n");
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    rename_counter_help(&out)
}

/// `name` with the `_total` suffix a counter's samples carry.
fn total(name: &str) -> String {
    if name.ends_with("_total") {
        name.to_string()
    } else {
        format!("{name}_total")
    }
}

/// Renames each `# HELP x` that precedes a `# TYPE x_total counter` to `# HELP x_total`
/// (prometheus-client writes HELP before TYPE, with the family's bare name).
fn rename_counter_help(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::with_capacity(text.len() + 256);
    for (i, line) in lines.iter().enumerate() {
        let renamed = line.strip_prefix("# HELP ").and_then(|rest| {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let next = lines.get(i + 1)?;
            let counter = format!("# TYPE {} counter", total(name));
            (*next == counter && !name.ends_with("_total"))
                .then(|| format!("# HELP {}_total {help}", name))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP a_things Things.\n# TYPE a_things counter\na_things_total{x=\"1\"} 3\n# HELP b Level.\n# TYPE b gauge\n# UNIT b seconds\nb 1.5\n# HELP c_total Already.\n# TYPE c_total counter\nc_total 1\n# HELP d Odd.\n# TYPE d unknown\nd 2\n# EOF\n";

    #[test]
    fn text_names_counter_families_as_their_samples_and_drops_openmetrics_lines() {
        let text = to_text(OM);
        assert_eq!(
            text,
            "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total{x=\"1\"} 3\n# HELP b Level.\n# TYPE b gauge\nb 1.5\n# HELP c_total Already.\n# TYPE c_total counter\nc_total 1\n# HELP d Odd.\n# TYPE d untyped\nd 2\n"
        );
    }

    #[test]
    fn accept_picks_openmetrics_only_when_asked() {
        assert_eq!(Format::of_accept(None), Format::Text);
        assert_eq!(Format::of_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::of_accept(Some("text/plain")), Format::Text);
        // What Prometheus 2.x sends.
        assert_eq!(
            Format::of_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::of_accept(Some("application/openmetrics-text; q=0, text/plain")),
            Format::Text
        );
    }
}
