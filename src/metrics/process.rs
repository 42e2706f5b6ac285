//! The `process_*` families every Prometheus client library exports (CPU, memory, open file
//! descriptors, start time), which prometheus-client has no collector for. Read from `/proc` at
//! scrape time: four small files and one directory listing, no background task. On a system
//! without `/proc` the families are simply absent.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `process_cpu_seconds_total`: user plus system CPU time.
pub(crate) const CPU_SECONDS: &str = "process_cpu_seconds";
/// `process_resident_memory_bytes`: resident set size.
pub(crate) const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// `process_virtual_memory_bytes`: virtual memory size.
pub(crate) const VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
/// `process_open_fds`: open file descriptors.
pub(crate) const OPEN_FDS: &str = "process_open_fds";
/// `process_max_fds`: the soft limit on open file descriptors.
pub(crate) const MAX_FDS: &str = "process_max_fds";
/// `process_start_time_seconds`: unix time the process started.
pub(crate) const START_TIME: &str = "process_start_time_seconds";

/// Clock ticks per second of `/proc/<pid>/stat` times. Linux reports them in `USER_HZ`, which
/// is 100 on every architecture the bridge is built for (asking `sysconf` would need libc).
const USER_HZ: f64 = 100.0;

/// Reads this process's figures on every scrape.
#[derive(Debug)]
pub(crate) struct ProcessCollector {
    /// Computed once: it does not change, and `/proc/stat` is not small on many-core hosts.
    start_time: Option<f64>,
}

impl ProcessCollector {
    /// The collector of the calling process.
    pub fn new() -> Self {
        Self {
            start_time: start_time(),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// The fields of `/proc/self/stat` after the command name (which may hold spaces and
/// parentheses): index 0 is the state (field 3 of proc(5)).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    Some(rest.split_whitespace().collect())
}

/// utime + stime in seconds.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let f = stat_fields(stat)?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// A `kB` line of `/proc/self/status` (`VmRSS:`, `VmSize:`) in bytes.
fn status_bytes(status: &str, field: &str) -> Option<i64> {
    let kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The soft `Max open files` limit of `/proc/self/limits` (absent when unlimited).
fn max_fds(limits: &str) -> Option<i64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Boot time (`btime` of `/proc/stat`) plus the process's `starttime` ticks; now when `/proc`
/// cannot tell (close enough: the collector is made at start-up).
fn start_time() -> Option<f64> {
    let from_proc = || {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let ticks: u64 = stat_fields(&stat)?.get(19)?.parse().ok()?;
        let boot: u64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(boot as f64 + ticks as f64 / USER_HZ)
    };
    from_proc().or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64())
    })
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<i64>,
) -> Result<(), std::fmt::Error> {
    if let Some(v) = value {
        let g = ConstGauge::new(v);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
    }
    Ok(())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        if let Some(cpu) = read("/proc/self/stat").as_deref().and_then(cpu_seconds) {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                CPU_SECONDS,
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        let status = read("/proc/self/status").unwrap_or_default();
        gauge(
            &mut encoder,
            RESIDENT_MEMORY,
            "Resident memory size in bytes",
            status_bytes(&status, "VmRSS:"),
        )?;
        gauge(
            &mut encoder,
            VIRTUAL_MEMORY,
            "Virtual memory size in bytes",
            status_bytes(&status, "VmSize:"),
        )?;
        let open = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as i64);
        gauge(
            &mut encoder,
            OPEN_FDS,
            "Number of open file descriptors",
            open,
        )?;
        gauge(
            &mut encoder,
            MAX_FDS,
            "Maximum number of open file descriptors",
            read("/proc/self/limits").as_deref().and_then(max_fds),
        )?;
        if let Some(t) = self.start_time {
            let g = ConstGauge::new(t);
            g.encode(encoder.encode_descriptor(
                START_TIME,
                "Start time of the process since unix epoch in seconds",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 \
                    12345 1000000 500 18446744073709551615";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(stat_fields(stat).unwrap()[19], "12345");
        let status = "Name:\tx\nVmSize:\t  204800 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_bytes(status, "VmRSS:"), Some(10240 * 1024));
        assert_eq!(status_bytes(status, "VmSize:"), Some(204800 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_fds(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_fds(unlimited), None);
    }

    #[test]
    fn reads_this_process() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector::new()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e5);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") >= 0.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started}"
        );
    }
}
