//! One run, whatever the scenario: the shared context of the user tasks, and the phases every
//! run goes through.
//!
//! 1. **Connecting**: users are started at `--connect-rate` (at most `--connect-concurrency`
//!    handshakes at once); each opens its connection and then waits, heartbeating.
//! 2. **Running**: users act by their policy. After `--warmup-s` the measured window opens:
//!    CPU is read, and matches and latencies count from then on.
//! 3. The window closes after `--duration-s`, at `--max-matches`, at the hard deadline or on
//!    Ctrl-C, whichever comes first; CPU is read again. **Stopping**: users stop acting but
//!    keep reading for up to `--drain-ms`, until every session seen by one member has been
//!    seen by the other.
//! 4. **Closing**: users note their final state and close.
//!
//! Every wait is bounded, so a run always ends and reports.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::HoldRange;
use crate::connect::{Auth, Target};
use crate::procfs::{self, CpuMeter, ProcessCpu, Role};
use crate::tally::Tally;
use crate::user::{self, Policy};
use crate::wire::ClientFrames;

/// How long users get to close after the run.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// For `idle`: time after the last connection opened before the gateway's RSS is read, so
/// that what the connections allocate lazily is counted.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
/// How often the drain checks whether the sessions are complete.
const DRAIN_CHECK: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Running,
    Stopping,
    Closing,
}

/// What every user task shares.
pub struct Ctx {
    pub targets: Vec<Target>,
    pub sources: Vec<IpAddr>,
    pub auth: Auth,
    pub user_prefix: String,
    pub frames: ClientFrames,
    pub policy: Policy,
    pub hold: HoldRange,
    pub match_timeout: Duration,
    pub pools: u32,
    pub max_matches: Option<u64>,
    pub connect_slots: Semaphore,
    offered_rate: Option<f64>,
    started_unix_ms: u64,
    tally: Mutex<Tally>,
    measure_from: OnceLock<Instant>,
    stopped: AtomicBool,
    closing: AtomicBool,
    stop: CancellationToken,
    stop_cause: Mutex<Option<&'static str>>,
    /// Connection attempts finished (either way), and a wake-up for the orchestrator.
    attempts_done: AtomicU32,
    attempt_done: Notify,
    open_connections: AtomicI64,
    /// `rate`: idle users by pool, for the scheduler to pick from.
    free_users: Mutex<Vec<Vec<u32>>>,
    cpu: Mutex<Measured>,
}

/// The processes whose CPU is measured, and their meter while the window is open.
struct Measured {
    processes: Vec<(Role, u32)>,
    meter: Option<CpuMeter>,
}

/// What a [`Ctx`] is made from.
pub struct Setup {
    pub targets: Vec<Target>,
    pub sources: Vec<IpAddr>,
    pub auth: Auth,
    pub user_prefix: String,
    pub policy: Policy,
    pub hold: HoldRange,
    pub match_timeout: Duration,
    pub pools: u32,
    pub max_matches: Option<u64>,
    pub connect_concurrency: u32,
    /// `rate`: offered matches per second.
    pub offered_rate: Option<f64>,
    /// Processes whose CPU to measure over the window (besides the load generator).
    pub measured: Vec<(Role, u32)>,
}

impl Ctx {
    pub fn new(setup: Setup) -> Arc<Ctx> {
        Arc::new(Ctx {
            frames: ClientFrames::new(setup.pools),
            free_users: Mutex::new(vec![Vec::new(); setup.pools as usize]),
            targets: setup.targets,
            sources: setup.sources,
            auth: setup.auth,
            user_prefix: setup.user_prefix,
            policy: setup.policy,
            hold: setup.hold,
            match_timeout: setup.match_timeout,
            pools: setup.pools,
            max_matches: setup.max_matches,
            connect_slots: Semaphore::new(setup.connect_concurrency as usize),
            offered_rate: setup.offered_rate,
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tally: Mutex::new(Tally::default()),
            measure_from: OnceLock::new(),
            stopped: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stop: CancellationToken::new(),
            stop_cause: Mutex::new(None),
            attempts_done: AtomicU32::new(0),
            attempt_done: Notify::new(),
            open_connections: AtomicI64::new(0),
            cpu: Mutex::new(Measured {
                processes: setup.measured,
                meter: None,
            }),
        })
    }

    pub fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `now` is inside the measured window.
    pub fn in_window(&self, now: Instant) -> bool {
        !self.stopped.load(Ordering::Relaxed) && self.measure_from.get().is_some_and(|t| now >= *t)
    }

    pub fn offered_rate(&self) -> Option<f64> {
        self.offered_rate
    }

    pub fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }

    /// Whether the measured window has closed.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Ends the measured window (the first cause is the one reported).
    pub fn request_stop(&self, cause: &'static str) {
        let mut first = self.stop_cause.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(cause);
        self.stop.cancel();
    }

    pub fn stop_cause(&self) -> Option<&'static str> {
        *self.stop_cause.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connect_attempt_done(&self, opened: bool) {
        if opened {
            self.open_connections.fetch_add(1, Ordering::Relaxed);
        }
        self.attempts_done.fetch_add(1, Ordering::Relaxed);
        self.attempt_done.notify_one();
    }

    pub fn connection_lost(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_restored(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn open_connections(&self) -> u64 {
        self.open_connections.load(Ordering::Relaxed).max(0) as u64
    }

    /// `rate`: user `me` of `pool` is free for the scheduler.
    pub fn free(&self, pool: u32, me: u32) {
        let mut free = self.free_users.lock().unwrap_or_else(|e| e.into_inner());
        free[pool as usize].push(me);
    }

    /// `rate`: two free users of `pool`, if there are two.
    fn take_pair(&self, pool: u32) -> Option<(u32, u32)> {
        let mut free = self.free_users.lock().unwrap_or_else(|e| e.into_inner());
        let users = &mut free[pool as usize];
        if users.len() < 2 {
            return None;
        }
        Some((users.pop()?, users.pop()?))
    }

    /// `cluster`: a measured process is about to die.
    pub fn cpu_leave(&self, pid: u32) {
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        cpu.processes.retain(|p| p.1 != pid);
        if let Some(meter) = cpu.meter.as_mut() {
            meter.leave(pid);
        }
    }

    /// `cluster`: a process to measure from now on.
    pub fn cpu_join(&self, role: Role, pid: u32) {
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        cpu.processes.push((role, pid));
        if let Some(meter) = cpu.meter.as_mut() {
            meter.join(role, pid);
        }
    }

    fn cpu_start(&self) {
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let processes = cpu.processes.clone().into_iter();
        cpu.meter = Some(CpuMeter::start(
            processes.chain([(Role::Loadgen, procfs::own_pid())]),
        ));
    }

    fn cpu_finish(&self) -> Vec<ProcessCpu> {
        let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        cpu.meter.take().map(CpuMeter::finish).unwrap_or_default()
    }

    /// Resolves once the window was told to end.
    pub async fn stop_requested(&self) {
        self.stop.cancelled().await;
    }
}

/// How a run is shaped (from the command line).
pub struct Plan {
    pub users: u32,
    pub connect_rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub deadline: Duration,
    /// Measure the gateway's RSS around the connection phase (`idle`).
    pub measure_rss: bool,
    /// Gateways whose RSS to read.
    pub gateway_pids: Vec<u32>,
}

/// What the orchestration measured (the rest is in the tally).
pub struct Outcome {
    pub stopped_by: &'static str,
    pub connect_s: f64,
    pub window_s: f64,
    pub cpu: Vec<ProcessCpu>,
    pub clk_tck: u64,
    pub rss: Option<RssFigures>,
}

/// `idle`: resident memory of the gateway(s) and of the load generator.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RssFigures {
    pub gateway_before_bytes: Option<u64>,
    pub gateway_after_bytes: Option<u64>,
    pub gateway_after_hold_bytes: Option<u64>,
    /// Connections open when the gateway was read after the connection phase.
    pub connections_measured: u64,
    pub gateway_bytes_per_conn: Option<f64>,
    pub loadgen_before_bytes: Option<u64>,
    pub loadgen_after_bytes: Option<u64>,
    pub loadgen_bytes_per_conn: Option<f64>,
    /// Connections still open at the end of the hold.
    pub connections_at_end: u64,
}

/// Runs the phases with `plan`; `started` is told when users start acting (for the
/// cluster scenario's kill).
pub async fn execute(
    ctx: Arc<Ctx>,
    plan: Plan,
    started: Option<tokio::sync::oneshot::Sender<Instant>>,
) -> Outcome {
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    spawn_stop_triggers(&ctx, plan.deadline);

    let gateway_rss = || {
        (!plan.gateway_pids.is_empty())
            .then(|| procfs::total_rss(&plan.gateway_pids).ok())
            .flatten()
    };
    let own_rss = || procfs::rss_bytes("self").ok();
    let rss_before = plan.measure_rss.then(|| (gateway_rss(), own_rss()));

    // Connecting.
    let tracker = TaskTracker::new();
    let mut schedule = Vec::new();
    let connect_start = Instant::now();
    for me in 0..plan.users {
        if plan.connect_rate > 0.0 {
            let at = connect_start + Duration::from_secs_f64(f64::from(me) / plan.connect_rate);
            tokio::select! {
                () = tokio::time::sleep_until(at.into()) => {}
                () = ctx.stop.cancelled() => break,
            }
        }
        let commands = if ctx.offered_rate.is_some() {
            let (tx, rx) = mpsc::channel(1);
            schedule.push(tx);
            Some(rx)
        } else {
            None
        };
        tracker.spawn(user::run(ctx.clone(), me, phase_rx.clone(), commands));
    }
    loop {
        let notified = ctx.attempt_done.notified();
        if ctx.attempts_done.load(Ordering::Relaxed) >= plan.users {
            break;
        }
        tokio::select! {
            () = notified => {}
            () = ctx.stop.cancelled() => break,
        }
    }
    let connect_s = connect_start.elapsed().as_secs_f64();

    let mut rss = None;
    if let Some((gateway_before, loadgen_before)) = rss_before {
        tokio::select! {
            () = tokio::time::sleep(IDLE_SETTLE) => {}
            () = ctx.stop.cancelled() => {}
        }
        let connections = ctx.open_connections();
        let (gateway_after, loadgen_after) = (gateway_rss(), own_rss());
        let per_conn = |before: Option<u64>, after: Option<u64>| match (before, after) {
            (Some(b), Some(a)) if connections > 0 => {
                Some((a as f64 - b as f64) / connections as f64)
            }
            _ => None,
        };
        rss = Some(RssFigures {
            gateway_before_bytes: gateway_before,
            gateway_after_bytes: gateway_after,
            gateway_after_hold_bytes: None,
            connections_measured: connections,
            gateway_bytes_per_conn: per_conn(gateway_before, gateway_after),
            loadgen_before_bytes: loadgen_before,
            loadgen_after_bytes: loadgen_after,
            loadgen_bytes_per_conn: per_conn(loadgen_before, loadgen_after),
            connections_at_end: 0,
        });
    }

    // Running.
    let mut window_s = 0.0;
    let mut cpu = Vec::new();
    let clk_tck = procfs::clock_ticks_per_s();
    if !ctx.stop.is_cancelled() {
        let now = Instant::now();
        let _ = phase_tx.send(Phase::Running);
        if let Some(started) = started {
            let _ = started.send(now);
        }
        if let Some(rate) = ctx.offered_rate {
            tokio::spawn(offer(ctx.clone(), rate, schedule));
        }
        tokio::select! {
            () = tokio::time::sleep(plan.warmup) => {}
            () = ctx.stop.cancelled() => {}
        }
        if !ctx.stop.is_cancelled() {
            ctx.cpu_start();
            let from = Instant::now();
            let _ = ctx.measure_from.set(from);
            tokio::select! {
                () = tokio::time::sleep(plan.duration) => ctx.request_stop("duration"),
                () = ctx.stop.cancelled() => {}
            }
            ctx.stopped.store(true, Ordering::Relaxed);
            window_s = from.elapsed().as_secs_f64();
            cpu = ctx.cpu_finish();
        }
    }
    ctx.stopped.store(true, Ordering::Relaxed);
    if let Some(rss) = &mut rss {
        rss.gateway_after_hold_bytes = gateway_rss();
        rss.connections_at_end = ctx.open_connections();
    }

    // Stopping: let frames on their way arrive.
    let _ = phase_tx.send(Phase::Stopping);
    let drain_until = Instant::now() + plan.drain;
    while ctx.tally().half_open() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(DRAIN_CHECK).await;
    }

    // Closing: what users see from now on is not counted, since their peers may already be
    // gone.
    ctx.tally().freeze();
    ctx.closing.store(true, Ordering::Relaxed);
    let _ = phase_tx.send(Phase::Closing);
    tracker.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait()).await;

    Outcome {
        stopped_by: ctx.stop_cause().unwrap_or("duration"),
        connect_s,
        window_s,
        cpu,
        clk_tck,
        rss,
    }
}

/// Ctrl-C and the hard deadline end the window like `--duration-s` does.
fn spawn_stop_triggers(ctx: &Arc<Ctx>, deadline: Duration) {
    let on_deadline = ctx.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(deadline) => on_deadline.request_stop("deadline"),
            () = on_deadline.stop.cancelled() => {}
        }
    });
    let on_signal = ctx.clone();
    tokio::spawn(async move {
        tokio::select! {
            result = tokio::signal::ctrl_c() => {
                if result.is_ok() {
                    on_signal.request_stop("interrupted");
                }
            }
            () = on_signal.stop.cancelled() => {}
        }
    });
}

/// `rate`: the open-loop scheduler. Arrival `k` is due at `start + k / rate`; at each one a
/// pair of free users of one pool (pools in turn) is told to enqueue, with the due time as
/// the start of their wait (so a late scheduler shows up in the latency instead of hiding
/// it). When no pair is free the arrival is `missed`: the offered load needs more `--users`.
async fn offer(ctx: Arc<Ctx>, rate: f64, users: Vec<mpsc::Sender<Instant>>) {
    let start = Instant::now();
    let due = |k: u64| start + Duration::from_secs_f64(k as f64 / rate);
    let mut k = 0u64;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(due(k).into()) => {}
            () = ctx.stop.cancelled() => return,
        }
        let now = Instant::now();
        while due(k) <= now {
            let intended = due(k);
            let pool = (k % u64::from(ctx.pools)) as u32;
            k += 1;
            let in_window = ctx.in_window(intended);
            let outcome = match ctx.take_pair(pool) {
                Some((a, b)) => {
                    for user in [a, b] {
                        if let Some(tx) = users.get(user as usize) {
                            let _ = tx.try_send(intended);
                        }
                    }
                    "arrivals_issued"
                }
                None => "arrivals_missed",
            };
            if in_window {
                let mut tally = ctx.tally();
                tally.count("arrivals_offered");
                tally.count(outcome);
            }
        }
    }
}
