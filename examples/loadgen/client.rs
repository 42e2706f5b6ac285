//! The load itself: `connections` keep-alive HTTP/1.1 connections, each posting one signed
//! webhook after the other (closed loop), a warm-up and then a measured window, both bounded in
//! time and the whole run bounded in webhooks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::bodies::{Generator, Rng};
use crate::procfs;

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What to send and for how long.
#[derive(Clone)]
pub struct LoadSpec {
    /// The bridge.
    pub addr: SocketAddr,
    /// Webhook path.
    pub path: String,
    /// `X-Pusher-Key`.
    pub key: String,
    /// Signs the bodies.
    pub generator: Generator,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Unmeasured first part of the run.
    pub warmup: Duration,
    /// Measured part of the run.
    pub duration: Duration,
    /// Upper bound on webhooks over the whole run.
    pub max_webhooks: u64,
    /// The bridge's pid, for CPU time over the measured window.
    pub pid: u32,
    /// The broker server's pid, when known, for its CPU time over the measured window.
    pub broker_pid: Option<u32>,
}

/// Counts over the whole run and figures over the measured window.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Webhooks answered 2xx (whole run).
    pub webhooks_ok: u64,
    /// Events in those webhooks: what the broker must now hold.
    pub events_ok: u64,
    /// Answers that were not 2xx, by status (whole run).
    pub non_2xx: BTreeMap<u16, u64>,
    /// Requests without an answer (connection errors; whole run).
    pub errors: u64,
    /// The first such error, to show.
    pub first_error: Option<String>,
    /// Webhooks started and answered in the measured window.
    pub measured_webhooks: u64,
    /// Their events.
    pub measured_events: u64,
    /// Length of the measured window.
    pub measured: Duration,
    /// Sorted latencies of the measured webhooks, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Bridge CPU time (user + system) over the measured window.
    pub cpu: Option<Duration>,
    /// The broker server's CPU time over the measured window.
    pub broker_cpu: Option<Duration>,
    /// The load generator's own CPU time over the measured window.
    pub own_cpu: Option<Duration>,
}

impl LoadReport {
    /// Latency at quantile `q` (0..=1), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn merge(&mut self, w: WorkerTally) {
        self.webhooks_ok += w.webhooks_ok;
        self.events_ok += w.events_ok;
        for (s, n) in w.non_2xx {
            *self.non_2xx.entry(s).or_default() += n;
        }
        self.errors += w.errors;
        if self.first_error.is_none() {
            self.first_error = w.first_error;
        }
        self.measured_webhooks += w.measured_webhooks;
        self.measured_events += w.measured_events;
        self.latencies_us.extend(w.latencies_us);
    }
}

#[derive(Default)]
struct WorkerTally {
    webhooks_ok: u64,
    events_ok: u64,
    non_2xx: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    measured_webhooks: u64,
    measured_events: u64,
    latencies_us: Vec<u32>,
}

struct Shared {
    spec: LoadSpec,
    phase: AtomicU8,
    seq: AtomicU64,
    out_of_webhooks: Notify,
}

/// Runs the load and returns what happened.
pub async fn run(spec: LoadSpec) -> LoadReport {
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(WARMUP),
        seq: AtomicU64::new(0),
        out_of_webhooks: Notify::new(),
        spec,
    });
    let workers: Vec<_> = (0..shared.spec.connections)
        .map(|i| tokio::spawn(worker(shared.clone(), i as u64)))
        .collect();
    let spec = &shared.spec;
    tokio::select! {
        () = tokio::time::sleep(spec.warmup) => {}
        () = shared.out_of_webhooks.notified() => {}
    }
    let own = std::process::id();
    let cpu_before =
        [Some(spec.pid), spec.broker_pid, Some(own)].map(|p| p.and_then(procfs::cpu_time));
    let started = Instant::now();
    let _ = shared
        .phase
        .compare_exchange(WARMUP, MEASURE, Ordering::SeqCst, Ordering::SeqCst);
    tokio::select! {
        () = tokio::time::sleep(spec.duration) => {}
        () = shared.out_of_webhooks.notified() => {}
    }
    shared.phase.store(STOP, Ordering::SeqCst);
    let mut report = LoadReport::default();
    for w in workers {
        match w.await {
            Ok(tally) => report.merge(tally),
            Err(e) => {
                report.errors += 1;
                report
                    .first_error
                    .get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    report.measured = started.elapsed();
    let cpu_after =
        [Some(spec.pid), spec.broker_pid, Some(own)].map(|p| p.and_then(procfs::cpu_time));
    let used = |i: usize| {
        cpu_before[i]
            .zip(cpu_after[i])
            .map(|(b, a): (Duration, Duration)| a.saturating_sub(b))
    };
    report.cpu = used(0);
    report.broker_cpu = used(1);
    report.own_cpu = used(2);
    report.latencies_us.sort_unstable();
    report
}

/// One keep-alive HTTP/1.1 connection speaking just what the benchmark needs: a request is one
/// `write`, an answer usually one `read`. (hyper's client spent about twice the CPU per request,
/// and the load generator shares the two cores with the bridge and the broker.)
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` and returns the answer's status and whether the bridge closes the
    /// connection after it; the body is read and dropped. A malformed answer is an error.
    async fn exchange(&mut self, request: &[u8]) -> Result<(u16, bool), String> {
        self.stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| "non-UTF-8 head")?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {:?}", head.lines().next()))?;
        let mut length = None;
        let mut close = false;
        for line in head.split("\r\n").skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.trim().eq_ignore_ascii_case("close");
                }
            }
        }
        let length = length.ok_or("answer without content-length")?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        Ok((status, close))
    }

    async fn fill(&mut self) -> Result<(), String> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err("connection closed by the bridge".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The request bytes of one webhook.
fn request(out: &mut Vec<u8>, spec: &LoadSpec, host: &str, hook: &crate::bodies::Signed) {
    use std::io::Write as _;
    out.clear();
    let _ = write!(
        out,
        "POST {} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n\
         x-pusher-key: {}\r\nx-pusher-signature: {}\r\ncontent-length: {}\r\n\r\n",
        spec.path,
        spec.key,
        hook.signature,
        hook.body.len()
    );
    out.extend_from_slice(&hook.body);
}

async fn worker(shared: Arc<Shared>, id: u64) -> WorkerTally {
    let spec = &shared.spec;
    let mut tally = WorkerTally::default();
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let host = spec.addr.to_string();
    let mut conn: Option<Conn> = None;
    let mut req = Vec::with_capacity(2048);
    loop {
        let phase = shared.phase.load(Ordering::Relaxed);
        if phase == STOP {
            break;
        }
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        if seq >= spec.max_webhooks {
            shared.out_of_webhooks.notify_one();
            break;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Conn::open(spec.addr).await {
                Ok(c) => c,
                Err(e) => {
                    tally.errors += 1;
                    tally.first_error.get_or_insert(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let hook = spec.generator.webhook(seq, &mut rng);
        request(&mut req, spec, &host, &hook);
        let t0 = Instant::now();
        let answer = c.exchange(&req).await;
        let latency = t0.elapsed();
        match answer {
            Ok((status, close)) => {
                if (200..300).contains(&status) {
                    tally.webhooks_ok += 1;
                    tally.events_ok += u64::from(hook.events);
                    if phase == MEASURE {
                        tally.measured_webhooks += 1;
                        tally.measured_events += u64::from(hook.events);
                        tally
                            .latencies_us
                            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                    }
                } else {
                    *tally.non_2xx.entry(status).or_default() += 1;
                }
                if !close {
                    conn = Some(c);
                }
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(format!("request: {e}"));
            }
        }
    }
    tally
}
