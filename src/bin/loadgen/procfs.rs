//! What the load generator reads from `/proc`: CPU time (`utime + stime` of
//! `/proc/<pid>/stat`, in clock ticks of `sysconf(_SC_CLK_TCK)`) and resident memory (`VmRSS`
//! of `/proc/<pid>/status`), of the gateway, of Redis and of itself.
//!
//! A [`CpuMeter`] turns two readings per process into CPU seconds over the measured window;
//! a process that dies or is started inside the window (the `cluster` scenario's kill and
//! restart) is read when it leaves or joins, so its share is not lost.

use std::io;

use serde::Serialize;

/// Clock ticks per second for `/proc/<pid>/stat` times.
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100 // the Linux USER_HZ on every common architecture
    }
}

/// `utime + stime` of the process, in clock ticks (`pid` may be `"self"`).
pub fn cpu_ticks(pid: &str) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: {stat:?}"),
        )
    })
}

/// Fields 14 and 15 (`utime`, `stime`) of a `stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of the process, in bytes.
pub fn rss_bytes(pid: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/status has no VmRSS"),
        )
    })
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The sum of `VmRSS` over `pids`.
pub fn total_rss(pids: &[u32]) -> io::Result<u64> {
    pids.iter().map(|pid| rss_bytes(&pid.to_string())).sum()
}

/// Which process a reading belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Redis,
    Loadgen,
}

/// CPU seconds of one process over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessCpu {
    pub role: Role,
    pub pid: u32,
    pub cpu_s: f64,
    /// Why the figure is missing or partial (the process could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// CPU time of a set of processes between [`CpuMeter::start`] and [`CpuMeter::finish`].
pub struct CpuMeter {
    ticks_per_s: u64,
    /// Processes being measured: role, pid, ticks at the start.
    running: Vec<(Role, u32, Option<u64>)>,
    done: Vec<ProcessCpu>,
}

impl CpuMeter {
    /// Reads every process now.
    pub fn start(processes: impl IntoIterator<Item = (Role, u32)>) -> CpuMeter {
        let mut meter = CpuMeter {
            ticks_per_s: clock_ticks_per_s(),
            running: Vec::new(),
            done: Vec::new(),
        };
        for (role, pid) in processes {
            meter.join(role, pid);
        }
        meter
    }

    /// Starts measuring a process from now on.
    pub fn join(&mut self, role: Role, pid: u32) {
        self.running.push((role, pid, read_ticks(role, pid).ok()));
    }

    /// Stops measuring `pid` (read now, e.g. just before it is killed).
    pub fn leave(&mut self, pid: u32) {
        if let Some(i) = self.running.iter().position(|p| p.1 == pid) {
            let (role, pid, start) = self.running.remove(i);
            self.done.push(self.reading(role, pid, start));
        }
    }

    /// Reads every process still measured and returns the figures of all.
    pub fn finish(mut self) -> Vec<ProcessCpu> {
        let running = std::mem::take(&mut self.running);
        for (role, pid, start) in running {
            let reading = self.reading(role, pid, start);
            self.done.push(reading);
        }
        self.done
    }

    fn reading(&self, role: Role, pid: u32, start: Option<u64>) -> ProcessCpu {
        let end = read_ticks(role, pid);
        let (cpu_s, note) = match (start, end) {
            (Some(a), Ok(b)) => (b.saturating_sub(a) as f64 / self.ticks_per_s as f64, None),
            (None, _) => (0.0, Some("unreadable at the start".to_string())),
            (_, Err(e)) => (0.0, Some(format!("unreadable at the end: {e}"))),
        };
        ProcessCpu {
            role,
            pid,
            cpu_s,
            note,
        }
    }
}

fn read_ticks(role: Role, pid: u32) -> io::Result<u64> {
    match role {
        Role::Loadgen => cpu_ticks("self"),
        _ => cpu_ticks(&pid.to_string()),
    }
}

/// The loadgen's own pid, for [`Role::Loadgen`] readings.
pub fn own_pid() -> u32 {
    std::process::id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (tokio (worker) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tmatchgate\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(5120 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_can_be_read() {
        assert!(cpu_ticks("self").is_ok());
        assert!(rss_bytes("self").unwrap() > 0);
        assert!(clock_ticks_per_s() > 0);
    }
}
