//! The results of one benchmark run (the JSON lines `run --json` appended) as a Markdown table:
//! one row per broker and label, the median run by webhooks/s when a broker ran several times,
//! with its share of the no-broker ceiling measured in the same benchmark.

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.decimals$}"))
}

/// The runs of one broker under one label.
struct Group<'a> {
    broker: &'a str,
    label: &'a str,
    runs: Vec<&'a Value>,
}

impl<'a> Group<'a> {
    fn good(&self) -> Vec<&'a Value> {
        let mut good: Vec<&Value> = self
            .runs
            .iter()
            .copied()
            .filter(|r| r.get("error").is_none())
            .collect();
        good.sort_by(|a, b| {
            num(a, "webhooks_per_s")
                .unwrap_or(0.0)
                .total_cmp(&num(b, "webhooks_per_s").unwrap_or(0.0))
        });
        good
    }

    /// The median run (the lower one of an even count).
    fn median(&self) -> Option<&'a Value> {
        let good = self.good();
        good.get(good.len().saturating_sub(1) / 2).copied()
    }
}

fn groups(rows: &[Value]) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for r in rows {
        let broker = r["broker"].as_str().unwrap_or("?");
        let label = r["label"].as_str().unwrap_or("");
        match out
            .iter_mut()
            .find(|g| g.broker == broker && g.label == label)
        {
            Some(g) => g.runs.push(r),
            None => out.push(Group {
                broker,
                label,
                runs: vec![r],
            }),
        }
    }
    out
}

/// Prints the table; failure when the file cannot be read.
pub fn print(file: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadgen: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let groups = groups(&rows);
    let rate = |broker: &str, label: &str| {
        groups
            .iter()
            .find(|g| g.broker == broker && g.label == label)
            .and_then(Group::median)
            .and_then(|r| num(r, "webhooks_per_s"))
    };
    println!(
        "| broker | webhooks/s | events/s | % of ceiling | p50 ms | p99 ms | peak RSS MB | idle RSS MB | start-up ms | CPU s / 1k events | non-2xx | every event stored | runs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for g in &groups {
        let name = if g.label.is_empty() {
            g.broker.to_string()
        } else {
            format!("{} ({})", g.broker, g.label)
        };
        let Some(r) = g.median() else {
            let e = g.runs[0]["error"].as_str().unwrap_or("?");
            let e: String = e.chars().take(120).collect::<String>().replace('|', "/");
            println!("| {name} | not run: {e} ||||||||||||");
            continue;
        };
        let webhooks = num(r, "webhooks_per_s");
        let share = webhooks
            .zip(rate("null", g.label))
            .map(|(a, c)| 100.0 * a / c);
        let non_2xx: u64 = g
            .runs
            .iter()
            .map(|r| {
                r["non_2xx"]
                    .as_object()
                    .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>())
                    + r["errors"].as_u64().unwrap_or(0)
            })
            .sum();
        let stored = if g.broker == "null" {
            "n/a (stores nothing)".to_string()
        } else {
            let good = g.good();
            let all = good.iter().all(|r| r["every_event_stored"] == true);
            let events: u64 = good.iter().filter_map(|r| r["events_ok"].as_u64()).sum();
            format!("{} ({events} events)", if all { "yes" } else { "NO" })
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {non_2xx} | {stored} | {} |",
            fmt(webhooks, 0),
            fmt(num(r, "events_per_s"), 0),
            fmt(share, 0),
            fmt(num(r, "p50_ms"), 2),
            fmt(num(r, "p99_ms"), 2),
            fmt(num(r, "peak_rss_mb"), 1),
            fmt(num(r, "idle_rss_mb"), 1),
            fmt(num(r, "startup_ms"), 1),
            fmt(num(r, "cpu_s_per_1k_events"), 4),
            g.runs.len(),
        );
    }
    println!();
    let mut labels: Vec<&str> = groups.iter().map(|g| g.label).collect();
    labels.dedup();
    for label in labels {
        let tag = if label.is_empty() {
            String::new()
        } else {
            format!(" ({label})")
        };
        let nats = rate("nats", label);
        if let (Some(c), Some(n)) = (rate("null", label), nats) {
            println!(
                "NATS{tag}: {:.0} % of the no-broker ceiling (target: at least 50 %).",
                100.0 * n / c
            );
        }
        if let (Some(n), Some(a)) = (nats, rate("amqp", label)) {
            println!(
                "AMQP{tag}: {:.0} % of the NATS figure (target: at least 50 %).",
                100.0 * a / n
            );
        }
    }
    ExitCode::SUCCESS
}
