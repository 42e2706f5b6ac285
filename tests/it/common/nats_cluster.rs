//! A private 3-node `nats-server` cluster on free ports, for the tests of failover: each node
//! with JetStream, its own store directory and monitoring port, routes to the others. The
//! helper waits for the JetStream meta leader, finds a stream's leader (`$JS.API.STREAM.INFO`
//! `cluster.leader`), and kills (SIGKILL), stops (SIGTERM) and restarts nodes on their ports
//! and stores.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use tokio::time::Instant;

use super::{server_port, unique};

/// One node: its name, ports, store and process.
pub struct ClusterNode {
    /// `-n`, the server name that stream infos report as leader.
    pub name: String,
    /// Client port.
    pub port: u16,
    /// Route (cluster) port.
    pub route_port: u16,
    /// HTTP monitoring port (`/jsz`).
    pub monitor_port: u16,
    /// Store directory.
    pub dir: PathBuf,
    child: Option<Child>,
}

/// Three clustered `nats-server` processes.
pub struct NatsCluster {
    /// `--cluster_name`.
    pub name: String,
    /// The nodes, in start order.
    pub nodes: Vec<ClusterNode>,
}

/// How long the cluster may take to elect a leader (meta group or stream) on a loaded machine:
/// NATS 2.9's Raft election timeout alone is 4 to 9 s after a leader dies.
pub const ELECTION_WAIT: Duration = Duration::from_secs(40);

impl NatsCluster {
    /// Starts a 3-node cluster and waits until every node accepts clients and a meta leader is
    /// elected.
    pub async fn start() -> Self {
        let name = unique("pbc");
        let nodes = (0..3)
            .map(|i| ClusterNode {
                name: format!("{name}-n{i}"),
                port: server_port(),
                route_port: server_port(),
                monitor_port: server_port(),
                dir: std::env::temp_dir().join(unique(&format!("nats-cluster-n{i}"))),
                child: None,
            })
            .collect();
        let mut cluster = Self { name, nodes };
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait_listening(i).await;
        }
        cluster.wait_meta_leader().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let routes = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.route_port))
            .collect::<Vec<_>>()
            .join(",");
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let node = &mut self.nodes[i];
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .args(["-js", "-sd"])
            .arg(&node.dir)
            .args(["-n", &node.name, "--cluster_name", &self.name])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.route_port),
            ])
            .args(["--routes", &routes])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(node.dir.with_extension("log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("nats-server runs");
        node.child = Some(child);
    }

    async fn wait_listening(&self, i: usize) {
        let port = self.nodes[i].port;
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log =
            std::fs::read_to_string(self.nodes[i].dir.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        panic!("cluster node {i} did not start; its last lines: {tail:?}");
    }

    /// `nats://` URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every node's URL, comma-separated (what `broker.nats.url` takes).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A JetStream context of the test itself, connected to any node (reconnecting to the others).
    pub async fn jetstream(&self) -> jetstream::Context {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.url(i)).collect();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .expect("connect to the cluster");
        jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client)
    }

    /// The meta leader as a running node's `/jsz` reports it.
    pub async fn meta_leader(&self) -> Option<String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let Some((200, body)) = super::process::http_get(n.monitor_port, "/jsz").await else {
                continue;
            };
            let jsz: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(leader) = jsz["meta_cluster"]["leader"].as_str()
                && !leader.is_empty()
            {
                return Some(leader.to_string());
            }
        }
        None
    }

    /// Waits (up to [`ELECTION_WAIT`]) until a meta leader is elected and the JetStream API
    /// answers through node 0's peers.
    pub async fn wait_meta_leader(&self) -> String {
        let deadline = Instant::now() + ELECTION_WAIT;
        loop {
            if let Some(leader) = self.meta_leader().await {
                return leader;
            }
            assert!(Instant::now() < deadline, "no meta leader elected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader of `stream` as `$JS.API.STREAM.INFO` reports it (None during an election).
    pub async fn stream_leader(&self, js: &jetstream::Context, stream: &str) -> Option<String> {
        let mut s = tokio::time::timeout(Duration::from_secs(1), js.get_stream(stream))
            .await
            .ok()?
            .ok()?;
        let info = tokio::time::timeout(Duration::from_secs(1), s.info())
            .await
            .ok()?
            .ok()?;
        info.cluster.as_ref()?.leader.clone()
    }

    /// Waits until `stream` has a leader and every replica is current; returns the leader's
    /// node index.
    pub async fn wait_stream_healthy(&self, js: &jetstream::Context, stream: &str) -> usize {
        let deadline = Instant::now() + ELECTION_WAIT;
        loop {
            if let Some(i) = self.healthy_leader(js, stream).await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream} has no leader with current replicas"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `stream` has a leader on a running node (its other replicas may be down);
    /// returns the leader's node index.
    pub async fn wait_stream_leader(&self, js: &jetstream::Context, stream: &str) -> usize {
        let deadline = Instant::now() + ELECTION_WAIT;
        loop {
            if let Some(i) = self
                .stream_leader(js, stream)
                .await
                .and_then(|name| self.index_of(&name))
                && self.is_running(i)
            {
                return i;
            }
            assert!(Instant::now() < deadline, "stream {stream} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthy_leader(&self, js: &jetstream::Context, stream: &str) -> Option<usize> {
        let mut s = tokio::time::timeout(Duration::from_secs(1), js.get_stream(stream))
            .await
            .ok()?
            .ok()?;
        let info = tokio::time::timeout(Duration::from_secs(1), s.info())
            .await
            .ok()?
            .ok()?;
        let cluster = info.cluster.as_ref()?;
        let leader = cluster.leader.as_ref()?;
        let want_peers = info.config.num_replicas.saturating_sub(1);
        let current = cluster
            .replicas
            .iter()
            .filter(|p| p.current && !p.offline)
            .count();
        (current >= want_peers).then(|| self.index_of(leader))?
    }

    /// The node index of server `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` (its store stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops node `i` gracefully (SIGTERM) and waits for it to exit.
    pub async fn stop(&mut self, i: usize) {
        let Some(mut c) = self.nodes[i].child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..200 {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Starts node `i` again on its ports and store and waits until it accepts clients.
    pub async fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "node {i} still runs");
        self.spawn(i);
        self.wait_listening(i).await;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.nodes[i].dir);
            let _ = std::fs::remove_file(self.nodes[i].dir.with_extension("log"));
        }
    }
}
