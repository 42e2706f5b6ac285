//! The operations kit, checked without Docker: the compose file, the Kubernetes manifests and
//! the Dockerfile parse and agree with each other and with the bridge's config (ports, paths,
//! labels, probes, mounts, users). `tests/it/deploy_monitoring.rs` checks the dashboard and alert
//! rules; `tests/it/deploy_configs.rs` runs the bridge with the configs these files carry.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::deploy::{
    Cluster, compose_binds, compose_environment, compose_interpolate, compose_named_volumes,
    compose_variables, dockerfile, dockerignore, env_file, exec_form, gitignored_samples, ignored,
    markdown_part, read, repo, s, selects, seq, shell_commands, yaml, yaml_docs,
};
use serde_yaml::Value;

const K8S: &str = "deploy/kubernetes/deployment.yaml";
const K8S_CONFIG: &str = "deploy/kubernetes/config.yaml";
const K8S_STS: &str = "deploy/kubernetes/statefulset.yaml";
const K8S_SECRET: &str = "deploy/kubernetes/secret.example.yaml";

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

    // A NATS release CI tests (.ci/nats-matrix), pinned to the patch.
    let image = s(&nats["image"], "image");
    let tag = image
        .strip_prefix("nats:")
        .and_then(|t| t.strip_suffix("-alpine"))
        .unwrap_or_else(|| panic!("nats image {image}"));
    let matrix = std::fs::read_to_string(".ci/nats-matrix").expect("the NATS matrix script");
    let tested = matrix
        .lines()
        .find_map(|l| l.split("NATS_VERSIONS:-").nth(1))
        .and_then(|rest| rest.split('}').next())
        .expect("the releases CI tests");
    assert!(
        tested.split_whitespace().any(|v| v == tag),
        "compose runs NATS {tag}, CI tests {tested}"
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
        targets.contains(&"pusher-bridge:8081".to_string()),
        "Prometheus scrapes server.admin_listen: {targets:?}"
    );
    let bridge_config =
        pusher_bridge::config::Settings::from_toml(&read("deploy/pusher-bridge.toml"))
            .expect("the image's config");
    assert_eq!(
        bridge_config.admin_addr().unwrap().map(|a| a.port()),
        Some(8081),
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

/// The password RabbitMQ is created with and the one in the bridge's AMQP URL are one compose
/// variable with one default: `RABBITMQ_PASSWORD=... docker compose up` changes both, so
/// `PUSHER_BRIDGE_BROKER__KIND=amqp` keeps working. Issue 22.
#[test]
fn compose_bridge_logs_in_to_rabbitmq_with_its_password() {
    let compose = yaml("docker-compose.yml");
    let rabbit = compose_environment(&compose["services"]["rabbitmq"]);
    let service = &compose["services"]["pusher-bridge"];
    // What the container gets: its env files, then `environment:`, which wins.
    let mut bridge = Vec::new();
    for file in seq(&service["env_file"]) {
        let path = repo(s(&file["path"], "env_file"));
        if path.exists() && file["required"] != Value::Bool(false) {
            let from_file = env_file(&path);
            assert!(
                from_file
                    .iter()
                    .all(|(k, _)| k != "PUSHER_BRIDGE_BROKER__AMQP__URL"),
                "{} sets the AMQP URL: a stale password there is overridden by `environment:`",
                path.display()
            );
            bridge.extend(from_file);
        }
    }
    bridge.extend(compose_environment(service));
    let last = |env: &[(String, String)], key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} not set"))
    };
    let (user, password) = (
        last(&rabbit, "RABBITMQ_DEFAULT_USER"),
        last(&rabbit, "RABBITMQ_DEFAULT_PASS"),
    );
    let url = last(&bridge, "PUSHER_BRIDGE_BROKER__AMQP__URL");
    let variables = compose_variables(&password);
    assert_eq!(variables.len(), 1, "RabbitMQ's password: {password}");
    assert_eq!(
        compose_variables(&url),
        variables,
        "the bridge's AMQP URL {url} and RabbitMQ's password {password} differ"
    );
    let name = variables[0].0.clone();
    for vars in [
        BTreeMap::new(),
        BTreeMap::from([(name.clone(), "s3cret-22".to_string())]),
    ] {
        let url = compose_interpolate(&url, &vars);
        let (login, host) = url
            .strip_prefix("amqp://")
            .and_then(|rest| rest.split_once('@'))
            .unwrap_or_else(|| panic!("no credentials in {url}"));
        assert_eq!(
            login,
            format!(
                "{}:{}",
                compose_interpolate(&user, &vars),
                compose_interpolate(&password, &vars)
            ),
            "with {vars:?}"
        );
        let host = host.split([':', '/']).next().unwrap();
        assert!(
            compose["services"][host].is_mapping(),
            "{host} is no service"
        );
    }
}

#[test]
fn compose_interpolation_follows_compose() {
    let vars = BTreeMap::from([
        ("SET".to_string(), "v".to_string()),
        ("EMPTY".to_string(), String::new()),
    ]);
    let cases = [
        ("a${SET:-d}b", "avb"),
        ("${UNSET:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${UNSET-d}", "d"),
        ("$SET/$UNSET", "v/"),
        ("$${SET}", "${SET}"),
    ];
    for (value, want) in cases {
        assert_eq!(compose_interpolate(value, &vars), want, "{value}");
    }
    assert_eq!(
        compose_variables("x${A:-1}y${B}"),
        [("A".to_string(), Some("1".to_string())), ("B".into(), None)]
    );
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == Value::String(kind.into()))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// `v` with the value of every `key` in it (a label) set to `value`.
fn relabel(v: &Value, key: &str, value: &str) -> Value {
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| {
                    let v = if k.as_str() == Some(key) {
                        Value::String(value.into())
                    } else {
                        relabel(v, key, value)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Sequence(list) => {
            Value::Sequence(list.iter().map(|v| relabel(v, key, value)).collect())
        }
        other => other.clone(),
    }
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
    let kinds_of = |file: &str| -> Vec<String> {
        yaml_docs(file)
            .iter()
            .map(|d| s(&d["kind"], "kind").to_string())
            .collect()
    };
    assert_eq!(kinds_of(K8S_CONFIG), ["ConfigMap"]);
    assert_eq!(
        kinds_of(K8S),
        ["Deployment", "Service", "Service", "PodDisruptionBudget"]
    );
    assert_eq!(
        kinds_of(K8S_STS),
        [
            "Service",
            "StatefulSet",
            "Service",
            "Service",
            "PodDisruptionBudget"
        ]
    );
    for file in k8s_files() {
        for d in yaml_docs(&file) {
            assert!(
                d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
                "{file}: {d:?}"
            );
            assert!(
                file == K8S_SECRET || d["kind"] != Value::String("Secret".into()),
                "{file}: no Secret in a manifest that is re-applied: it would overwrite the real one"
            );
        }
    }
    let docs = yaml_docs(K8S);
    let config_docs = yaml_docs(K8S_CONFIG);
    let config_map = by_kind(&config_docs, "ConfigMap");
    let secret_docs = yaml_docs(K8S_SECRET);
    let secret = by_kind(&secret_docs, "Secret");
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
    let ports = seq(&container["ports"]);
    let port = &ports[0];
    let listen_port = settings.listen_addr().unwrap().port();
    assert_eq!(port["containerPort"].as_u64(), Some(u64::from(listen_port)));
    // Probes and the scrape on server.admin_listen, the webhook alone on listen.
    let admin_port = settings
        .admin_addr()
        .unwrap()
        .expect("the manifests set server.admin_listen")
        .port();
    let admin = ports
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(u64::from(admin_port)))
        .expect("the admin port is a container port");
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        Value::String(admin_port.to_string())
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(s(&get["path"], "path"), path, "{probe}");
        assert_eq!(get["port"], admin["name"], "{probe} port");
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
    // The Service behind the Ingress carries the webhook port only.
    assert_eq!(seq(&service["spec"]["ports"]).len(), 1);
    assert_eq!(
        seq(&service["spec"]["ports"])[0]["targetPort"],
        port["name"]
    );
    let admin_service = docs
        .iter()
        .find(|d| {
            d["kind"] == Value::String("Service".into())
                && d["metadata"]["name"] == Value::String("pusher-bridge-admin".into())
        })
        .expect("a Service for the admin port");
    assert!(labels_match(
        &admin_service["spec"]["selector"],
        &pod["metadata"]["labels"]
    ));
    assert_eq!(
        seq(&admin_service["spec"]["ports"])[0]["targetPort"],
        admin["name"]
    );
    assert!(labels_match(
        &pdb["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    assert!(
        pdb["spec"]["minAvailable"].as_u64().unwrap()
            < deployment["spec"]["replicas"].as_u64().unwrap()
    );

    // The StatefulSet alternative runs the very same pod (its `workload` label aside), with a
    // claim per pod for the spool, and the Service and PodDisruptionBudget of the Deployment's
    // file under the same names, for its own pods.
    let sts_docs = yaml_docs(K8S_STS);
    let headless = by_kind(&sts_docs, "Service");
    let sts = by_kind(&sts_docs, "StatefulSet");
    assert_eq!(headless["spec"]["clusterIP"], Value::String("None".into()));
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    let sts_labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert_eq!(sts_labels["workload"], Value::String("statefulset".into()));
    assert_eq!(
        pod["metadata"]["labels"]["workload"],
        Value::String("deployment".into())
    );
    let sts = relabel(sts, "workload", "deployment");
    assert_eq!(sts["spec"]["template"]["metadata"], pod["metadata"]);
    let sts_service = sts_docs
        .iter()
        .find(|d| {
            d["kind"] == Value::String("Service".into()) && !d["spec"]["clusterIP"].is_string()
        })
        .expect("the StatefulSet's Service");
    let sts_pdb = by_kind(&sts_docs, "PodDisruptionBudget");
    for (mine, theirs) in [(sts_service, service), (sts_pdb, pdb)] {
        assert_eq!(
            relabel(mine, "workload", "deployment"),
            *theirs,
            "the StatefulSet's {:?} differs from the Deployment's",
            mine["kind"]
        );
    }
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

/// Every YAML file of `deploy/kubernetes/`, sorted.
fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("deploy/kubernetes/{n}"))
        .collect();
    files.sort();
    files
}

/// The Kubernetes part of each document that tells how to deploy: (document, text).
fn k8s_docs() -> Vec<(&'static str, String)> {
    let readme = read("README.md");
    let operations = read("docs/operations.md");
    vec![
        (
            "README.md",
            markdown_part(&readme, "**Kubernetes.**", "**Scaling out.**").to_string(),
        ),
        (
            "docs/operations.md",
            markdown_part(&operations, "### Kubernetes", "### ").to_string(),
        ),
    ]
}

/// The crate's version, as Cargo.toml says.
fn crate_version() -> String {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["package"]["version"].as_str().unwrap().to_string()
}

/// The manifests run the image of this version (`pusher-bridge:<Cargo.toml's version>`), and
/// never pull it when a node has it (`:latest` would always pull, so an image loaded into kind or
/// minikube could not start). The docs build that very tag and load it into the cluster before
/// the manifests are applied. Issue 22.
#[test]
fn kubernetes_image_is_the_crate_version_loaded_not_pulled() {
    let image = format!("pusher-bridge:{}", crate_version());
    let mut containers = 0;
    let mut workload_files = BTreeSet::new();
    for file in k8s_files() {
        for doc in yaml_docs(&file) {
            let spec = &doc["spec"]["template"]["spec"];
            for c in seq(&spec["containers"])
                .into_iter()
                .chain(seq(&spec["initContainers"]))
            {
                containers += 1;
                workload_files.insert(file.clone());
                let name = s(&c["name"], "container");
                assert_eq!(s(&c["image"], "image"), image, "{file}: {name}");
                assert_eq!(
                    c["imagePullPolicy"],
                    Value::String("IfNotPresent".into()),
                    "{file}: {name}"
                );
            }
        }
    }
    assert!(containers >= 2, "{containers} containers");

    for (doc, part) in k8s_docs() {
        for stale in part
            .match_indices("pusher-bridge:")
            .map(|(i, _)| &part[i..])
        {
            let tag: String = stale["pusher-bridge:".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || ".-_".contains(*c))
                .collect();
            if tag.starts_with(|c: char| c.is_ascii_digit()) || tag == "latest" {
                assert_eq!(format!("pusher-bridge:{tag}"), image, "{doc}");
            }
        }
        let commands = shell_commands(&part);
        let at = |what: &str, found: &dyn Fn(&[String]) -> bool| {
            commands
                .iter()
                .position(|c| found(c))
                .unwrap_or_else(|| panic!("{doc}: no `{what}` in {commands:?}"))
        };
        let words = |c: &[String], want: &[&str]| c.windows(want.len()).any(|w| w == want);
        let built = at(&format!("docker build -t {image} ."), &|c| {
            c.starts_with(&["docker".into(), "build".into()])
                && words(c, &["-t", &image])
                && c.last().unwrap() == "."
        });
        let loaded = at(&format!("kind load docker-image {image}"), &|c| {
            words(c, &["kind", "load", "docker-image", &image])
        });
        assert!(built < loaded, "{doc}: loaded before it is built");
        assert!(
            part.contains(&format!("minikube image load {image}")),
            "{doc}: says nothing of minikube"
        );
        let applied = at("kubectl apply of a workload", &|c| {
            c.starts_with(&["kubectl".into(), "apply".into()])
                && c.iter().any(|w| workload_files.contains(w))
        });
        assert!(
            loaded < applied,
            "{doc}: applied before the image is loaded"
        );
    }
}

/// The Kubernetes commands of README.md and docs/operations.md, run in the order given on a
/// model of a cluster (`Cluster`: what kubectl would refuse panics), for each way they offer:
/// the Deployment (the commands before the StatefulSet's), the StatefulSet alone (every command
/// but the Deployment's apply) and the StatefulSet after the Deployment (all of them). Each ends
/// with its one workload and nothing missing: the namespace exists before anything goes in it,
/// every ConfigMap, Secret and Service a workload names exists, every Service and
/// PodDisruptionBudget takes the pods of exactly that workload. The StatefulSet's files hold no
/// Deployment (re-applying them cannot bring it back), and neither variant's selectors take the
/// other's pods. Issue 22.
#[test]
fn kubernetes_docs_deploy_each_variant_whole_and_apart() {
    let applies = |c: &[String], file: &str| {
        c.starts_with(&["kubectl".into(), "apply".into()]) && c.iter().any(|w| w.ends_with(file))
    };
    let mut files_of: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (doc, part) in k8s_docs() {
        let commands = shell_commands(&part);
        let variants: [(&str, Vec<&Vec<String>>, &str, &str); 3] = [
            (
                "the Deployment",
                commands
                    .iter()
                    .take_while(|c| !applies(c, "statefulset.yaml"))
                    .collect(),
                "Deployment",
                "StatefulSet",
            ),
            (
                "the StatefulSet alone",
                commands
                    .iter()
                    .filter(|c| !applies(c, "deployment.yaml"))
                    .collect(),
                "StatefulSet",
                "Deployment",
            ),
            (
                "the StatefulSet after the Deployment",
                commands.iter().collect(),
                "StatefulSet",
                "Deployment",
            ),
        ];
        for (variant, commands, kept, gone) in variants {
            let mut cluster = Cluster::default();
            for c in &commands {
                cluster.run(c);
            }
            let what = format!("{doc}, {variant}");
            assert_eq!(cluster.of_kind(kept).len(), 1, "{what}: {cluster:#?}");
            assert!(cluster.of_kind(gone).is_empty(), "{what}: a {gone} is left");
            let problems = cluster.problems();
            assert!(problems.is_empty(), "{what}: {problems:#?}");
            let files: BTreeSet<String> = cluster.applied_files.iter().cloned().collect();
            if variant.contains("after") {
                continue;
            }
            let previous = files_of.insert(kept, files.clone());
            assert!(
                previous.is_none_or(|p| p == files),
                "README.md and docs/operations.md apply different files for {variant}"
            );
            if kept == "StatefulSet" {
                for file in &files {
                    assert!(
                        yaml_docs(file)
                            .iter()
                            .all(|d| d["kind"] != Value::String("Deployment".into())),
                        "{what}: {file} holds a Deployment"
                    );
                }
            }
        }
    }

    // Apart: no selector of one variant's files takes the pods of the other's.
    let docs_of = |variant: &str| -> Vec<Value> {
        files_of[variant]
            .iter()
            .flat_map(|f| yaml_docs(f))
            .collect()
    };
    let (deployment, statefulset) = (docs_of("Deployment"), docs_of("StatefulSet"));
    let pods = |docs: &[Value]| -> Vec<Value> {
        docs.iter()
            .filter(|d| d["spec"]["template"]["metadata"]["labels"].is_mapping())
            .map(|d| d["spec"]["template"]["metadata"]["labels"].clone())
            .collect()
    };
    let selectors = |docs: &[Value]| -> Vec<(String, Value)> {
        docs.iter()
            .filter_map(|d| {
                let sel = match s(&d["kind"], "kind") {
                    "Service" => d["spec"]["selector"].clone(),
                    "Deployment" | "StatefulSet" | "PodDisruptionBudget" => {
                        d["spec"]["selector"]["matchLabels"].clone()
                    }
                    _ => return None,
                };
                Some((
                    format!("{} {:?}", s(&d["kind"], "kind"), d["metadata"]["name"]),
                    sel,
                ))
            })
            .collect()
    };
    for (mine, theirs, other) in [
        (&deployment, &statefulset, "StatefulSet"),
        (&statefulset, &deployment, "Deployment"),
    ] {
        for (what, sel) in selectors(mine) {
            for labels in pods(theirs) {
                assert!(
                    !selects(&sel, &labels),
                    "{what} would take the pods of the {other} ({labels:?})"
                );
            }
        }
    }
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
    // The image's binary is stripped (symbols and line tables are most of its size).
    assert!(
        build.args.contains("install -D -s ") || build.args.contains("strip "),
        "the binary is not stripped: {}",
        build.args
    );

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

/// What git ignores (builds, virtualenvs, node_modules, profiles, local secrets) and the tool
/// caches anywhere in the tree stay out of the build context: `COPY . .` would send them to the
/// builder (hundreds of MB) and into its cache. Issue 22.
#[test]
fn dockerignore_leaves_out_what_git_ignores_and_tool_caches() {
    let rules = dockerignore(&read(".dockerignore"));
    let mut unwanted = gitignored_samples(&read(".gitignore"));
    assert!(unwanted.len() > 10, "{unwanted:?}");
    for path in [
        ".git/objects/pack/x.pack",
        "target/release/pusher-bridge",
        ".venv/bin/python",
        "examples/python/.venv/lib/python3.11/site-packages/nats/aio.py",
        "bench/.venv/bin/python",
        "node_modules/nats/package.json",
        "examples/node/node_modules/nats/package.json",
        "tests/sdk/node_modules/pusher/package.json",
        "tests/sdk/venv/bin/python",
        "tests/sdk/__pycache__/query.cpython-311.pyc",
        "deploy/compose/bridge.local.env",
    ] {
        unwanted.push(path.to_string());
    }
    let sent: Vec<&String> = unwanted.iter().filter(|p| !ignored(&rules, p)).collect();
    assert!(
        sent.is_empty(),
        ".dockerignore sends these to the builder: {sent:?}"
    );
    // What the build reads stays: the crate, and every target Cargo.toml names (cargo refuses a
    // manifest whose explicit target is missing, even when it builds another).
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".into(),
        "src/main.rs".into(),
        "src/lib.rs".into(),
    ];
    for (kind, dir) in [
        ("bin", "src/bin"),
        ("example", "examples"),
        ("bench", "benches"),
    ] {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let name = target["name"].as_str().unwrap();
            let path = match target.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None if repo(&format!("{dir}/{name}.rs")).exists() => format!("{dir}/{name}.rs"),
                None => format!("{dir}/{name}/main.rs"),
            };
            assert!(repo(&path).exists(), "{kind} {name}: {path} missing");
            needed.push(path);
        }
    }
    assert!(needed.len() > 4, "{needed:?}");
    for path in &needed {
        assert!(
            !ignored(&rules, path),
            "{path} is left out of the build context"
        );
    }
}

#[test]
fn dockerignore_matching_follows_docker() {
    let rules = dockerignore("target/\n.git\ndeploy/*\n!deploy/a.toml\n*.md\n**/.venv\n");
    assert!(ignored(&rules, "target/release/x"));
    assert!(ignored(&rules, ".git/HEAD"));
    assert!(ignored(&rules, "deploy/b.yml"));
    assert!(!ignored(&rules, "deploy/a.toml"));
    assert!(ignored(&rules, "README.md"));
    assert!(!ignored(&rules, "docs/README.md"));
    assert!(!ignored(&rules, "src/main.rs"));
    assert!(ignored(&rules, ".venv/bin/python"));
    assert!(ignored(&rules, "examples/python/.venv/bin/python"));
    assert!(!ignored(&rules, "examples/python/venv.py"));
    let rules = dockerignore("a/**/b\n");
    assert!(ignored(&rules, "a/b/c"));
    assert!(ignored(&rules, "a/x/y/b"));
    assert!(!ignored(&rules, "x/a/b"));
}

#[test]
fn shell_commands_are_read_as_the_shell_and_markdown_read_them() {
    let md = "Text\n    not code: it continues the paragraph\n\n    kubectl apply -n ns \\\n      -f 'a b.yaml'   # a comment\n    echo \"x \\\"y\\\"\" z\\ w\n\n- item\n    continued item\n";
    assert_eq!(
        shell_commands(md),
        [
            vec!["kubectl", "apply", "-n", "ns", "-f", "a b.yaml"],
            vec!["echo", "x \"y\"", "z w"],
        ]
    );
}
