//! The operations kit, checked without Docker: the compose file, Kubernetes manifests, Grafana
//! dashboard and Prometheus files parse and agree with each other, every metric they query is
//! one the running binary exports, and `promtool` accepts (and unit-tests) the rules.
//! `tests/deploy_configs.rs` runs the bridge with the configs these files carry.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::deploy::{
    compose_binds, compose_named_volumes, dockerfile, dockerignore, exec_form, exported_family,
    exported_samples, ignored, metric_names, promtool, read, repo, s, seq, yaml, yaml_docs,
};
use common::process::{BridgeProcess, post_signed, run, settings_env};
use common::{delete_streams, jetstream_ctx, nats_settings};
use serde_yaml::Value;

const DASHBOARD: &str = "deploy/grafana/dashboards/pusher-bridge.json";
const RULES: &str = "deploy/prometheus/rules/pusher-bridge.yml";
const K8S: &str = "deploy/kubernetes/pusher-bridge.yaml";
const K8S_STS: &str = "deploy/kubernetes/statefulset.yaml";

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
fn compose_file_describes_the_stack() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    let names: BTreeSet<&str> = services
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| s(k, "service"))
        .collect();
    for want in ["nats", "rabbitmq", "pusher-bridge", "prometheus", "grafana"] {
        assert!(names.contains(want), "service {want} missing: {names:?}");
    }
    let declared: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| s(k, "volume").to_string())
        .collect();
    for (name, service) in services.as_mapping().unwrap() {
        let name = s(name, "service");
        for (src, _) in compose_binds(service) {
            assert!(
                src.exists(),
                "{name}: bind mount source {} missing",
                src.display()
            );
        }
        for (vol, _) in compose_named_volumes(service) {
            assert!(declared.contains(&vol), "{name}: volume {vol} not declared");
        }
        if let Some(deps) = service["depends_on"].as_mapping() {
            for dep in deps.keys() {
                assert!(
                    names.contains(s(dep, "dependency")),
                    "{name} depends on {dep:?}"
                );
            }
        }
        for dep in seq(&service["depends_on"]) {
            assert!(
                names.contains(s(&dep, "dependency")),
                "{name} depends on {dep:?}"
            );
        }
    }

    // NATS with JetStream storing in a named volume.
    let nats = &services["nats"];
    let command: Vec<String> = seq(&nats["command"])
        .iter()
        .map(|a| s(a, "arg").to_string())
        .collect();
    assert!(
        command.iter().any(|a| a == "--jetstream" || a == "-js"),
        "{command:?}"
    );
    let store = command
        .iter()
        .position(|a| a == "--store_dir" || a == "-sd")
        .map(|i| command[i + 1].clone())
        .expect("a JetStream store dir");
    assert!(
        compose_named_volumes(nats)
            .iter()
            .any(|(_, dst)| *dst == store),
        "the JetStream store {store} is not on a volume"
    );

    // RabbitMQ with the management UI.
    let rabbit = &services["rabbitmq"];
    assert!(s(&rabbit["image"], "image").contains("management"));
    assert!(
        seq(&rabbit["ports"])
            .iter()
            .any(|p| s(p, "port").ends_with(":15672"))
    );
    assert!(
        !compose_named_volumes(rabbit).is_empty(),
        "RabbitMQ data is not persistent"
    );

    // The bridge: built here, config mounted, secrets from env files, spool on a volume.
    let bridge = &services["pusher-bridge"];
    assert_eq!(s(&bridge["build"], "build"), ".");
    let env_files: Vec<Value> = seq(&bridge["env_file"]);
    let first = &env_files[0];
    assert!(repo(s(&first["path"], "env_file")).is_file());
    assert!(
        env_files
            .iter()
            .skip(1)
            .all(|f| f["required"] == Value::Bool(false)),
        "only the demo env file may be required"
    );
    assert!(
        compose_named_volumes(bridge)
            .iter()
            .any(|(_, dst)| dst == "/var/lib/pusher-bridge"),
        "the spool is not on a volume"
    );
    assert!(
        seq(&bridge["ports"])
            .iter()
            .any(|p| s(p, "port") == "8080:8080")
    );

    // Prometheus gets deploy/prometheus (config + rules) and scrapes the bridge service.
    let prom = &services["prometheus"];
    assert!(
        compose_binds(prom)
            .iter()
            .any(|(src, dst)| *src == repo("deploy/prometheus") && dst == "/etc/prometheus")
    );
    assert!(
        seq(&prom["command"])
            .iter()
            .any(|a| s(a, "arg") == "--config.file=/etc/prometheus/prometheus.yml")
    );
    let prom_cfg = yaml("deploy/prometheus/prometheus.yml");
    let targets: Vec<String> = seq(&prom_cfg["scrape_configs"])
        .iter()
        .flat_map(|c| seq(&c["static_configs"]))
        .flat_map(|c| seq(&c["targets"]))
        .map(|t| s(&t, "target").to_string())
        .collect();
    assert!(
        targets.contains(&"pusher-bridge:8080".to_string()),
        "{targets:?}"
    );
    assert!(
        seq(&prom_cfg["rule_files"])
            .iter()
            .any(|r| s(r, "rule file") == "rules/*.yml")
    );

    // Grafana gets the provisioning and the dashboards where the provider looks.
    let grafana = &services["grafana"];
    let binds = compose_binds(grafana);
    assert!(
        binds
            .iter()
            .any(|(src, dst)| *src == repo("deploy/grafana/provisioning")
                && dst == "/etc/grafana/provisioning")
    );
    let provider = yaml("deploy/grafana/provisioning/dashboards/pusher-bridge.yml");
    let path = s(&seq(&provider["providers"])[0]["options"]["path"], "path").to_string();
    assert!(
        binds
            .iter()
            .any(|(src, dst)| *src == repo("deploy/grafana/dashboards") && *dst == path),
        "dashboards not mounted at the provider's path {path}"
    );
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let ds = &seq(&datasources["datasources"])[0];
    assert_eq!(s(&ds["type"], "type"), "prometheus");
    assert_eq!(s(&ds["url"], "url"), "http://prometheus:9090");
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == Value::String(kind.into()))
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .unwrap()
        .iter()
        .all(|(k, v)| labels[s(k, "label")] == *v)
}

#[test]
fn kubernetes_manifests_agree_with_each_other() {
    let docs = yaml_docs(K8S);
    let kinds: Vec<&str> = docs.iter().map(|d| s(&d["kind"], "kind")).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Secret",
            "Deployment",
            "Service",
            "PodDisruptionBudget"
        ]
    );
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
            "{d:?}"
        );
    }
    let config_map = by_kind(&docs, "ConfigMap");
    let secret = by_kind(&docs, "Secret");
    let deployment = by_kind(&docs, "Deployment");
    let service = by_kind(&docs, "Service");
    let pdb = by_kind(&docs, "PodDisruptionBudget");

    let toml_key = config_map["data"]
        .as_mapping()
        .unwrap()
        .keys()
        .next()
        .map(|k| s(k, "key").to_string())
        .unwrap();
    let toml_text = s(&config_map["data"][toml_key.as_str()], "toml");
    let settings = pusher_bridge::config::Settings::from_toml(toml_text).expect("valid TOML");
    assert!(
        settings.apps.is_empty(),
        "secrets belong in the Secret, not the ConfigMap"
    );
    assert!(secret["stringData"]["PUSHER_BRIDGE_APPS"].is_string());

    let pod = &deployment["spec"]["template"];
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert!(labels_match(
        &deployment["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    let spec = &pod["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_ne!(spec["securityContext"]["runAsUser"].as_u64(), Some(0));
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > settings.server.shutdown_grace.as_secs(),
        "grace {grace}"
    );

    let container = &seq(&spec["containers"])[0];
    let port = &seq(&container["ports"])[0];
    let listen_port = settings.listen_addr().unwrap().port();
    assert_eq!(port["containerPort"].as_u64(), Some(u64::from(listen_port)));
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        Value::String(listen_port.to_string())
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(s(&get["path"], "path"), path, "{probe}");
        assert_eq!(get["port"], port["name"], "{probe} port");
    }

    // The config path the binary reads is the ConfigMap's key where the volume is mounted.
    let env: BTreeMap<String, String> = seq(&container["env"])
        .iter()
        .map(|e| {
            (
                s(&e["name"], "env").to_string(),
                s(&e["value"], "env").to_string(),
            )
        })
        .collect();
    let mounts: BTreeMap<String, String> = seq(&container["volumeMounts"])
        .iter()
        .map(|m| {
            (
                s(&m["name"], "mount").to_string(),
                s(&m["mountPath"], "mount").to_string(),
            )
        })
        .collect();
    let volumes = seq(&spec["volumes"]);
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("the ConfigMap is mounted");
    let config_mount = &mounts[s(&config_volume["name"], "volume")];
    assert_eq!(
        env["PUSHER_BRIDGE_CONFIG"],
        format!("{config_mount}/{toml_key}")
    );
    assert_eq!(
        seq(&container["envFrom"])[0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    let spool_mount = &mounts["spool"];
    assert!(
        settings.spool.dir.starts_with(spool_mount),
        "spool dir {} is not on the spool volume {spool_mount}",
        settings.spool.dir.display()
    );
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"],
        Value::Bool(true)
    );

    assert!(labels_match(
        &service["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    assert_eq!(
        seq(&service["spec"]["ports"])[0]["targetPort"],
        port["name"]
    );
    assert!(labels_match(
        &pdb["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    assert!(
        pdb["spec"]["minAvailable"].as_u64().unwrap()
            < deployment["spec"]["replicas"].as_u64().unwrap()
    );

    // The StatefulSet alternative runs the very same pod, with a claim per pod for the spool.
    let sts_docs = yaml_docs(K8S_STS);
    let headless = by_kind(&sts_docs, "Service");
    let sts = by_kind(&sts_docs, "StatefulSet");
    assert_eq!(headless["spec"]["clusterIP"], Value::String("None".into()));
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(sts["spec"]["template"]["metadata"], pod["metadata"]);
    let mut dep_spec = spec.clone();
    let kept: Vec<Value> = volumes
        .iter()
        .filter(|v| v["name"] != Value::String("spool".into()))
        .cloned()
        .collect();
    dep_spec["volumes"] = Value::Sequence(kept);
    assert_eq!(
        sts["spec"]["template"]["spec"], dep_spec,
        "pod templates drifted apart"
    );
    let claim = &seq(&sts["spec"]["volumeClaimTemplates"])[0];
    assert_eq!(s(&claim["metadata"]["name"], "claim"), "spool");
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let steps = dockerfile(&read("Dockerfile"));
    let froms: Vec<&str> = steps
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| i.args.as_str())
        .collect();
    assert!(froms.len() >= 2, "{froms:?}");
    assert!(
        froms[0].starts_with("rust:1.95") && froms[0].ends_with("AS builder"),
        "{froms:?}"
    );
    let runtime = froms.last().unwrap();
    assert!(
        runtime.contains("distroless") || runtime.contains("slim"),
        "runtime image {runtime}"
    );
    let final_stage = steps
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .map(|n| &steps[n..])
        .unwrap();
    let find = |kw: &str| {
        final_stage
            .iter()
            .find(|i| i.keyword == kw)
            .map(|i| i.args.clone())
    };

    let user = find("USER").expect("a USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&uid), "runs as {user}");

    let build = steps
        .iter()
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .expect("a cargo build");
    assert!(build.args.contains("--release") && build.args.contains("--locked"));

    // The binary the runtime stage runs is the one copied from the builder.
    let entry = exec_form(&find("ENTRYPOINT").unwrap());
    let copies: Vec<Vec<String>> = final_stage
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| i.args.split_whitespace().map(String::from).collect())
        .collect();
    assert!(
        copies
            .iter()
            .any(|c| c[0] == "--from=builder" && c.last() == Some(&entry[0])),
        "{} is not copied from the builder: {copies:?}",
        entry[0]
    );
    let health = find("HEALTHCHECK").expect("a HEALTHCHECK");
    let cmd = exec_form(&health[health.find("CMD").unwrap() + 3..]);
    assert_eq!(cmd[0], entry[0]);
    assert_eq!(cmd[1], "healthcheck");

    // What is copied from the context exists and is not excluded by .dockerignore.
    let rules = dockerignore(&read(".dockerignore"));
    for needed in ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"] {
        assert!(
            !ignored(&rules, needed),
            "{needed} is excluded from the context"
        );
    }
    for unwanted in [
        "target/debug/pusher-bridge",
        ".git/HEAD",
        "deploy/kubernetes/x.yaml",
    ] {
        assert!(
            ignored(&rules, unwanted),
            "{unwanted} would be sent to the builder"
        );
    }
    for copy in steps.iter().filter(|i| i.keyword == "COPY") {
        let words: Vec<&str> = copy.args.split_whitespace().collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        for src in &words[..words.len() - 1] {
            if src.starts_with("--") || *src == "." {
                continue;
            }
            assert!(repo(src).exists(), "COPY {src}: missing");
            assert!(
                !ignored(&rules, src),
                "COPY {src}: excluded by .dockerignore"
            );
        }
    }
}

#[test]
fn dockerignore_matching_follows_docker() {
    let rules = dockerignore("target/\n.git\ndeploy/*\n!deploy/a.toml\n*.md\n");
    assert!(ignored(&rules, "target/release/x"));
    assert!(ignored(&rules, ".git/HEAD"));
    assert!(ignored(&rules, "deploy/b.yml"));
    assert!(!ignored(&rules, "deploy/a.toml"));
    assert!(ignored(&rules, "README.md"));
    assert!(!ignored(&rules, "docs/README.md"));
    assert!(!ignored(&rules, "src/main.rs"));
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
    let doc = yaml(RULES);
    for rule in seq(&doc["groups"]).iter().flat_map(|g| seq(&g["rules"])) {
        let severity = s(&rule["labels"]["severity"], "severity");
        assert!(["critical", "warning"].contains(&severity), "{rule:?}");
        assert!(rule["annotations"]["summary"].is_string(), "{rule:?}");
    }
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
    promtool_ok(&[
        "test",
        "rules",
        &path("deploy/prometheus/tests/pusher-bridge.test.yml"),
    ]);

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
    let file = std::env::temp_dir().join(common::unique("dashboard-rules"));
    std::fs::write(&file, rules).unwrap();
    promtool_ok(&["check", "rules", &file.display().to_string()]);
    let _ = std::fs::remove_file(file);
}
