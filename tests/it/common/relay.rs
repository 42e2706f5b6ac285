//! A TCP relay in front of the real RabbitMQ, for AMQP tests that need the broker to vanish,
//! come back, stop answering, or speak TLS, without touching the RabbitMQ that other
//! developers share: the bridge connects to the relay's port, the relay forwards every byte to
//! RabbitMQ.
//! - [`Relay::stop`] drops every relayed connection and stops listening (the broker "dies");
//!   [`Relay::restart`] listens again on the same port.
//! - [`Relay::freeze`] holds everything RabbitMQ sends (confirms never arrive).
//! - [`Relay::start_tls`] terminates TLS with the test certificate of `tests/fixtures/tls`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A relay on a local port.
pub struct Relay {
    /// Port the relay listens on.
    pub port: u16,
    target: SocketAddr,
    tls: Option<TlsAcceptor>,
    frozen: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

/// Where the tests' RabbitMQ listens (host and port of `AMQP_URL`).
pub fn rabbitmq_addr() -> SocketAddr {
    let url = super::amqp_url();
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("127.0.0.1:5672");
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let with_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5672")
    };
    use std::net::ToSocketAddrs;
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .expect("AMQP_URL host resolves")
}

/// Path of a file of `tests/fixtures/tls`.
pub fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn acceptor() -> TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_fixture("server.pem"))
            .expect("server.pem")
            .collect::<Result<_, _>>()
            .expect("server.pem parses");
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).expect("server.key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    TlsAcceptor::from(Arc::new(config))
}

impl Relay {
    /// A plain relay to RabbitMQ on a free port, listening.
    pub async fn start() -> Self {
        let mut r = Self::new(super::free_port(), None);
        r.restart().await;
        r
    }

    /// A relay on `port` that does not listen yet (call [`Relay::restart`]).
    pub fn on_port(port: u16) -> Self {
        Self::new(port, None)
    }

    /// A TLS-terminating relay to RabbitMQ on a free port, listening.
    pub async fn start_tls() -> Self {
        let mut r = Self::new(super::free_port(), Some(acceptor()));
        r.restart().await;
        r
    }

    fn new(port: u16, tls: Option<TlsAcceptor>) -> Self {
        Self {
            port,
            target: rabbitmq_addr(),
            tls,
            frozen: Arc::new(AtomicBool::new(false)),
            tasks: Arc::new(Mutex::new(Vec::new())),
            accept: None,
        }
    }

    /// Listens (again) on the relay's port.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("relay port is free");
        let (target, tls, frozen, tasks) = (
            self.target,
            self.tls.clone(),
            self.frozen.clone(),
            self.tasks.clone(),
        );
        self.accept = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (tls, frozen) = (tls.clone(), frozen.clone());
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    match tls {
                        Some(acceptor) => {
                            if let Ok(client) = acceptor.accept(client).await {
                                relay(client, server, frozen).await;
                            }
                        }
                        None => relay(client, server, frozen).await,
                    }
                });
                tasks.lock().unwrap().push(task);
            }
        }));
    }

    /// Drops every relayed connection and stops listening.
    pub fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// While frozen, nothing RabbitMQ sends reaches the client (it is held, not lost).
    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn relay<C>(client: C, server: TcpStream, frozen: Arc<AtomicBool>)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (server_r, server_w) = server.into_split();
    let up = pump(client_r, server_w, None);
    let down = pump(server_r, client_w, Some(frozen));
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump<R, W>(mut r: R, mut w: W, frozen: Option<Arc<AtomicBool>>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(f) = &frozen {
            while f.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}
