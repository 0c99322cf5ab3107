//! The moderation backend of the embedded default: bans and reports in this process, behind
//! one lock; a new ban closes the banned identity's connections in this instance's registry.
//!
//! Memory stays bounded without a background task: reports are a ring of `--reports-kept`;
//! expired bans, reporters who fell out of the window and reporters whose hour is over are
//! dropped when they are looked at, and all of them in one sweep whenever the maps have
//! doubled since the last one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::review::{
    ReportId, ReportPage, ReportQuery, Review, ReviewState, StoredReport, SCAN_BUDGET,
};
use super::{
    disconnect_banned, Ban, BanKind, Identity, Moderation, ModerationError, Report, ReportFiled,
    ReportPolicy, REPORTED_SESSIONS_KEPT, REPORT_RATE_WINDOW_MS,
};
use crate::ids::unix_ms;
use crate::ids::UserId;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// The smallest size at which a sweep runs: below it, sweeping is not worth the time.
const MIN_SWEEP: usize = 1024;

pub struct MemoryModeration {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    policy: ReportPolicy,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bans: HashMap<(BanKind, String), Ban>,
    /// The latest reports by id, oldest first, with their review decisions.
    reports: BTreeMap<ReportId, (Report, Option<Review>)>,
    /// The sequence number of the next report's id.
    next_report: u64,
    /// Per reported user: who reported them, and when last (unix ms).
    reporters: HashMap<UserId, Vec<(UserId, u64)>>,
    /// Per reporter: its hourly count and the sessions it reported lately.
    filed: HashMap<UserId, Filed>,
    /// Entries in `bans`, `reporters` and `filed` at which the next sweep runs.
    sweep_at: usize,
}

/// What one user reported lately.
#[derive(Default)]
struct Filed {
    /// The current one-hour window (it starts with its first report) and its count.
    window: Option<(u64, u32)>,
    /// Sessions it reported within the report window, oldest first: session, when (unix ms)
    /// and the id of the report kept for it.
    sessions: VecDeque<(Arc<str>, u64, ReportId)>,
}

impl Filed {
    /// Counts a new report against the hourly limit, or says how long to wait.
    fn count(&mut self, now: u64, per_hour: u32) -> Result<(), ModerationError> {
        let (start, count) = match self.window {
            Some((start, count)) if now < start + REPORT_RATE_WINDOW_MS => (start, count),
            _ => (now, 0),
        };
        if count >= per_hour {
            return Err(ModerationError::TooManyReports {
                retry_after_ms: start + REPORT_RATE_WINDOW_MS - now,
            });
        }
        self.window = Some((start, count + 1));
        Ok(())
    }

    /// Whether any of it still matters at `now`.
    fn live(&self, now: u64) -> bool {
        self.window
            .is_some_and(|(start, _)| now < start + REPORT_RATE_WINDOW_MS)
            || !self.sessions.is_empty()
    }
}

impl State {
    /// The ban of `kind`/`value` in force, dropping it if it ran out.
    fn ban(&mut self, kind: BanKind, value: &str, now: u64) -> Option<Ban> {
        let key = (kind, value.to_string());
        match self.bans.get(&key) {
            Some(ban) if ban.live(now) => Some(ban.clone()),
            Some(_) => {
                self.bans.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Drops what ran out once the maps have doubled since the last sweep, so that each entry
    /// costs O(1) sweeping on average.
    fn sweep_if_due(&mut self, now: u64, window_ms: u64) {
        let size = |s: &Self| s.bans.len() + s.reporters.len() + s.filed.len();
        if size(self) < self.sweep_at.max(MIN_SWEEP) {
            return;
        }
        self.bans.retain(|_, ban| ban.live(now));
        self.reporters.retain(|_, list| {
            list.retain(|(_, at)| at + window_ms > now);
            !list.is_empty()
        });
        self.filed.retain(|_, filed| {
            filed.sessions.retain(|(_, at, _)| at + window_ms > now);
            filed.live(now)
        });
        self.sweep_at = 2 * size(self);
    }
}

impl MemoryModeration {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, policy: ReportPolicy) -> Self {
        MemoryModeration {
            registry,
            metrics,
            policy,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No critical section below can panic; recover the data if one ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `ban` in force (the lock held), then, the lock released, closes the connections
    /// it names.
    fn enforce(&self, mut state: std::sync::MutexGuard<'_, State>, ban: &Ban) {
        state
            .bans
            .insert((ban.kind, ban.value.clone()), ban.clone());
        state.sweep_if_due(unix_ms(), self.policy.window.as_millis() as u64);
        drop(state);
        disconnect_banned(
            &self.registry,
            &self.metrics,
            [(ban.kind, ban.value.as_str())],
        );
    }
}

#[async_trait]
impl Moderation for MemoryModeration {
    async fn ban_of(&self, who: &Identity<'_>) -> Result<Option<Ban>, ModerationError> {
        let now = unix_ms();
        let mut state = self.lock();
        Ok(who
            .names()
            .into_iter()
            .find_map(|(kind, value)| state.ban(kind, &value, now)))
    }

    async fn ban(&self, ban: &Ban) -> Result<(), ModerationError> {
        self.enforce(self.lock(), ban);
        Ok(())
    }

    async fn unban(&self, kind: BanKind, value: &str) -> Result<bool, ModerationError> {
        let now = unix_ms();
        let removed = self.lock().bans.remove(&(kind, value.to_string()));
        Ok(removed.is_some_and(|ban| ban.live(now)))
    }

    async fn bans(&self) -> Result<Vec<Ban>, ModerationError> {
        let now = unix_ms();
        let mut state = self.lock();
        state.bans.retain(|_, ban| ban.live(now));
        let mut bans: Vec<Ban> = state.bans.values().cloned().collect();
        drop(state);
        bans.sort_by(|a, b| (a.until_ms, &a.value).cmp(&(b.until_ms, &b.value)));
        Ok(bans)
    }

    async fn report(&self, report: Report) -> Result<ReportFiled, ModerationError> {
        let now = unix_ms();
        let window_ms = self.policy.window.as_millis() as u64;
        let mut guard = self.lock();
        let state = &mut *guard;
        let filed = state.filed.entry(report.reporter.clone()).or_default();
        filed.sessions.retain(|(_, at, _)| at + window_ms > now);
        let earlier = filed
            .sessions
            .iter()
            .position(|(session, _, _)| *session == report.session_id);
        match earlier.and_then(|i| filed.sessions.remove(i)) {
            // The same session again: the new report replaces the earlier one.
            Some((_, _, earlier)) => {
                state.reports.remove(&earlier);
            }
            None => filed.count(now, self.policy.per_hour)?,
        }
        // Ids grow even if the clock steps back.
        let newest = state.reports.last_key_value().map_or(0, |(id, _)| id.ms);
        let id = ReportId {
            ms: now.max(newest),
            seq: state.next_report,
        };
        state.next_report += 1;
        filed
            .sessions
            .push_back((report.session_id.clone(), now, id));
        if filed.sessions.len() > REPORTED_SESSIONS_KEPT {
            filed.sessions.pop_front();
        }
        let reporters = state.reporters.entry(report.reported.clone()).or_default();
        reporters.retain(|(_, at)| at + window_ms > now);
        let distinct = match reporters.iter_mut().find(|(r, _)| *r == report.reporter) {
            Some((_, at)) => {
                *at = now;
                None
            }
            None => {
                reporters.push((report.reporter.clone(), now));
                Some(reporters.len() as u64)
            }
        };
        let banned = state.ban(BanKind::User, &report.reported, now).is_some();
        let due = self.policy.ban_due(&report, distinct, banned);
        state.reports.insert(id, (report, None));
        while state.reports.len() > self.policy.kept {
            state.reports.pop_first();
        }
        match &due {
            Some(ban) => self.enforce(guard, ban),
            None => state.sweep_if_due(now, window_ms),
        }
        Ok(ReportFiled { id, ban: due })
    }

    async fn reports(&self, query: &ReportQuery) -> Result<ReportPage, ModerationError> {
        let state = self.lock();
        let range = match query.upper() {
            Some(upper) => state.reports.range(query.lower()..upper),
            None => state.reports.range(query.lower()..),
        };
        let mut walked = range.rev().map(|(id, (report, review))| StoredReport {
            id: *id,
            report: report.clone(),
            review: *review,
        });
        let budget: Vec<StoredReport> = walked.by_ref().take(SCAN_BUDGET).collect();
        let exhausted = walked.next().is_none();
        Ok(ReportPage::from_walk(query, budget, exhausted))
    }

    async fn review(
        &self,
        id: ReportId,
        state: ReviewState,
    ) -> Result<Option<StoredReport>, ModerationError> {
        let mut guard = self.lock();
        let Some((report, review)) = guard.reports.get_mut(&id) else {
            return Ok(None);
        };
        if review.is_none_or(|r| r.state != state) {
            *review = Some(Review {
                state,
                at_ms: unix_ms(),
            });
        }
        Ok(Some(StoredReport {
            id,
            report: report.clone(),
            review: *review,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ids::ConnId;
    use crate::protocol::{close, ReportReason};
    use crate::registry::{ConnectionHandle, Next};

    fn backend(registry: Arc<Registry>) -> MemoryModeration {
        let policy = ReportPolicy {
            threshold: 2,
            window: Duration::from_secs(60),
            ban_ttl: Duration::from_secs(60),
            kept: 2,
            per_hour: 3,
        };
        MemoryModeration::new(registry, Arc::new(Metrics::new()), policy)
    }

    fn report(reporter: &str) -> Report {
        Report {
            session_id: format!("s-{reporter}").into(),
            reporter: reporter.into(),
            reported: "bad".into(),
            reason: ReportReason::Harassment,
            details: None,
            at_ms: unix_ms(),
        }
    }

    #[tokio::test]
    async fn distinct_reporters_ban_and_close_the_connection() {
        let registry = Arc::new(Registry::default());
        let ip = "10.0.0.1".parse().unwrap();
        let (handle, outbox) = ConnectionHandle::new(ConnId(1), 8, ip, None);
        registry.register("bad".into(), handle);
        let m = backend(registry.clone());
        assert_eq!(m.report(report("r1")).await.unwrap().ban, None);
        assert_eq!(
            m.report(report("r1")).await.unwrap().ban,
            None,
            "counts once"
        );
        let ban = m.report(report("r2")).await.unwrap().ban.expect("banned");
        assert_eq!(ban.value, "bad");
        assert!(matches!(outbox.next().await, Next::Close(close::BANNED)));
        assert_eq!(m.report(report("r3")).await.unwrap().ban, None, "already");
        assert_eq!(m.lock().reports.len(), 2, "only the latest are kept");
        let networks = [ip.into()];
        let who = Identity {
            user: "bad",
            device: None,
            networks: &networks,
        };
        assert_eq!(m.ban_of(&who).await.unwrap(), Some(ban));
        assert!(m.unban(BanKind::User, "bad").await.unwrap());
        assert!(!m.unban(BanKind::User, "bad").await.unwrap());
        assert_eq!(m.ban_of(&who).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_flood_from_one_reporter_does_not_push_out_anyone_else() {
        let policy = ReportPolicy {
            threshold: 0,
            window: Duration::from_secs(3600),
            ban_ttl: Duration::from_secs(60),
            kept: 5,
            per_hour: 3,
        };
        let m = MemoryModeration::new(
            Arc::new(Registry::default()),
            Arc::new(Metrics::new()),
            policy,
        );
        let genuine = Report {
            reporter: "genuine".into(),
            session_id: "s-g".into(),
            ..report("genuine")
        };
        m.report(genuine.clone()).await.unwrap();
        // Over and over about one session: each replaces the one before.
        for i in 0..200 {
            let again = Report {
                reporter: "flooder".into(),
                details: Some(format!("take {i}")),
                ..report("flooder")
            };
            m.report(again).await.unwrap();
        }
        // About many sessions: the hourly limit.
        let mut limited = 0;
        for i in 0..200 {
            let other = Report {
                reporter: "flooder".into(),
                session_id: format!("s-{i}").into(),
                ..report("flooder")
            };
            match m.report(other).await {
                Ok(_) => {}
                Err(ModerationError::TooManyReports { retry_after_ms }) => {
                    assert!(retry_after_ms > 0 && retry_after_ms <= 3_600_000);
                    limited += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(limited, 198, "one session plus two more within the hour");
        let state = m.lock();
        let kept: Vec<&Report> = state.reports.values().map(|(r, _)| r).collect();
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[0], &genuine, "the genuine report is still there");
        let replaced = kept.iter().filter(|r| *r.session_id == *"s-flooder");
        let details: Vec<_> = replaced.map(|r| r.details.as_deref()).collect();
        assert_eq!(
            details,
            [Some("take 199")],
            "one report per session, the latest"
        );
    }

    #[tokio::test]
    async fn bans_by_device_and_address_and_lists_live_ones() {
        let registry = Arc::new(Registry::default());
        let ip: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let (phone, phone_out) = ConnectionHandle::new(ConnId(1), 8, ip, Some("phone".into()));
        let (other, _) = ConnectionHandle::new(ConnId(2), 8, ip, None);
        registry.register("u1".into(), phone);
        registry.register("u2".into(), other);
        let m = backend(registry.clone());
        let by_device = Ban::new(
            BanKind::Device,
            "phone".into(),
            None,
            Duration::from_secs(60),
        );
        m.ban(&by_device).await.unwrap();
        assert!(matches!(phone_out.next().await, Next::Close(close::BANNED)));
        let networks = [ip.into()];
        let who = Identity {
            user: "u3",
            device: Some("phone"),
            networks: &networks,
        };
        assert_eq!(m.ban_of(&who).await.unwrap(), Some(by_device.clone()));
        let gone = Ban {
            until_ms: 1,
            ..Ban::new(BanKind::Ip, "10.0.0.9".into(), None, Duration::ZERO)
        };
        m.ban(&gone).await.unwrap();
        assert_eq!(m.bans().await.unwrap(), vec![by_device]);
        assert!(!m.unban(BanKind::Ip, "10.0.0.9").await.unwrap());
    }
}
