//! A private 3-node RabbitMQ cluster on this host, for the failover test of quorum queues:
//! each node with its own node name (`<tag>-n<i>@localhost`), AMQP and distribution ports,
//! config file, data and log directories, all under one temporary directory owned by the
//! `rabbitmq` user (whose Erlang cookie the nodes and `rabbitmqctl` share). Nodes 2 and 3 join
//! node 1. A node is killed with SIGKILL (its pid file names the Erlang VM) and restarted on the
//! same ports and data, so it rejoins as the same member.
//!
//! Needs root and Debian's `rabbitmq-server` package (as on this project's machines);
//! [`RabbitCluster::start`] returns `None` when they are missing, and the test says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{server_port, unique};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// One node: its name, ports, directory and the process that runs it.
pub struct RabbitNode {
    /// `-n` for `rabbitmqctl`, and what `leader` reports.
    pub name: String,
    /// AMQP port.
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Three clustered RabbitMQ nodes.
pub struct RabbitCluster {
    /// The nodes; node 0 is the one the others joined.
    pub nodes: Vec<RabbitNode>,
    root: PathBuf,
}

/// How long a node may take to start (or rejoin) on a loaded 2-core machine.
const START_WAIT: Duration = Duration::from_secs(90);

fn rabbitmqctl(node: &str, args: &[&str]) -> std::process::Output {
    Command::new("rabbitmqctl")
        .arg("-n")
        .arg(node)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl runs")
}

impl RabbitCluster {
    /// Starts three nodes and clusters them; `None` (said in a NOTICE line) when this machine
    /// cannot (not root, no RabbitMQ installed).
    pub async fn start() -> Option<Self> {
        Self::start_nodes(3).await
    }

    /// Starts `n` nodes (the second and later join the first).
    pub async fn start_nodes(n: usize) -> Option<Self> {
        Self::start_nodes_with(n, "").await
    }

    /// Starts `n` nodes with `conf` added to each node's `rabbitmq.conf` (lines of
    /// `key = value`).
    pub async fn start_nodes_with(n: usize, conf: &str) -> Option<Self> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        let has_user = Command::new("id")
            .arg("rabbitmq")
            .output()
            .is_ok_and(|o| o.status.success());
        if !is_root || !has_user || !Path::new(SERVER).exists() {
            println!(
                "NOTICE: no root or no rabbitmq-server here: a test on private RabbitMQ nodes \
                 checked nothing"
            );
            return None;
        }
        let tag = unique("pbr");
        let root = std::env::temp_dir().join(&tag);
        let nodes = (0..n)
            .map(|i| RabbitNode {
                name: format!("{tag}-n{i}@localhost"),
                port: server_port(),
                dist_port: server_port(),
                dir: root.join(format!("n{i}")),
                child: None,
            })
            .collect::<Vec<_>>();
        for n in &nodes {
            std::fs::create_dir_all(&n.dir).unwrap();
            std::fs::write(
                n.dir.join("rabbitmq.conf"),
                format!("listeners.tcp.local = 127.0.0.1:{}\n{conf}", n.port),
            )
            .unwrap();
            std::fs::write(n.dir.join("env.conf"), "ERL_EPMD_ADDRESS=127.0.0.1\n").unwrap();
            std::fs::write(n.dir.join("enabled_plugins"), "[].\n").unwrap();
        }
        let chown = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&root)
            .status()
            .expect("chown runs");
        assert!(chown.success());
        let mut cluster = Self { nodes, root };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.await_startup(i).await;
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..n {
            let name = cluster.nodes[i].name.clone();
            tokio::task::block_in_place(|| {
                for args in [
                    vec!["stop_app"],
                    vec!["join_cluster", first.as_str()],
                    vec!["start_app"],
                ] {
                    let out = rabbitmqctl(&name, &args);
                    assert!(
                        out.status.success(),
                        "rabbitmqctl {args:?} on {name}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
        Some(cluster)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    fn spawn(&mut self, i: usize) {
        let n = &self.nodes[i];
        let d = n.dir.display();
        let script = format!(
            "cd /var/lib/rabbitmq; \
             RABBITMQ_NODENAME={name} RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist} \
             RABBITMQ_CONF_ENV_FILE={d}/env.conf RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf \
             RABBITMQ_MNESIA_BASE={d}/mnesia RABBITMQ_LOG_BASE={d}/log \
             RABBITMQ_ENABLED_PLUGINS_FILE={d}/enabled_plugins RABBITMQ_PID_FILE={d}/pid \
             ERL_FLAGS='-kernel inet_dist_use_interface {{127,0,0,1}}' exec {SERVER}",
            name = n.name,
            port = n.port,
            dist = n.dist_port,
        );
        let log = std::fs::File::create(n.dir.join("server.out")).unwrap();
        let child = Command::new("su")
            .args(["rabbitmq", "-s", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server starts");
        self.nodes[i].child = Some(child);
    }

    async fn await_startup(&self, i: usize) {
        let deadline = Instant::now() + START_WAIT;
        let name = self.nodes[i].name.clone();
        loop {
            let ok = tokio::task::block_in_place(|| {
                rabbitmqctl(&name, &["-q", "await_startup", "--timeout", "5"])
                    .status
                    .success()
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {name} did not start; see {}",
                self.nodes[i].dir.join("server.out").display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The node index of the leader of quorum queue `queue` (`rabbitmqctl list_queues` asked
    /// of node `ask`), once there is one on a running node.
    pub async fn queue_leader(&self, ask: usize, queue: &str) -> usize {
        let deadline = Instant::now() + START_WAIT;
        loop {
            let out = tokio::task::block_in_place(|| {
                rabbitmqctl(
                    &self.nodes[ask].name,
                    &["-q", "list_queues", "name", "leader", "--no-table-headers"],
                )
            });
            let text = String::from_utf8_lossy(&out.stdout);
            let leader = text.lines().find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(queue))
                    .then(|| cols.next())
                    .flatten()
                    .and_then(|name| self.nodes.iter().position(|n| n.name == name))
            });
            if let Some(i) = leader
                && self.is_running(i)
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader for {queue}: {text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether node `i` runs (as far as this helper knows).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i`'s Erlang VM (named by its pid file).
    pub fn kill(&mut self, i: usize) {
        let pid_file = self.nodes[i].dir.join("pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(pid_file);
    }

    /// Starts node `i` again on its ports and data and waits until it runs.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.await_startup(i).await;
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
