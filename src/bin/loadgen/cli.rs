//! The command line: one subcommand per scenario, the option groups they share, and the
//! parsers of the value forms (`MIN..MAX`, address lists). The parsed options are also the
//! `config` section of the JSON report, so every figure comes with the run that produced it;
//! the HS256 secret is the one option left out of it.
//!
//! The options have no environment variables (except the secret, which is read from
//! `MATCHGATE_JWT_SECRET` like the gateway does, to keep it off the process list): a benchmark
//! should be the command that is written down next to its figures, nothing more.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for matchgate: real WebSocket clients, latency and correctness figures"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Scenario {
    /// Open `--conns` connections, hold them (with heartbeats) for `--duration-s`; connect
    /// rate, and the gateway's RSS per connection with `--gateway-pid`.
    Idle {
        #[command(flatten)]
        #[serde(flatten)]
        common: Common,
        #[command(flatten)]
        #[serde(flatten)]
        target: Target,
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        conns: u32,
    },
    /// Closed loop of `--users`: enqueue, `matched`, hold a random time, then the session's
    /// offerer sends `skip` or `end` (`--end-ratio`), and it starts over.
    Churn {
        #[command(flatten)]
        #[serde(flatten)]
        common: Common,
        #[command(flatten)]
        #[serde(flatten)]
        target: Target,
        #[command(flatten)]
        #[serde(flatten)]
        matching: Matching,
        /// Share of sessions the offerer ends with `end` (both then enqueue again); the rest
        /// it ends with `skip` (the gateway re-queues both).
        #[arg(long, default_value_t = 0.5)]
        end_ratio: f64,
    },
    /// Open loop: `--rate` pairs of idle users per second are told to enqueue, whatever the
    /// gateway's pace; each session is held `--hold-ms` and ended with `end`.
    Rate {
        #[command(flatten)]
        #[serde(flatten)]
        common: Common,
        #[command(flatten)]
        #[serde(flatten)]
        target: Target,
        #[command(flatten)]
        #[serde(flatten)]
        matching: Matching,
        /// Offered matches per second (two enqueues each).
        #[arg(long)]
        rate: f64,
    },
    /// Spawn `--instances` gateways sharing `--redis-url`, run the churn loop over them, and
    /// optionally SIGKILL and restart one mid-run (`--kill-after-s`); its clients reconnect
    /// elsewhere with `resume`. Reports what was lost, which must be nothing.
    Cluster {
        #[command(flatten)]
        #[serde(flatten)]
        common: Common,
        #[command(flatten)]
        #[serde(flatten)]
        matching: Matching,
        #[command(flatten)]
        #[serde(flatten)]
        cluster: ClusterArgs,
        /// As for `churn`.
        #[arg(long, default_value_t = 0.5)]
        end_ratio: f64,
    },
}

/// Options of every scenario.
#[derive(Args, Debug, Serialize)]
pub struct Common {
    /// Measured run time (after `--warmup-s`; for `idle`, the hold after all connections are
    /// open).
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    pub duration_s: f64,
    /// Hard bound on the whole run, connection phase included; the run stops and reports
    /// when it is reached. Default: warm-up + duration + 60 s + the connection phase at
    /// `--connect-rate`.
    #[arg(long, value_parser = positive)]
    pub deadline_s: Option<f64>,
    /// Local addresses to bind client sockets to, round-robin (IPs or CIDR blocks such as
    /// 127.0.0.0/28): each one has its own range of ephemeral ports, so many give more than
    /// about 28,000 connections to one gateway address.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub source_ips: Vec<String>,
    /// New connections per second (0: as fast as `--connect-concurrency` allows).
    #[arg(long, default_value_t = 1000.0, value_parser = non_negative)]
    pub connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_concurrency: u32,
    /// Gateway processes whose CPU (and, for `idle`, RSS) to measure from `/proc`.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
    /// Redis processes whose CPU to measure from `/proc`.
    #[arg(long, value_delimiter = ',')]
    pub redis_pid: Vec<u32>,
    /// Write the report (figures and this configuration) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Runtime worker threads: 1 runs everything on one thread (the cheapest on a small
    /// machine shared with the gateway), more use a multi-thread runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Prefix of the user ids (`<prefix>-<n>`); default a random one, so that state the
    /// gateway still holds from an earlier run (resume grace) is never taken over.
    #[arg(long)]
    pub user_prefix: Option<String>,
}

/// Where the clients connect and how they authenticate (all scenarios but `cluster`, which
/// starts its own gateways).
#[derive(Args, Debug, Serialize)]
pub struct Target {
    /// Gateway WebSocket URLs, comma-separated; users are spread over them round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    pub url: Vec<String>,
    /// HS256 secret the gateway verifies tokens with; tokens are minted locally.
    #[arg(
        long,
        env = "MATCHGATE_JWT_SECRET",
        hide_env_values = true,
        required_unless_present = "dev_token",
        conflicts_with = "dev_token"
    )]
    #[serde(skip)]
    pub secret: Option<String>,
    /// Fetch tokens from the gateway's dev endpoint (`POST /v1/dev/token`) instead.
    #[arg(long)]
    pub dev_token: bool,
}

/// Options of the scenarios that match users.
#[derive(Args, Debug, Serialize)]
pub struct Matching {
    /// Simulated users (each one WebSocket).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub users: u32,
    /// Time after all users connected before measuring starts.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    pub warmup_s: f64,
    /// Stop once this many matches were measured (in the window after the warm-up).
    #[arg(long)]
    pub max_matches: Option<u64>,
    /// How long a session is held before its offerer acts, uniform in `MIN..MAX` ms (or one
    /// number).
    #[arg(long, default_value = "0", value_parser = HoldRange::parse)]
    pub hold_ms: HoldRange,
    /// A wait for `matched` longer than this counts as a `no_match` error (and the user
    /// leaves the queue with `end` and starts over); never as a latency sample.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub match_timeout_ms: u64,
    /// Preference pools the users are spread over, round-robin (`prefs.topic` = `p<k>`); only
    /// users of one pool can meet.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub pools: u32,
    /// After the measured window, how long to wait at most for frames still on their way
    /// (the second half of a session seen once) before counting what is missing.
    #[arg(long, default_value_t = 2_000)]
    pub drain_ms: u64,
}

/// Options of the `cluster` scenario.
#[derive(Args, Debug, Serialize)]
pub struct ClusterArgs {
    /// Gateway instances to start.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub instances: u32,
    /// The Redis the instances share (`--redis-url` of the gateway). Each run uses a fresh
    /// namespace in it.
    #[arg(long)]
    #[serde(skip)]
    pub redis_url: String,
    /// The matchgate binary (default: `matchgate` next to this executable).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Extra argument for every instance (repeatable), e.g. `--gateway-arg=--resume-grace-ms=20000`.
    #[arg(long, allow_hyphen_values = true)]
    pub gateway_arg: Vec<String>,
    /// SIGKILL one instance this long after the users started, restart it at once.
    #[arg(long, value_parser = non_negative)]
    pub kill_after_s: Option<f64>,
    /// Which instance to kill (0-based).
    #[arg(long, default_value_t = 0)]
    pub kill_instance: u32,
    /// HS256 secret for the instances (default: a random one per run).
    #[arg(long, env = "MATCHGATE_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub secret: Option<String>,
}

/// A uniform range of hold times in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HoldRange {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl HoldRange {
    /// `N` or `MIN..MAX` (inclusive), in ms.
    pub fn parse(text: &str) -> Result<HoldRange, String> {
        let number = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not a whole number of ms"))
        };
        let (min_ms, max_ms) = match text.split_once("..") {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(text)?, number(text)?),
        };
        if min_ms > max_ms {
            return Err(format!("{min_ms}..{max_ms}: MIN must not exceed MAX"));
        }
        Ok(HoldRange { min_ms, max_ms })
    }

    /// One draw from the range.
    pub fn sample(&self) -> Duration {
        let ms = if self.min_ms == self.max_ms {
            self.min_ms
        } else {
            rand::random_range(self.min_ms..=self.max_ms)
        };
        Duration::from_millis(ms)
    }
}

/// The addresses of `--source-ips`, CIDR blocks expanded to their hosts (a /32 or a bare
/// address to itself).
pub fn source_addresses(entries: &[String]) -> Result<Vec<IpAddr>, String> {
    /// More would only be a typo (a /8 has 16 million hosts).
    const MAX: usize = 4096;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.trim();
        if let Ok(ip) = entry.parse::<IpAddr>() {
            out.push(ip);
        } else if let Ok(net) = entry.parse::<ipnet::IpNet>() {
            out.extend(net.hosts().take(MAX + 1));
        } else {
            return Err(format!(
                "--source-ips: {entry:?} is neither an IP address nor a CIDR block"
            ));
        }
        if out.len() > MAX {
            return Err(format!("--source-ips: more than {MAX} addresses"));
        }
    }
    if out.is_empty() {
        return Err("--source-ips: no address".into());
    }
    Ok(out)
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number >= 0")),
    }
}

fn positive(text: &str) -> Result<f64, String> {
    match non_negative(text)? {
        v if v > 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a number > 0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_range_forms() {
        assert_eq!(
            HoldRange::parse("0").unwrap(),
            HoldRange {
                min_ms: 0,
                max_ms: 0
            }
        );
        assert_eq!(
            HoldRange::parse("10..250").unwrap(),
            HoldRange {
                min_ms: 10,
                max_ms: 250
            }
        );
        assert!(HoldRange::parse("5..1").is_err());
        assert!(HoldRange::parse("a..1").is_err());
        assert!(HoldRange::parse("").is_err());
        let range = HoldRange::parse("3..7").unwrap();
        for _ in 0..100 {
            let d = range.sample().as_millis();
            assert!((3..=7).contains(&d), "{d}");
        }
    }

    #[test]
    fn source_address_forms() {
        let ips = source_addresses(&["127.0.0.1".into(), "127.0.1.0/30".into()]).unwrap();
        let text: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(text, ["127.0.0.1", "127.0.1.1", "127.0.1.2"]);
        assert_eq!(
            source_addresses(&["127.0.0.9/32".into()]).unwrap(),
            ["127.0.0.9".parse::<IpAddr>().unwrap()]
        );
        assert!(source_addresses(&["localhost".into()]).is_err());
        assert!(source_addresses(&["10.0.0.0/8".into()]).is_err());
        assert!(source_addresses(&[]).is_err());
    }

    #[test]
    fn the_secret_stays_out_of_the_report() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "churn",
            "--url",
            "ws://127.0.0.1:1/v1/ws",
            "--secret",
            "do-not-print-me",
        ])
        .unwrap();
        let json = serde_json::to_string(&cli.scenario).unwrap();
        assert!(!json.contains("do-not-print-me"), "{json}");
        assert!(json.contains(r#""scenario":"churn""#), "{json}");
    }
}
