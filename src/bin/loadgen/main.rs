//! `loadgen`: the load generator of matchgate. It drives one or several gateways with real
//! WebSocket clients in one of four scenarios (`idle`, `churn`, `rate`, `cluster`), checks
//! every session it sees, and reports throughput, latency, errors and CPU and memory costs as
//! a table and as JSON. See the README's "Load testing" section.
//!
//! It is a client of the wire protocol only, like any app: nothing here uses the gateway's
//! code, and the gateway knows nothing of it.
//!
//! Exit status: 0 after a run, 2 after a run that found a broken guarantee (a duplicate or
//! half-seen session, a `seq` gap; in `cluster`, anything lost), 1 when it could not run or
//! opened no connection at all.

mod cli;
mod cluster;
mod connect;
mod procfs;
mod report;
mod run;
mod tally;
mod user;
mod wire;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use cli::{Cli, Common, Matching, Scenario, Target as TargetArgs};
use connect::{Auth, Target};
use report::Report;
use run::{Ctx, Plan, Setup};
use user::Policy;

/// Added to the planned run time for the default hard deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_files_limit();
    let threads = cli.scenario.common().threads as usize;
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_path = cli.scenario.common().json.clone();
    let report = match runtime.block_on(run_scenario(cli.scenario)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(1);
        }
    };
    print!("{}", report.table());
    if let Some(path) = json_path {
        let text = serde_json::to_string_pretty(&report).expect("the report serialises");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    if report.connections.opened == 0 {
        eprintln!("loadgen: no connection could be opened (see errors)");
        return ExitCode::from(1);
    }
    let nothing_lost = report
        .cluster
        .as_ref()
        .is_none_or(|c| c["nothing_lost"] == json!(true));
    if report.invariants_ok && nothing_lost {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

impl Scenario {
    fn common(&self) -> &Common {
        match self {
            Scenario::Idle { common, .. }
            | Scenario::Churn { common, .. }
            | Scenario::Rate { common, .. }
            | Scenario::Cluster { common, .. } => common,
        }
    }
}

async fn run_scenario(scenario: Scenario) -> Result<Report, String> {
    let mut config = serde_json::to_value(&scenario).map_err(|e| e.to_string())?;
    let common = scenario.common();
    let user_prefix = common
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("lg{:06x}", rand::random::<u32>() & 0xff_ffff));
    config["user_prefix"] = json!(user_prefix);
    let sources = cli::source_addresses(&common.source_ips)?;
    let gateway_pids = common.gateway_pid.clone();
    let mut measured: Vec<(procfs::Role, u32)> = gateway_pids
        .iter()
        .map(|&pid| (procfs::Role::Gateway, pid))
        .chain(
            common
                .redis_pid
                .iter()
                .map(|&pid| (procfs::Role::Redis, pid)),
        )
        .collect();
    let base = |targets, auth, policy, matching: Option<&Matching>, offered_rate, measured| Setup {
        targets,
        sources: sources.clone(),
        auth,
        user_prefix: user_prefix.clone(),
        policy,
        hold: matching.map_or(
            cli::HoldRange {
                min_ms: 0,
                max_ms: 0,
            },
            |m| m.hold_ms,
        ),
        match_timeout: Duration::from_millis(matching.map_or(10_000, |m| m.match_timeout_ms)),
        pools: matching.map_or(1, |m| m.pools),
        max_matches: matching.and_then(|m| m.max_matches),
        connect_concurrency: common.connect_concurrency,
        offered_rate,
        measured,
    };

    match &scenario {
        Scenario::Idle { target, conns, .. } => {
            let (targets, auth) = connect_args(target).await?;
            let ctx = Ctx::new(base(targets, auth, Policy::Hold, None, None, measured));
            let plan = plan(common, *conns, Duration::ZERO, Duration::ZERO, gateway_pids);
            finish("idle", config, *conns, ctx, plan, None).await
        }
        Scenario::Churn {
            target,
            matching,
            end_ratio,
            ..
        } => {
            check_ratio(*end_ratio)?;
            let (targets, auth) = connect_args(target).await?;
            let policy = Policy::Closed {
                end_ratio: *end_ratio,
            };
            let ctx = Ctx::new(base(targets, auth, policy, Some(matching), None, measured));
            let plan = matching_plan(common, matching, gateway_pids);
            finish("churn", config, matching.users, ctx, plan, None).await
        }
        Scenario::Rate {
            target,
            matching,
            rate,
            ..
        } => {
            if !(rate.is_finite() && *rate > 0.0) {
                return Err(format!("--rate {rate}: must be a number > 0"));
            }
            let (targets, auth) = connect_args(target).await?;
            let ctx = Ctx::new(base(
                targets,
                auth,
                Policy::Open,
                Some(matching),
                Some(*rate),
                measured,
            ));
            let plan = matching_plan(common, matching, gateway_pids);
            finish("rate", config, matching.users, ctx, plan, None).await
        }
        Scenario::Cluster {
            matching,
            cluster: args,
            end_ratio,
            ..
        } => {
            check_ratio(*end_ratio)?;
            if args.kill_instance >= args.instances {
                return Err(format!(
                    "--kill-instance {}: there are only {} instances (0-based)",
                    args.kill_instance, args.instances
                ));
            }
            let secret = args.secret.clone().unwrap_or_else(|| {
                format!(
                    "{:032x}{:032x}",
                    rand::random::<u128>(),
                    rand::random::<u128>()
                )
            });
            let log_dir = std::env::temp_dir().join(format!("loadgen-{user_prefix}"));
            let started =
                cluster::Cluster::start(args, &secret, &format!("lg-{user_prefix}"), log_dir)
                    .await?;
            let pids = started.pids();
            if common.redis_pid.is_empty() {
                if let Some(pid) = cluster::redis_pid(&args.redis_url).await {
                    measured.push((procfs::Role::Redis, pid));
                }
            }
            measured.extend(pids.iter().map(|&pid| (procfs::Role::Gateway, pid)));
            let mut targets = Vec::new();
            for url in started.urls() {
                targets.push(Target::resolve(&url).await?);
            }
            let policy = Policy::Closed {
                end_ratio: *end_ratio,
            };
            let ctx = Ctx::new(base(
                targets,
                Auth::secret(&secret),
                policy,
                Some(matching),
                None,
                measured,
            ));
            let plan = matching_plan(common, matching, Vec::new());
            let cluster = Arc::new(tokio::sync::Mutex::new(started));
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let kill = args.kill_after_s.map(|after| {
                tokio::spawn(kill_and_restart(
                    ctx.clone(),
                    cluster.clone(),
                    args.kill_instance as usize,
                    Duration::from_secs_f64(after),
                    started_rx,
                ))
            });
            let mut report = finish(
                "cluster",
                config,
                matching.users,
                ctx.clone(),
                plan,
                Some(started_tx),
            )
            .await?;
            let killed = match kill {
                Some(task) => task.await.unwrap_or(None),
                None => None,
            };
            let mut cluster = cluster.lock().await;
            cluster.stop().await;
            report.cluster = Some(cluster_figures(&report, &cluster, pids, killed));
            Ok(report)
        }
    }
}

/// Resolves the URLs and sets up the token source.
async fn connect_args(args: &TargetArgs) -> Result<(Vec<Target>, Auth), String> {
    let mut targets = Vec::new();
    for url in &args.url {
        targets.push(Target::resolve(url.trim()).await?);
    }
    let auth = match &args.secret {
        Some(secret) => Auth::secret(secret),
        None => Auth::dev(),
    };
    Ok((targets, auth))
}

fn check_ratio(end_ratio: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&end_ratio) {
        Ok(())
    } else {
        Err(format!("--end-ratio {end_ratio}: must be between 0 and 1"))
    }
}

fn matching_plan(common: &Common, matching: &Matching, gateway_pids: Vec<u32>) -> Plan {
    let warmup = Duration::from_secs_f64(matching.warmup_s);
    let drain = Duration::from_millis(matching.drain_ms);
    let mut plan = plan(common, matching.users, warmup, drain, gateway_pids);
    plan.measure_rss = false;
    plan
}

/// The run's shape; the hard deadline defaults to the planned time (the connection phase
/// at `--connect-rate` included) plus a slack.
fn plan(
    common: &Common,
    users: u32,
    warmup: Duration,
    drain: Duration,
    gateway_pids: Vec<u32>,
) -> Plan {
    let duration = Duration::from_secs_f64(common.duration_s);
    let deadline = match common.deadline_s {
        Some(s) => Duration::from_secs_f64(s),
        None => {
            let connecting = if common.connect_rate > 0.0 {
                Duration::from_secs_f64(f64::from(users) / common.connect_rate)
            } else {
                Duration::ZERO
            };
            warmup + duration + drain + connecting + DEADLINE_SLACK
        }
    };
    Plan {
        users,
        connect_rate: common.connect_rate,
        warmup,
        duration,
        drain,
        deadline,
        measure_rss: true,
        gateway_pids,
    }
}

/// Runs the plan and builds the report.
async fn finish(
    scenario: &'static str,
    mut config: serde_json::Value,
    requested: u32,
    ctx: Arc<Ctx>,
    plan: Plan,
    started: Option<tokio::sync::oneshot::Sender<Instant>>,
) -> Result<Report, String> {
    config["deadline_s"] = json!(plan.deadline.as_secs_f64());
    let outcome = run::execute(ctx.clone(), plan, started).await;
    Ok(Report::build(scenario, config, requested, &ctx, &outcome))
}

/// `cluster --kill-after-s`: SIGKILLs the instance at the given time after the users
/// started, and restarts it.
async fn kill_and_restart(
    ctx: Arc<Ctx>,
    cluster: Arc<tokio::sync::Mutex<cluster::Cluster>>,
    index: usize,
    after: Duration,
    started: tokio::sync::oneshot::Receiver<Instant>,
) -> Option<serde_json::Value> {
    let started = started.await.ok()?;
    tokio::select! {
        () = tokio::time::sleep_until((started + after).into()) => {}
        () = ctx.stop_requested() => return None,
    }
    let mut cluster = cluster.lock().await;
    let old_pid = cluster.pids()[index];
    ctx.cpu_leave(old_pid);
    let killed_at = Instant::now();
    let restarted = cluster.kill_and_restart(index).await;
    let restart_ms = killed_at.elapsed().as_secs_f64() * 1000.0;
    let mut figures = json!({
        "instance": index,
        "at_s": killed_at.duration_since(started).as_secs_f64(),
        "old_pid": old_pid,
        "restart_ms": restart_ms,
    });
    match restarted {
        Ok(new_pid) => {
            ctx.cpu_join(procfs::Role::Gateway, new_pid);
            figures["new_pid"] = json!(new_pid);
        }
        Err(e) => figures["restart_error"] = json!(e),
    }
    Some(figures)
}

/// What the `cluster` scenario adds to the report: its instances, the kill, and what was
/// lost, which must be nothing.
fn cluster_figures(
    report: &Report,
    cluster: &cluster::Cluster,
    pids: Vec<u32>,
    killed: Option<serde_json::Value>,
) -> serde_json::Value {
    let error = |kind: &str| report.errors.get(kind).copied().unwrap_or(0);
    let lost = json!({
        "half_seen": report.sessions.half_seen,
        "duplicate": report.sessions.duplicate,
        "no_match": error("no_match"),
        "no_reply": error("no_reply"),
        "stuck_at_end": report.end_state.get("stuck").copied().unwrap_or(0),
        "reconnect_failed": error("reconnect_failed"),
        "not_resumed": error("not_resumed"),
        "seq_gap": error("seq_gap"),
        "seq_repeated": error("seq_repeated"),
        "state_mismatch": error("state_mismatch"),
    });
    let nothing_lost = lost
        .as_object()
        .is_some_and(|m| m.values().all(|v| v == &json!(0)));
    let settings: serde_json::Map<String, serde_json::Value> = cluster::BENCHMARK_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "instances": pids.len(),
        "gateway_env": settings,
        "pids": pids,
        "urls": cluster.urls(),
        "log_dir": cluster.log_dir(),
        "killed": killed,
        "lost": lost,
        "nothing_lost": nothing_lost,
    })
}

/// Lifts the soft limit of open files to the hard one: every connection is a descriptor.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The soft limit of open files.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    ok.then_some(limit.rlim_cur)
}
