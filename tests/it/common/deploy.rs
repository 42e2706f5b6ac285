//! Reading the deploy files the way their tools do: the compose file and Kubernetes manifests
//! (YAML), env files, the Dockerfile (instructions and `.dockerignore`), and the metric names a
//! PromQL expression mentions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Reads a repository file (panics naming it when missing).
pub fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One YAML document.
pub fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a multi-document YAML file.
pub fn yaml_docs(path: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// A YAML string (panics with the context when it is not one).
pub fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

/// A YAML sequence (empty when absent).
pub fn seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

/// `KEY=value` lines of an env file (compose `env_file`), comments and blanks skipped.
pub fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {l}"));
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// A compose service's `environment` (map or `KEY=value` list).
pub fn compose_environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                };
                (s(k, "environment key").to_string(), v)
            })
            .collect(),
        Value::Sequence(list) => list
            .iter()
            .map(|e| {
                let (k, v) = s(e, "environment entry").split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A compose value with its `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$` replaced as
/// Compose does, the variables looked up in `vars` (Compose's shell environment and `.env`).
pub fn compose_interpolate(value: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        if let Some(after) = tail.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix('{') {
            let end = inner
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {value}"));
            let (name, default) = compose_variable(&inner[..end]);
            let set = vars.get(&name).filter(|v| !(v.is_empty() && default.0));
            out.push_str(set.map_or(default.1.as_deref().unwrap_or(""), |v| v.as_str()));
            rest = &inner[end + 1..];
        } else {
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.push_str(vars.get(&tail[..end]).map_or("", |v| v.as_str()));
            rest = &tail[end..];
        }
    }
    out.push_str(rest);
    out
}

/// The variables a compose value refers to, each with its default (`None` when it has none).
pub fn compose_variables(value: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        let inner = &rest[i + 2..];
        let end = inner.find('}').unwrap_or(inner.len());
        let (name, (_, default)) = compose_variable(&inner[..end]);
        out.push((name, default));
        rest = &inner[end..];
    }
    out
}

/// `VAR`, `VAR:-default` or `VAR-default`: the name, and (whether an empty value takes the
/// default too, the default).
fn compose_variable(inner: &str) -> (String, (bool, Option<String>)) {
    if let Some((name, default)) = inner.split_once(":-") {
        (name.to_string(), (true, Some(default.to_string())))
    } else if let Some((name, default)) = inner.split_once('-') {
        (name.to_string(), (false, Some(default.to_string())))
    } else {
        (inner.to_string(), (false, None))
    }
}

/// A compose service's volumes as (source, container path).
fn compose_volumes(service: &Value) -> Vec<(String, String)> {
    seq(&service["volumes"])
        .iter()
        .filter_map(|v| {
            let (src, rest) = s(v, "volume").split_once(':')?;
            let dst = rest.split(':').next()?;
            Some((src.to_string(), dst.to_string()))
        })
        .collect()
}

/// A compose service's bind mounts as (host path in the repo, container path).
pub fn compose_binds(service: &Value) -> Vec<(PathBuf, String)> {
    compose_volumes(service)
        .into_iter()
        .filter_map(|(src, dst)| Some((repo(src.strip_prefix("./")?), dst)))
        .collect()
}

/// A compose service's named volumes as (volume, container path).
pub fn compose_named_volumes(service: &Value) -> Vec<(String, String)> {
    compose_volumes(service)
        .into_iter()
        .filter(|(src, _)| !src.starts_with('.') && !src.starts_with('/'))
        .collect()
}

/// The host file behind `container_path` among `binds` (exact file or inside a mounted dir).
pub fn host_path(binds: &[(PathBuf, String)], container_path: &str) -> Option<PathBuf> {
    binds.iter().find_map(|(src, dst)| {
        if container_path == dst {
            Some(src.clone())
        } else {
            container_path
                .strip_prefix(&format!("{}/", dst.trim_end_matches('/')))
                .map(|rest| src.join(rest))
        }
    })
}

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuation lines joined.
#[derive(Debug, Clone)]
pub struct Instruction {
    /// `FROM`, `COPY`, `RUN`, ...
    pub keyword: String,
    /// Everything after the keyword.
    pub args: String,
}

/// The Dockerfile's instructions in order (comments and parser directives dropped).
pub fn dockerfile(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.split_whitespace().collect::<Vec<_>>().join(" "),
        });
        current.clear();
    }
    out
}

/// The words of an exec-form (`["a", "b"]`) or shell-form instruction argument.
pub fn exec_form(args: &str) -> Vec<String> {
    if args.trim_start().starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("bad exec form {args}: {e}"))
    } else {
        args.split_whitespace().map(String::from).collect()
    }
}

/// `.dockerignore` rules: (pattern, is_exception), in order.
pub fn dockerignore(text: &str) -> Vec<(String, bool)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.strip_prefix('!') {
            Some(p) => (p.trim_matches('/').to_string(), true),
            None => (l.trim_matches('/').to_string(), false),
        })
        .collect()
}

fn glob(pattern: &str, path: &str) -> bool {
    let (p, t): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    glob_segments(&p, &t)
}

/// Segment by segment; `**` stands for any number of segments, none included (Docker's rule).
fn glob_segments(p: &[&str], t: &[&str]) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some(&"**") => glob_segments(&p[1..], t) || (!t.is_empty() && glob_segments(p, &t[1..])),
        Some(seg) => {
            !t.is_empty()
                && glob_segment(seg.as_bytes(), t[0].as_bytes())
                && glob_segments(&p[1..], &t[1..])
        }
    }
}

/// Paths that a `.gitignore` pattern ignores, one or two per pattern (`*` filled in): at the
/// root for an anchored pattern (a `/` before its end), else at the root and deeper down.
/// Negated patterns give none.
pub fn gitignored_samples(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let pattern = line.trim_end_matches('/');
        let anchored = pattern.contains('/');
        let path = pattern.trim_start_matches('/').replace('*', "sample");
        out.push(format!("{path}/file"));
        if !anchored {
            out.push(format!("some/dir/{path}"));
        }
    }
    out
}

fn glob_segment(p: &[u8], t: &[u8]) -> bool {
    match (p.first(), t.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_segment(&p[1..], t) || (!t.is_empty() && glob_segment(p, &t[1..])),
        (Some(b'?'), Some(_)) => glob_segment(&p[1..], &t[1..]),
        (Some(a), Some(b)) if a == b => glob_segment(&p[1..], &t[1..]),
        _ => false,
    }
}

/// Whether `path` (relative to the context) is left out of the build context: the last rule
/// matching the path or one of its parent directories decides, as Docker does.
pub fn ignored(rules: &[(String, bool)], path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut result = false;
    for (pattern, exception) in rules {
        if (1..=parts.len()).any(|n| glob(pattern, &parts[..n].join("/"))) {
            result = !exception;
        }
    }
    result
}

/// Every `pusher_bridge_*` and `process_*` metric name in a PromQL expression (or any text), in
/// order.
pub fn metric_names(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found: Vec<(usize, String)> = Vec::new();
    for prefix in ["pusher_bridge_", "process_"] {
        for (i, _) in expr.match_indices(prefix) {
            if expr[..i].ends_with(ident) {
                continue;
            }
            let tail = &expr[i..];
            let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
            found.push((i, tail[..end].to_string()));
        }
    }
    found.sort();
    found.into_iter().map(|(_, name)| name).collect()
}

/// The sample names a `/metrics` exposition exports: every sample line's name, plus the names
/// each `# TYPE` line declares (a labelled family exports its TYPE before its first sample).
pub fn exported_samples(text: &str) -> BTreeMap<String, &'static str> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            };
            for n in names {
                out.insert(n, "type");
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string(), "sample");
        }
    }
    out
}

/// The family a sample name belongs to in `pusher_bridge::metrics::EXPORTED_NAMES`, if any
/// (histogram samples carry `_bucket` / `_sum` / `_count`).
pub fn exported_family(sample: &str) -> Option<&'static str> {
    let names = pusher_bridge::metrics::EXPORTED_NAMES;
    if let Some(n) = names.iter().find(|n| **n == sample) {
        return Some(n);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = sample.strip_suffix(suffix)?;
        names.iter().copied().find(|n| *n == base)
    })
}

/// The text of `markdown` from the line that starts with `start` to the next line that starts
/// with `end` (or to the end).
pub fn markdown_part<'a>(markdown: &'a str, start: &str, end: &str) -> &'a str {
    let from = markdown
        .find(&format!("\n{start}"))
        .unwrap_or_else(|| panic!("no line starting with {start:?}"))
        + 1;
    let rest = &markdown[from..];
    let to = rest[start.len()..]
        .find(&format!("\n{end}"))
        .map_or(rest.len(), |i| i + start.len() + 1);
    &rest[..to]
}

/// The commands of a Markdown text's indented code blocks (four spaces, after a blank line: an
/// indented line that continues a paragraph or list item is no code), in order, each split into
/// words as the shell does: `\` continuation lines joined, quotes removed, comments dropped.
pub fn shell_commands(markdown: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut current = String::new();
    let (mut after_blank, mut in_block) = (true, false);
    for line in markdown.lines() {
        if line.trim().is_empty() {
            after_blank = true;
            continue;
        }
        let code = line
            .strip_prefix("    ")
            .filter(|_| in_block || after_blank);
        after_blank = false;
        in_block = code.is_some();
        let Some(code) = code else {
            continue;
        };
        match code.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(code);
                let words = shell_words(&current);
                if !words.is_empty() {
                    out.push(words);
                }
                current.clear();
            }
        }
    }
    out
}

/// One command line split into words as the shell does (no expansions).
pub fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                word.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            '#' if !in_word => break,
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// What `kubectl` leaves in a cluster, for the commands the deploy docs use: namespaces, and the
/// objects of applied manifests and created Secrets. Panics, naming the command, where kubectl
/// would fail: a namespace that does not exist yet, an object created twice or deleted while
/// absent, a changed field the API server refuses to update (a workload's selector).
#[derive(Debug)]
pub struct Cluster {
    /// Existing namespaces.
    pub namespaces: BTreeSet<String>,
    /// Objects by (namespace, kind, name); cluster-scoped ones have namespace "".
    pub objects: BTreeMap<(String, String, String), Value>,
    /// Every manifest file applied, in order.
    pub applied_files: Vec<String>,
}

/// Kinds without a namespace (of those a manifest here may hold).
const CLUSTER_SCOPED: [&str; 4] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
];

impl Default for Cluster {
    fn default() -> Self {
        Self {
            namespaces: ["default", "kube-system", "kube-public"]
                .map(String::from)
                .into(),
            objects: BTreeMap::new(),
            applied_files: Vec::new(),
        }
    }
}

impl Cluster {
    /// Runs one command; anything but `kubectl` (docker, kind, minikube) leaves the cluster as it is.
    pub fn run(&mut self, command: &[String]) {
        if command.first().map(String::as_str) != Some("kubectl") {
            return;
        }
        let line = command.join(" ");
        let (mut args, mut namespace, mut files, mut literals, mut ignore_missing) =
            (Vec::new(), None, Vec::new(), Vec::new(), false);
        let mut words = command[1..].iter();
        while let Some(w) = words.next() {
            let (flag, inline) = match w.split_once('=') {
                Some((f, v)) if f.starts_with('-') => (f, Some(v.to_string())),
                _ => (w.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| words.next().cloned())
                    .unwrap_or_else(|| panic!("`{line}`: {flag} without a value"))
            };
            match flag {
                "-n" | "--namespace" => namespace = Some(value()),
                "-f" | "--filename" => files.push(value()),
                "--from-literal" => literals.push(value()),
                "--ignore-not-found" => ignore_missing = inline.as_deref() != Some("false"),
                f if f.starts_with('-') => {
                    panic!("`{line}`: the model does not know {f}: teach it")
                }
                _ => args.push(w.clone()),
            }
        }
        let ns = namespace.unwrap_or_else(|| "default".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args.as_slice() {
            ["apply"] => {
                assert!(!files.is_empty(), "`{line}`: nothing to apply");
                for file in files {
                    for doc in yaml_docs(&file) {
                        self.apply(doc, &ns, &line);
                    }
                    self.applied_files.push(file);
                }
            }
            ["create", "namespace" | "ns", name] => {
                assert!(
                    self.namespaces.insert(name.to_string()),
                    "`{line}`: namespace {name} exists"
                );
            }
            ["create", "secret", "generic", name] => {
                let mut data = serde_yaml::Mapping::new();
                for literal in &literals {
                    let (k, v) = literal.split_once('=').expect("--from-literal=KEY=value");
                    data.insert(k.into(), v.into());
                }
                let secret: Value = serde_yaml::from_str(&format!(
                    "{{apiVersion: v1, kind: Secret, metadata: {{name: {name}}}}}"
                ))
                .unwrap();
                let mut secret = secret;
                secret["stringData"] = Value::Mapping(data);
                let key = self.key("Secret", name, &ns, &line);
                assert!(
                    !self.objects.contains_key(&key),
                    "`{line}`: secret {name} exists"
                );
                self.objects.insert(key, secret);
            }
            ["delete", kind, name] => {
                let kind = match kind.to_ascii_lowercase().trim_end_matches('s') {
                    "deployment" | "deploy" => "Deployment",
                    "statefulset" | "st" => "StatefulSet",
                    "service" | "svc" => "Service",
                    "configmap" | "cm" => "ConfigMap",
                    "secret" => "Secret",
                    "poddisruptionbudget" | "pdb" => "PodDisruptionBudget",
                    other => panic!("`{line}`: the model does not know kind {other}"),
                };
                let key = self.key(kind, name, &ns, &line);
                assert!(
                    self.objects.remove(&key).is_some() || ignore_missing,
                    "`{line}`: {kind} {name} not found"
                );
            }
            ["rollout", "status" | "restart", target] => {
                let (kind, name) = target.split_once('/').expect("KIND/NAME");
                let kind = match kind {
                    "deployment" | "deploy" => "Deployment",
                    "statefulset" | "sts" => "StatefulSet",
                    other => panic!("`{line}`: the model does not know kind {other}"),
                };
                let key = self.key(kind, name, &ns, &line);
                assert!(self.objects.contains_key(&key), "`{line}`: not found");
            }
            ["get" | "logs" | "describe" | "port-forward" | "exec", ..] => {}
            other => panic!("`{line}`: the model does not know kubectl {other:?}"),
        }
    }

    /// The key of an object, checking that its namespace exists.
    fn key(&self, kind: &str, name: &str, ns: &str, line: &str) -> (String, String, String) {
        if CLUSTER_SCOPED.contains(&kind) {
            return (String::new(), kind.into(), name.into());
        }
        assert!(
            self.namespaces.contains(ns),
            "`{line}`: namespaces \"{ns}\" not found (create it first)"
        );
        (ns.into(), kind.into(), name.into())
    }

    fn apply(&mut self, doc: Value, ns: &str, line: &str) {
        let kind = s(&doc["kind"], "kind").to_string();
        let name = s(&doc["metadata"]["name"], "name").to_string();
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or(ns);
        let key = self.key(&kind, &name, ns, line);
        if let Some(old) = self.objects.get(&key) {
            let immutable: &[&str] = match kind.as_str() {
                "Deployment" => &["selector"],
                "StatefulSet" => &[
                    "selector",
                    "serviceName",
                    "volumeClaimTemplates",
                    "podManagementPolicy",
                ],
                _ => &[],
            };
            for field in immutable {
                assert_eq!(
                    old["spec"][*field], doc["spec"][*field],
                    "`{line}`: {kind} {name}: spec.{field} is immutable"
                );
            }
        }
        if kind == "Namespace" {
            self.namespaces.insert(name.clone());
        }
        self.objects.insert(key, doc);
    }

    /// The objects of one kind, as (namespace, object).
    pub fn of_kind(&self, kind: &str) -> Vec<(String, Value)> {
        self.objects
            .iter()
            .filter(|((_, k, _), _)| k == kind)
            .map(|((ns, _, _), v)| (ns.clone(), v.clone()))
            .collect()
    }

    /// Whether an object of `kind` named `name` exists in `ns`.
    pub fn has(&self, ns: &str, kind: &str, name: &str) -> bool {
        self.objects
            .contains_key(&(ns.to_string(), kind.to_string(), name.to_string()))
    }

    /// What does not hold together: a ConfigMap, Secret or governing Service a workload names
    /// that does not exist in its namespace, a Service or PodDisruptionBudget that selects the
    /// pods of no workload or of more than one, two workloads whose selectors take the same pods.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let workloads: Vec<(String, Value)> = ["Deployment", "StatefulSet", "DaemonSet"]
            .iter()
            .flat_map(|k| self.of_kind(k))
            .collect();
        let name = |v: &Value| {
            format!(
                "{} {}",
                s(&v["kind"], "kind"),
                s(&v["metadata"]["name"], "name")
            )
        };
        for (ns, w) in &workloads {
            let what = name(w);
            let pod = &w["spec"]["template"]["spec"];
            let mut needs: Vec<(&str, String)> = Vec::new();
            for v in seq(&pod["volumes"]) {
                if let Some(n) = v["configMap"]["name"].as_str() {
                    needs.push(("ConfigMap", n.into()));
                }
                if let Some(n) = v["secret"]["secretName"].as_str() {
                    needs.push(("Secret", n.into()));
                }
            }
            for c in seq(&pod["containers"])
                .iter()
                .chain(&seq(&pod["initContainers"]))
            {
                for from in seq(&c["envFrom"]) {
                    if let Some(n) = from["secretRef"]["name"].as_str() {
                        needs.push(("Secret", n.into()));
                    }
                    if let Some(n) = from["configMapRef"]["name"].as_str() {
                        needs.push(("ConfigMap", n.into()));
                    }
                }
                for e in seq(&c["env"]) {
                    if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                        needs.push(("Secret", n.into()));
                    }
                    if let Some(n) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                        needs.push(("ConfigMap", n.into()));
                    }
                }
            }
            if let Some(n) = w["spec"]["serviceName"].as_str() {
                needs.push(("Service", n.into()));
            }
            for (kind, n) in needs {
                if !self.has(ns, kind, &n) {
                    out.push(format!("{what} needs {kind} {n}, which {ns} lacks"));
                }
            }
            let labels = &w["spec"]["template"]["metadata"]["labels"];
            if !selects(&w["spec"]["selector"]["matchLabels"], labels) {
                out.push(format!("{what}: its selector misses its own pods"));
            }
            for (other_ns, other) in &workloads {
                if other_ns == ns
                    && !std::ptr::eq(other, w)
                    && selects(&other["spec"]["selector"]["matchLabels"], labels)
                {
                    out.push(format!("{} selects the pods of {what}", name(other)));
                }
            }
        }
        for (kind, selector) in [
            ("Service", &["spec", "selector"][..]),
            (
                "PodDisruptionBudget",
                &["spec", "selector", "matchLabels"][..],
            ),
        ] {
            for (ns, obj) in self.of_kind(kind) {
                let sel = selector.iter().fold(&obj, |v, k| &v[*k]);
                let taken: Vec<String> = workloads
                    .iter()
                    .filter(|(wns, w)| {
                        *wns == ns && selects(sel, &w["spec"]["template"]["metadata"]["labels"])
                    })
                    .map(|(_, w)| name(w))
                    .collect();
                if taken.len() != 1 {
                    out.push(format!("{} selects the pods of {taken:?}", name(&obj)));
                }
            }
        }
        out
    }
}

/// Whether a label selector (`matchLabels` or a Service's `selector`) takes pods with `labels`.
/// An empty or missing selector takes none here (a Service without one manages no endpoints).
pub fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[s(k, "label")] == *v))
}

/// `promtool` on the PATH, if installed (Debian package `prometheus`).
pub fn promtool() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    })
}
