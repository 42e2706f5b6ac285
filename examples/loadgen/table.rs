//! The results of one benchmark run (the JSON lines `run --json` appended) as a Markdown table,
//! with each row's share of the no-broker ceiling measured in the same run.

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
    // The latest good row of `broker` with `label` (rows of one run share a label).
    let rate_of = |broker: &str, label: &Value| {
        rows.iter()
            .rev()
            .find(|r| r["broker"] == broker && &r["label"] == label && r.get("error").is_none())
            .and_then(|r| num(r, "webhooks_per_s"))
    };
    println!(
        "| broker | webhooks/s | events/s | % of ceiling | p50 ms | p99 ms | peak RSS MB | idle RSS MB | start-up ms | CPU s / 1k events | non-2xx | stored / acked |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let broker = r["broker"].as_str().unwrap_or("?");
        let label = r["label"].as_str().unwrap_or("");
        let name = if label.is_empty() {
            broker.to_string()
        } else {
            format!("{broker} ({label})")
        };
        if let Some(e) = r.get("error").and_then(Value::as_str) {
            let e: String = e.chars().take(120).collect::<String>().replace('|', "/");
            println!("| {name} | not run: {e} |||||||||||");
            continue;
        }
        let rate = num(r, "webhooks_per_s");
        let share = rate
            .zip(rate_of("null", &r["label"]))
            .map(|(a, c)| 100.0 * a / c);
        let non_2xx: u64 = r["non_2xx"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>())
            + r["errors"].as_u64().unwrap_or(0);
        let stored = match r["stored_events"].as_u64() {
            Some(n) => format!(
                "{n} / {}{}",
                r["events_ok"].as_u64().unwrap_or(0),
                if r["every_event_stored"] == true {
                    " ✓"
                } else {
                    " ✗"
                }
            ),
            None => "n/a".into(),
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {non_2xx} | {stored} |",
            fmt(rate, 0),
            fmt(num(r, "events_per_s"), 0),
            fmt(share, 0),
            fmt(num(r, "p50_ms"), 2),
            fmt(num(r, "p99_ms"), 2),
            fmt(num(r, "peak_rss_mb"), 1),
            fmt(num(r, "idle_rss_mb"), 1),
            fmt(num(r, "startup_ms"), 1),
            fmt(num(r, "cpu_s_per_1k_events"), 4),
        );
    }
    let mut labels: Vec<&Value> = rows.iter().map(|r| &r["label"]).collect();
    labels.dedup();
    println!();
    for label in labels {
        let tag = label
            .as_str()
            .filter(|l| !l.is_empty())
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let nats = rate_of("nats", label);
        if let (Some(c), Some(n)) = (rate_of("null", label), nats) {
            println!(
                "NATS{tag} reaches {:.0} % of the no-broker ceiling (target: at least 50 %).",
                100.0 * n / c
            );
        }
        if let (Some(n), Some(a)) = (nats, rate_of("amqp", label)) {
            println!(
                "AMQP{tag} reaches {:.0} % of the NATS figure (target: at least 50 %).",
                100.0 * a / n
            );
        }
    }
    ExitCode::SUCCESS
}
