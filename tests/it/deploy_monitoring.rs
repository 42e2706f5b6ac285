//! The monitoring part of the operations kit: the Grafana dashboard is well-formed and shows
//! what operators need, the alert rules cover the failure modes, every metric either of them
//! queries is exported by the running binary, and `promtool` accepts (and unit-tests) the rules
//! and the dashboard's queries.

use std::collections::BTreeSet;
use std::process::Command;

use crate::common::deploy::{
    exported_family, exported_samples, metric_names, promtool, read, repo, s, seq, yaml,
};
use crate::common::process::{BridgeProcess, post_signed, run, settings_env};
use crate::common::{TestApp, cleanup, delete_streams, jetstream_ctx, nats_settings};
use serde_yaml::Value;

const DASHBOARD: &str = "deploy/grafana/dashboards/pusher-bridge.json";
const RULES: &str = "deploy/prometheus/rules/pusher-bridge.yml";

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON")
}

/// Every PromQL expression of the dashboard (panel targets), with the panel title.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The template variables' queries (`label_values(metric, label)`).
fn dashboard_variable_queries() -> Vec<String> {
    dashboard()["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["query"]["query"].as_str().map(String::from))
        .collect()
}

/// Every alert rule as (name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let rules = yaml(RULES);
    seq(&rules["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]))
        .map(|r| {
            (
                s(&r["alert"], "alert").to_string(),
                s(&r["expr"], "expr").to_string(),
            )
        })
        .collect()
}

#[test]
fn dashboard_is_well_formed_grafana_json() {
    let d = dashboard();
    assert_eq!(d["uid"], "pusher-bridge");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["query"] == "prometheus")
    );
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap().to_string();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id at {title}"
        );
        let g = &p["gridPos"];
        let b = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap());
        assert!(b[0] + b[2] <= 24, "{title} is wider than the grid");
        for (other, o) in &boxes {
            let apart = b[0] + b[2] <= o[0]
                || o[0] + o[2] <= b[0]
                || b[1] + b[3] <= o[1]
                || o[1] + o[3] <= b[1];
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), b));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        let refs: BTreeSet<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds repeat");
    }

    // What the issue asks the dashboard to show.
    let exprs: Vec<String> = dashboard_exprs().into_iter().map(|(_, e)| e).collect();
    let has = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    assert!(has(
        "sum by (outcome) (rate(pusher_bridge_webhooks_received_total"
    ));
    assert!(has(
        "sum by (event) (rate(pusher_bridge_events_published_total"
    ));
    assert!(has(
        "histogram_quantile(0.5, sum by (le) (rate(pusher_bridge_publish_duration_seconds_bucket"
    ));
    assert!(has(
        "histogram_quantile(0.99, sum by (le) (rate(pusher_bridge_publish_duration_seconds_bucket"
    ));
    assert!(has(
        "sum by (reason) (rate(pusher_bridge_events_dead_lettered_total"
    ));
    for name in [
        "pusher_bridge_spool_events",
        "pusher_bridge_spool_oldest_age_seconds",
        "pusher_bridge_broker_up",
        "pusher_bridge_sweeper_runs_total",
        "pusher_bridge_sweeper_last_success_timestamp_seconds",
    ] {
        assert!(has(name), "no panel shows {name}");
    }
}

/// `PusherBridgeSpoolOld` fires (threshold + `for`) well inside the default duplicate window,
/// past which a spooled event whose ack was lost can be stored twice.
#[test]
fn spool_old_fires_inside_the_duplicate_window() {
    let doc = yaml(RULES);
    let rule = seq(&doc["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]))
        .find(|r| r["alert"].as_str() == Some("PusherBridgeSpoolOld"))
        .expect("PusherBridgeSpoolOld");
    let expr = s(&rule["expr"], "expr");
    let threshold: f64 = expr
        .rsplit('>')
        .next()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no threshold in {expr}"));
    let pending = humantime::parse_duration(s(&rule["for"], "for")).unwrap();
    let window = pusher_bridge::config::Settings::default()
        .broker
        .nats
        .duplicate_window;
    let fires_at = threshold + pending.as_secs_f64();
    assert!(
        fires_at <= window.as_secs_f64() * 0.75,
        "fires at {fires_at} s, the duplicate window is {window:?}"
    );
}

#[test]
fn alert_rules_cover_the_failure_modes() {
    let rules = alert_rules();
    let expr_of = |name: &str| {
        rules
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    assert!(expr_of("PusherBridgeBrokerDown").contains("pusher_bridge_broker_up == 0"));
    assert!(expr_of("PusherBridgeUnauthorizedSurge").contains(r#"outcome="unauthorized""#));
    assert!(
        expr_of("PusherBridgeDeadLettersGrowing")
            .contains("pusher_bridge_events_dead_lettered_total")
    );
    assert!(expr_of("PusherBridgeSpoolGrowing").contains("pusher_bridge_spool_events"));
    assert!(expr_of("PusherBridgeSpoolOld").contains("pusher_bridge_spool_oldest_age_seconds"));
    assert!(expr_of("PusherBridgeSweeperFailing").contains(r#"outcome="failure""#));
    assert!(
        expr_of("PusherBridgeSweeperStale")
            .contains("pusher_bridge_sweeper_last_success_timestamp_seconds")
    );
    assert!(
        expr_of("PusherBridgeSpoolNearlyFull").contains("pusher_bridge_spool_max_bytes"),
        "an alert on the spool nearing spool.max_bytes"
    );
    let doc = yaml(RULES);
    for rule in seq(&doc["groups"]).iter().flat_map(|g| seq(&g["rules"])) {
        // Annotation-based Kubernetes scraping gives the job another name.
        let expr = s(&rule["expr"], "expr");
        assert!(
            !expr.contains("job="),
            "{expr} needs a particular job label"
        );
        let severity = s(&rule["labels"]["severity"], "severity");
        assert!(["critical", "warning"].contains(&severity), "{rule:?}");
        assert!(rule["annotations"]["summary"].is_string(), "{rule:?}");
    }
}

/// The channel state's series (`pusher_bridge_state_*`) and the open files have panels and
/// alerts: state updates failing, the applier lagging, open files nearing the limit for 10
/// minutes (of bridges only: every exporter has `process_*`). Issue 22.
#[test]
fn dashboard_and_alerts_cover_channel_state_and_open_files() {
    let exprs: Vec<String> = dashboard_exprs().into_iter().map(|(_, e)| e).collect();
    let shown = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    assert!(shown(
        "sum by (outcome) (rate(pusher_bridge_state_updates_total"
    ));
    assert!(shown("pusher_bridge_state_lag_seconds"));
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("process_open_fds") && e.contains("process_max_fds")),
        "no panel shows open files against the limit"
    );

    let doc = yaml(RULES);
    let rules: Vec<Value> = seq(&doc["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]))
        .collect();
    let rule = |name: &str| {
        rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no alert {name}"))
            .clone()
    };
    let expr = |r: &Value| s(&r["expr"], "expr").to_string();
    let pending = |r: &Value| humantime::parse_duration(s(&r["for"], "for")).unwrap();
    let failing = rule("PusherBridgeStateUpdatesFailing");
    assert!(
        expr(&failing).contains(r#"pusher_bridge_state_updates_total{outcome="failed"}"#),
        "{failing:?}"
    );
    let lagging = rule("PusherBridgeStateLagging");
    assert!(
        expr(&lagging).contains("pusher_bridge_state_lag_seconds"),
        "{lagging:?}"
    );
    let fds = rule("PusherBridgeOpenFilesNearLimit");
    let e = expr(&fds);
    assert!(
        e.contains("process_open_fds / process_max_fds > 0.8"),
        "{e}"
    );
    assert!(
        e.contains("pusher_bridge_build_info"),
        "{e} would fire for every exporter's process_* series"
    );
    assert!(
        pending(&fds) >= std::time::Duration::from_secs(600),
        "{fds:?}"
    );
}

/// Every alert fires in a promtool unit test and stays quiet in another, and both alert tables
/// (README.md, docs/operations.md) list exactly the rules' alerts.
#[test]
fn every_alert_is_unit_tested_and_in_the_docs() {
    let alerts: BTreeSet<String> = alert_rules().into_iter().map(|(n, _)| n).collect();
    let (mut fired, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let files = rule_test_files();
    assert!(!files.is_empty());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        assert!(
            seq(&doc["rule_files"])
                .iter()
                .any(|r| s(r, "rule file") == "../rules/pusher-bridge.yml"),
            "{} does not load the rules",
            file.display()
        );
        for test in seq(&doc["tests"]) {
            for t in seq(&test["alert_rule_test"]) {
                let name = s(&t["alertname"], "alertname").to_string();
                if seq(&t["exp_alerts"]).is_empty() {
                    quiet.insert(name);
                } else {
                    fired.insert(name);
                }
            }
        }
    }
    for alert in &alerts {
        assert!(fired.contains(alert), "no unit test fires {alert}");
        assert!(quiet.contains(alert), "no unit test keeps {alert} quiet");
    }
    for doc in ["README.md", "docs/operations.md"] {
        let listed: BTreeSet<String> = read(doc)
            .lines()
            .filter_map(|l| l.strip_prefix("| PusherBridge"))
            .map(|rest| format!("PusherBridge{}", rest.split('|').next().unwrap().trim()))
            .collect();
        assert_eq!(listed, alerts, "{doc}'s alert table");
    }
}

/// Every promtool unit test file (`deploy/prometheus/tests/*.test.yml`), sorted.
fn rule_test_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo("deploy/prometheus/tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.yml"))
        .collect();
    files.sort();
    files
}

/// Families that get their first sample from a retention sweep (labelled by target).
const SWEEPER_FAMILIES: [&str; 3] = [
    "pusher_bridge_sweeper_runs_total",
    "pusher_bridge_sweeper_purged_total",
    "pusher_bridge_sweeper_last_success_timestamp_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_metrics_the_bridge_exports() {
    let s = nats_settings();
    let mut env = settings_env(&s);
    // Sweeps every second, so the sweeper's families get samples while the test watches.
    env.push((
        "PUSHER_BRIDGE_RETENTION__EVENTS__INTERVAL".into(),
        "1s".into(),
    ));
    env.push(("PUSHER_BRIDGE_RETENTION__DLQ__INTERVAL".into(), "1s".into()));
    let mut bridge = BridgeProcess::start(&["serve"], env);
    bridge.wait_ready().await;
    // Traffic of every kind, so the labelled families have samples: accepted webhooks (events
    // published), a 401, and a malformed event (dead letter).
    let out = run(&["send-test"], &bridge.env).await;
    assert_eq!(out.code, 0, "{out:?}");
    let (key, secret) = (&s.apps[0].key, s.apps[0].secret.expose());
    let unsigned = post_signed(bridge.port, key, "wrong", r#"{"time_ms":1,"events":[]}"#).await;
    assert_eq!(unsigned.map(|a| a.0), Some(401));
    let malformed = r#"{"time_ms":1,"events":[{"name":"channel_occupied"}]}"#;
    assert_eq!(
        post_signed(bridge.port, key, secret, malformed)
            .await
            .map(|a| a.0),
        Some(200)
    );

    let mut queried = Vec::new();
    for (title, expr) in dashboard_exprs() {
        queried.extend(
            metric_names(&expr)
                .into_iter()
                .map(|m| (format!("panel {title}"), m)),
        );
    }
    for q in dashboard_variable_queries() {
        queried.extend(
            metric_names(&q)
                .into_iter()
                .map(|m| (format!("variable {q}"), m)),
        );
    }
    for (alert, expr) in alert_rules() {
        queried.extend(
            metric_names(&expr)
                .into_iter()
                .map(|m| (format!("alert {alert}"), m)),
        );
    }
    assert!(queried.len() > 20, "{queried:?}");
    for (place, metric) in &queried {
        assert!(
            exported_family(metric).is_some(),
            "{place} queries {metric}, which is not in metrics::EXPORTED_NAMES"
        );
    }

    // The sweeper families must appear once the binary has a sweeper (`sweep` command).
    let has_sweeper = run(&["sweep", "--help"], &bridge.env).await.code == 0;
    let required = |m: &str| {
        has_sweeper
            || !SWEEPER_FAMILIES
                .iter()
                .any(|f| exported_family(m) == Some(f))
    };
    let mut missing = Vec::new();
    let mut text = String::new();
    for _ in 0..150 {
        let (status, body) = bridge.get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        text = body;
        let exported = exported_samples(&text);
        missing = queried
            .iter()
            .filter(|(_, m)| !exported.contains_key(m))
            .cloned()
            .collect::<Vec<_>>();
        if missing.iter().all(|(_, m)| !required(m)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for (place, metric) in &missing {
        assert!(
            !required(metric),
            "{place} queries {metric}, which the running bridge does not export:\n{text}"
        );
        println!("NOTICE: {metric} ({place}) not checked: this binary has no sweeper yet");
    }
    bridge.terminate().await;
    let js = jetstream_ctx(s.broker.nats.url.expose()).await;
    delete_streams(&js, &s).await;
}

fn promtool_ok(args: &[&str]) {
    let bin = promtool().unwrap();
    let out = Command::new(&bin)
        .args(args)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_rules_config_tests_and_dashboard_queries() {
    if promtool().is_none() {
        println!(
            "NOTICE: promtool not installed (apt-get install prometheus); \
             rule, config and dashboard query checks skipped"
        );
        return;
    }
    let path = |p: &str| repo(p).display().to_string();
    promtool_ok(&["check", "rules", &path(RULES)]);
    promtool_ok(&["check", "config", &path("deploy/prometheus/prometheus.yml")]);
    for file in rule_test_files() {
        promtool_ok(&["test", "rules", &file.display().to_string()]);
    }

    // The dashboard's queries, with Grafana's variables filled in, as recording rules: promtool
    // parses each one as PromQL.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_exprs().iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$__interval", "1m")
            .replace("$app_id", ".*")
            .replace("$instance", ".*");
        assert!(!expr.contains('$'), "unknown variable in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:panel_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = std::env::temp_dir().join(crate::common::unique("dashboard-rules"));
    std::fs::write(&file, rules).unwrap();
    promtool_ok(&["check", "rules", &file.display().to_string()]);
    let _ = std::fs::remove_file(file);
}

/// Runs the Prometheus Python client's parser for `format` ("text" or "openmetrics") over
/// `exposition`; `None` when the client is not installed (`.ci/run` installs it).
fn python_parses(format: &str, exposition: &str) -> Option<Result<usize, String>> {
    let python = repo("tests/sdk/venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return None;
    }
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families as text
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
parse = om if sys.argv[1] == "openmetrics" else text
print(len(list(parse(sys.stdin.read()))))
"#;
    let mut child = Command::new(&python)
        .args(["-c", script, format])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("exposition written");
    let out = child.wait_with_output().expect("python ends");
    Some(if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("{e}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_the_standard_parsers_in_both_formats() {
    let s = nats_settings();
    let mut bridge = BridgeProcess::start(&["serve"], settings_env(&s));
    bridge.wait_ready().await;
    let body = crate::common::webhook_body(1, &[r#"{"name":"channel_occupied","channel":"m"}"#]);
    let posted = post_signed(
        bridge.port,
        crate::common::APP_KEY,
        crate::common::APP_SECRET,
        &body,
    )
    .await;
    assert_eq!(posted.map(|(c, _)| c), Some(200));
    let get = |accept: Option<&'static str>| {
        let port = bridge.port;
        async move {
            let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
            crate::common::process::http_request(port, "GET", "/metrics", &headers, "")
                .await
                .expect("metrics answer")
        }
    };
    let (code, text) = get(None).await;
    assert_eq!(code, 200);
    let (_, star) = get(Some("*/*")).await;
    let (_, om) = get(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ))
    .await;
    assert_eq!(bridge.terminate().await, Some(0));
    delete_streams(&jetstream_ctx(s.broker.nats.url.expose()).await, &s).await;

    // The text format by default: no OpenMetrics lines, counters named as their samples,
    // build information a gauge.
    for t in [&text, &star] {
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"), "{t}");
        assert!(
            t.contains("# TYPE pusher_bridge_webhooks_received_total counter"),
            "{t}"
        );
        assert!(t.contains("# TYPE pusher_bridge_build_info gauge"), "{t}");
        assert!(t.contains("pusher_bridge_build_info{version=\""), "{t}");
    }
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert!(
        om.contains("# TYPE pusher_bridge_webhooks_received counter"),
        "{om}"
    );

    if promtool().is_some() {
        let bin = promtool().unwrap();
        let mut child = Command::new(&bin)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("written");
        let out = child.wait_with_output().expect("promtool ends");
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        println!("NOTICE: promtool not installed (apt-get install prometheus): not checked");
    }
    match (
        python_parses("text", &text),
        python_parses("openmetrics", &om),
    ) {
        (Some(t), Some(o)) => {
            let families = t.expect("the text format parses");
            assert!(families >= 20, "{families} families");
            assert_eq!(o.expect("OpenMetrics parses"), families);
        }
        _ => println!("NOTICE: prometheus_client not installed in tests/sdk/venv: not parsed"),
    }
}

/// `/metrics` says which format it answers in, as interface.md names them: the Prometheus text
/// format by default, OpenMetrics for a scraper whose `Accept` asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_their_format_in_the_content_type() {
    let s = nats_settings();
    let app = TestApp::spawn(s.clone()).await;
    let text = app.get("/metrics").await;
    assert_eq!(text.status, 200);
    assert_eq!(
        text.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let om = app
        .request(
            hyper::Request::get(format!("http://{}/metrics", app.addr))
                .header(
                    "Accept",
                    "application/openmetrics-text;version=1.0.0,*/*;q=0.1",
                )
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(
        om.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.trim_end().ends_with("# EOF"), "{}", om.body);
    app.stop().await;
    cleanup(pusher_bridge::config::BrokerKind::Nats, &s).await;
}
