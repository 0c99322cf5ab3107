//! The figures of a run: one [`Report`], printed as a table for people and written as JSON
//! (`--json`) for BENCHMARKS.md, with the run's full configuration beside the figures.
//!
//! Counting conventions (also in the README's "Load testing" section):
//! - `matches`: sessions whose second member saw `matched` inside the measured window;
//!   `matches_per_s` divides by the window's length.
//! - `latency_ms`: per user and match, from the start of its wait (its `enqueue` or `skip`
//!   being sent, the `rate` scheduler's due time, or the moment a `session_ended` with
//!   `requeued: true` arrived) to its own `matched`, inside the window; waits that passed
//!   `--match-timeout-ms` are `no_match` errors and never samples.
//! - `errors`: over the whole run, by kind (`error:<code>`, `close:<code>`, `http:<status>`,
//!   `connect:<reason>`, `no_match`, ...).
//! - CPU per match: CPU seconds of the process over the window, divided by `matches`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::procfs::{ProcessCpu, Role};
use crate::run::{Ctx, Outcome, RssFigures};
use crate::tally::Percentiles;

/// Error kinds that mean the gateway broke a guarantee, not just that something failed.
const VIOLATIONS: [&str; 3] = ["seq_gap", "seq_repeated", "state_mismatch"];

#[derive(Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub loadgen_version: &'static str,
    pub started_unix_ms: u64,
    /// The command line, parsed (secrets left out).
    pub config: serde_json::Value,
    pub host: Host,
    /// `duration`, `max_matches`, `deadline` or `interrupted`.
    pub stopped_by: &'static str,
    pub connections: Connections,
    pub window_s: f64,
    pub matches: u64,
    pub matches_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateFigures>,
    pub latency_ms: Percentiles,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub sessions: Sessions,
    /// Users by where they stood when the run closed (`stuck`: waiting for `matched` or for
    /// the answer to `end` for longer than the match timeout).
    pub end_state: BTreeMap<&'static str, u64>,
    pub reconnects: Reconnects,
    pub cpu: Cpu,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<RssFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<serde_json::Value>,
    /// No duplicate or half-seen session, no `seq` gap or repeat, no state the gateway and
    /// the client disagreed on.
    pub invariants_ok: bool,
}

#[derive(Serialize)]
pub struct Host {
    pub cpus: usize,
    pub open_files_limit: Option<u64>,
}

#[derive(Serialize)]
pub struct Connections {
    pub requested: u32,
    pub opened: u64,
    pub failed: u64,
    pub connect_s: f64,
    /// Opened connections per second over the connection phase.
    pub connect_per_s: f64,
    /// TCP connect + WebSocket handshake + `welcome`.
    pub handshake_ms: Percentiles,
}

#[derive(Serialize)]
pub struct RateFigures {
    pub offered_matches_per_s: f64,
    /// Pairs actually told to enqueue, per second of the window.
    pub issued_matches_per_s: f64,
    /// Arrivals with no free pair of users (more `--users` needed).
    pub arrivals_missed: u64,
    /// Users told to enqueue while not free (should be 0).
    pub arrivals_busy: u64,
}

#[derive(Serialize)]
pub struct Sessions {
    /// Distinct session ids seen in `matched`.
    pub seen: u64,
    /// A session delivered twice to one user, to a third user, or a user matched while in
    /// another session. Must be 0.
    pub duplicate: u64,
    /// Sessions whose `matched` only one member saw by the end of the run. Must be 0.
    pub half_seen: u64,
}

#[derive(Serialize)]
pub struct Reconnects {
    pub attempts: u64,
    pub succeeded: u64,
    pub resumed: u64,
}

#[derive(Serialize)]
pub struct Cpu {
    pub clk_tck: u64,
    pub processes: Vec<ProcessCpu>,
    pub gateway_s: Option<f64>,
    pub redis_s: Option<f64>,
    pub loadgen_s: Option<f64>,
    pub gateway_us_per_match: Option<f64>,
    pub redis_us_per_match: Option<f64>,
    pub loadgen_us_per_match: Option<f64>,
    /// CPU seconds per second of window: 1.0 is one core busy.
    pub gateway_cores: Option<f64>,
    pub redis_cores: Option<f64>,
    pub loadgen_cores: Option<f64>,
}

impl Report {
    pub fn build(
        scenario: &'static str,
        config: serde_json::Value,
        requested: u32,
        ctx: &Ctx,
        outcome: &Outcome,
    ) -> Report {
        let tally = ctx.tally();
        let opened = tally.handshake_latency().samples;
        let matches = tally.matches_in_window();
        let per_s = |n: f64| {
            if outcome.window_s > 0.0 {
                n / outcome.window_s
            } else {
                0.0
            }
        };
        let errors = tally.errors().clone();
        let sessions = Sessions {
            seen: tally.sessions_seen(),
            duplicate: tally.duplicates(),
            half_seen: tally.half_open(),
        };
        let invariants_ok = sessions.duplicate == 0
            && sessions.half_seen == 0
            && VIOLATIONS.iter().all(|v| !errors.contains_key(*v));
        let rate = ctx.offered_rate().map(|offered| RateFigures {
            offered_matches_per_s: offered,
            issued_matches_per_s: per_s(tally.counter("arrivals_issued") as f64),
            arrivals_missed: tally.counter("arrivals_missed"),
            arrivals_busy: tally.counter("arrivals_busy"),
        });
        Report {
            scenario,
            loadgen_version: env!("CARGO_PKG_VERSION"),
            started_unix_ms: ctx.started_unix_ms(),
            config,
            host: Host {
                cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
                open_files_limit: crate::open_files_limit(),
            },
            stopped_by: outcome.stopped_by,
            connections: Connections {
                requested,
                opened,
                failed: u64::from(requested).saturating_sub(opened),
                connect_s: outcome.connect_s,
                connect_per_s: if outcome.connect_s > 0.0 {
                    opened as f64 / outcome.connect_s
                } else {
                    0.0
                },
                handshake_ms: tally.handshake_latency(),
            },
            window_s: outcome.window_s,
            matches,
            matches_per_s: per_s(matches as f64),
            rate,
            latency_ms: tally.latency(),
            errors_total: errors.values().sum(),
            errors,
            sessions,
            end_state: tally.end_states().clone(),
            reconnects: Reconnects {
                attempts: tally.counter("reconnects"),
                succeeded: tally.counter("reconnected"),
                resumed: tally.counter("resumed"),
            },
            cpu: Cpu::of(outcome, matches),
            idle: outcome.rss.clone(),
            cluster: None,
            invariants_ok,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |label: &str, text: String| {
            out.push_str(&format!("{label:<13} {text}\n"));
        };
        line(
            "scenario",
            format!(
                "{} (loadgen {}), stopped by {}",
                self.scenario, self.loadgen_version, self.stopped_by
            ),
        );
        let c = &self.connections;
        line(
            "connections",
            format!(
                "{} of {} opened in {:.2} s ({:.0}/s); handshake ms p50 {:.3} p99 {:.3} max {:.3}",
                c.opened,
                c.requested,
                c.connect_s,
                c.connect_per_s,
                c.handshake_ms.p50,
                c.handshake_ms.p99,
                c.handshake_ms.max
            ),
        );
        if let Some(idle) = &self.idle {
            line(
                "gateway rss",
                format!(
                    "{} before, {} after {} connections, {} after the hold: {} per connection",
                    bytes(idle.gateway_before_bytes),
                    bytes(idle.gateway_after_bytes),
                    idle.connections_measured,
                    bytes(idle.gateway_after_hold_bytes),
                    per_conn(idle.gateway_bytes_per_conn),
                ),
            );
            line(
                "loadgen rss",
                format!(
                    "{} per connection; {} connections open at the end",
                    per_conn(idle.loadgen_bytes_per_conn),
                    idle.connections_at_end
                ),
            );
        }
        line("window", format!("{:.2} s", self.window_s));
        if self.scenario != "idle" {
            line(
                "matches",
                format!("{} ({:.1}/s)", self.matches, self.matches_per_s),
            );
            if let Some(rate) = &self.rate {
                line(
                    "rate",
                    format!(
                        "offered {:.1}/s, issued {:.1}/s, achieved {:.1}/s; {} arrivals missed (no free pair)",
                        rate.offered_matches_per_s,
                        rate.issued_matches_per_s,
                        self.matches_per_s,
                        rate.arrivals_missed
                    ),
                );
            }
            let l = &self.latency_ms;
            line(
                "latency ms",
                format!(
                    "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  ({} samples)",
                    l.p50, l.p90, l.p99, l.p99_9, l.max, l.samples
                ),
            );
            let s = &self.sessions;
            line(
                "sessions",
                format!(
                    "{} seen; duplicate {}, half_seen {}",
                    s.seen, s.duplicate, s.half_seen
                ),
            );
        }
        line("errors", counts(&self.errors));
        if self.reconnects.attempts > 0 {
            let r = &self.reconnects;
            line(
                "reconnects",
                format!(
                    "{} attempts, {} succeeded, {} resumed",
                    r.attempts, r.succeeded, r.resumed
                ),
            );
        }
        line("cpu", self.cpu.summary(self.matches));
        if !self.end_state.is_empty() {
            line(
                "end state",
                counts(
                    &self
                        .end_state
                        .iter()
                        .map(|(k, v)| (k.to_string(), *v))
                        .collect(),
                ),
            );
        }
        if let Some(cluster) = &self.cluster {
            line("cluster", cluster_summary(cluster));
        }
        line(
            "invariants",
            if self.invariants_ok { "ok" } else { "VIOLATED" }.to_string(),
        );
        out
    }
}

impl Cpu {
    fn of(outcome: &Outcome, matches: u64) -> Cpu {
        let total = |role: Role| {
            let mut of_role = outcome.cpu.iter().filter(|p| p.role == role).peekable();
            of_role.peek()?;
            Some(of_role.map(|p| p.cpu_s).sum::<f64>())
        };
        let per_match =
            |s: Option<f64>| s.filter(|_| matches > 0).map(|s| s * 1e6 / matches as f64);
        let cores = |s: Option<f64>| {
            s.filter(|_| outcome.window_s > 0.0)
                .map(|s| s / outcome.window_s)
        };
        let (gateway, redis, loadgen) = (
            total(Role::Gateway),
            total(Role::Redis),
            total(Role::Loadgen),
        );
        Cpu {
            clk_tck: outcome.clk_tck,
            processes: outcome.cpu.clone(),
            gateway_s: gateway,
            redis_s: redis,
            loadgen_s: loadgen,
            gateway_us_per_match: per_match(gateway),
            redis_us_per_match: per_match(redis),
            loadgen_us_per_match: per_match(loadgen),
            gateway_cores: cores(gateway),
            redis_cores: cores(redis),
            loadgen_cores: cores(loadgen),
        }
    }

    fn summary(&self, matches: u64) -> String {
        let part = |name: &str, s: Option<f64>, per: Option<f64>, cores: Option<f64>| match s {
            None => format!("{name} -"),
            Some(s) if matches > 0 => format!(
                "{name} {s:.2} s ({:.1} us/match, {:.0}% of a core)",
                per.unwrap_or(0.0),
                cores.unwrap_or(0.0) * 100.0
            ),
            Some(s) => format!(
                "{name} {s:.2} s ({:.0}% of a core)",
                cores.unwrap_or(0.0) * 100.0
            ),
        };
        format!(
            "{}; {}; {} (clock tick 1/{} s)",
            part(
                "gateway",
                self.gateway_s,
                self.gateway_us_per_match,
                self.gateway_cores
            ),
            part(
                "redis",
                self.redis_s,
                self.redis_us_per_match,
                self.redis_cores
            ),
            part(
                "loadgen",
                self.loadgen_s,
                self.loadgen_us_per_match,
                self.loadgen_cores
            ),
            self.clk_tck
        )
    }
}

/// One line about the `cluster` figures (the JSON has all of them).
fn cluster_summary(cluster: &serde_json::Value) -> String {
    let killed = &cluster["killed"];
    let kill = if killed.is_null() {
        "no instance killed".to_string()
    } else {
        format!(
            "instance {} killed at {:.1} s, {} after {:.0} ms",
            killed["instance"],
            killed["at_s"].as_f64().unwrap_or(0.0),
            if killed["new_pid"].is_null() {
                "NOT restarted"
            } else {
                "restarted"
            },
            killed["restart_ms"].as_f64().unwrap_or(0.0),
        )
    };
    let lost: Vec<String> = cluster["lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| **n != serde_json::json!(0))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    format!(
        "{} instances; {kill}; lost: {}; logs in {}",
        cluster["instances"],
        if lost.is_empty() {
            "nothing".to_string()
        } else {
            lost.join(", ")
        },
        cluster["log_dir"].as_str().unwrap_or("-")
    )
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn bytes(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn per_conn(b: Option<f64>) -> String {
    b.map_or("-".into(), |b| format!("{b:.0} B"))
}
