//! Process and tokio runtime figures, read at scrape time.
//!
//! prometheus-client has no process collector, so this one reads `/proc/self` (Linux; on other
//! systems the process metrics are left out) and exports them under the names every Prometheus
//! client library uses (`process_resident_memory_bytes`, `process_open_fds`, ...), without the
//! `matchgate_` prefix, so that stock dashboards and alerts work. The tokio figures are those
//! stable tokio exposes (`RuntimeMetrics`): workers, alive tasks, global queue depth, as
//! `matchgate_tokio_*`.

use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Adds the tokio runtime figures to the gateway's registry.
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(TokioCollector));
}

/// Appends the process figures (unprefixed) to `out`.
pub fn encode_process(out: &mut String) -> Result<(), std::fmt::Error> {
    static PROCESS: OnceLock<Registry> = OnceLock::new();
    let registry = PROCESS.get_or_init(|| {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry
    });
    prometheus_client::encoding::text::encode_registry(out, registry)
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

#[derive(Debug)]
struct TokioCollector;

impl Collector for TokioCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Scrapes are served on the runtime; outside one there is nothing to report.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        let metrics = runtime.metrics();
        gauge(
            &mut encoder,
            "tokio_workers",
            "Worker threads of the tokio runtime",
            metrics.num_workers() as i64,
        )?;
        gauge(
            &mut encoder,
            "tokio_alive_tasks",
            "Tasks alive on the tokio runtime (connections, timers, background loops)",
            metrics.num_alive_tasks() as i64,
        )?;
        gauge(
            &mut encoder,
            "tokio_global_queue_depth",
            "Tasks waiting in the tokio runtime's global queue (a lasting non-zero value means \
             the workers cannot keep up)",
            metrics.global_queue_depth() as i64,
        )
    }
}

#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says, in the units exported.
#[derive(Debug, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: f64,
}

impl ProcessStats {
    /// Parses `/proc/self/stat` given the clock tick rate, page size and boot time (from
    /// `/proc/stat`).
    fn parse(stat: &str, ticks_per_second: f64, page_size: f64, boot_time: f64) -> Option<Self> {
        // The command name (field 2) is in parentheses and may hold spaces and parentheses:
        // fields are counted after the last `)`, from field 3 (state) on.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) / ticks_per_second,
            start_time_seconds: boot_time + field(22)? / ticks_per_second,
            virtual_bytes: field(23)? as i64,
            resident_bytes: (field(24)? * page_size) as i64,
        })
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        // SAFETY: sysconf only reads system constants.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        Self::parse(&stat, ticks as f64, page as f64, boot_time)
    }
}

/// The soft limit on open file descriptors.
fn max_fds() -> Option<i64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    i64::try_from(limit.rlim_cur).ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(stats) = ProcessStats::read() {
            let cpu = ConstCounter::new(stats.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stats.resident_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stats.virtual_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                stats.start_time_seconds,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors (each connection holds one)",
                fds.count() as i64,
            )?;
        }
        if let Some(max) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Limit on open file descriptors (the soft RLIMIT_NOFILE)",
                max,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_an_awkward_command_name() {
        // Fields 3..=24 of a real line, after a command name with a space and a parenthesis.
        let stat = "4242 (match gate)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 150 0 0 20 0 \
                    9 0 1000 123456789 3000 18446744073709551615";
        let stats = ProcessStats::parse(stat, 100.0, 4096.0, 1_700_000_000.0).unwrap();
        assert_eq!(
            stats,
            ProcessStats {
                cpu_seconds: 4.0,
                resident_bytes: 3000 * 4096,
                virtual_bytes: 123_456_789,
                start_time_seconds: 1_700_000_010.0,
            }
        );
        assert_eq!(ProcessStats::parse("garbage", 100.0, 4096.0, 0.0), None);
    }
}
