//! Deliberately broken engines: each wraps a correct memory engine and gets one rule wrong.
//! The differential test, run against memory and one broken engine at a time, must catch
//! every one of them within a bounded number of generated cases, or the test is too weak to
//! trust when it passes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use matchgate::attributes::Attributes;
use matchgate::clock::ManualClock;
use matchgate::matching::overview::Overview;
use matchgate::matching::{
    Administration, Attached, ClientOperations, ConnId, Engine as EngineOps, MatchError,
    MediaEvents, MediaLeft, MediaReady, Outcome, RecentPeer, Resume, SessionInfo, Stats, Status,
    Timer, Timers, UserId,
};
use matchgate::protocol::{Media, Prefs, Relay};
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::differential::{case_strategy, config, run_case};
use super::engines::Engine;

/// The one rule each broken engine gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `skip` ends the session like `end` (no re-queue, wrong reasons).
    SkipIsEnd,
    /// `accept` is acknowledged and ignored: proposals never go live.
    AcceptIgnored,
    /// Outcomes lose their timers: no relaxation, no fallback, no proposal timeout.
    TimersLost,
    /// The grace period never runs out.
    ExpireIgnored,
    /// `media_failed` is acknowledged and ignored: the pair stays pending.
    MediaFailureIgnored,
    /// `enqueue` refused by the enqueue rate reports success.
    RateIgnored,
    /// `enqueue` refused by a cooldown reports success.
    CooldownIgnored,
    /// The token's attributes never reach the engine: every `want` fails.
    AttributesLost,
    /// `enqueue` drops the interests (and `interests_only`).
    InterestsIgnored,
    /// The interests wait never ends: `Timer::Interests` is acknowledged and ignored.
    InterestsNeverWiden,
}

const FAULTS: [Fault; 10] = [
    Fault::SkipIsEnd,
    Fault::AcceptIgnored,
    Fault::TimersLost,
    Fault::ExpireIgnored,
    Fault::MediaFailureIgnored,
    Fault::RateIgnored,
    Fault::CooldownIgnored,
    Fault::AttributesLost,
    Fault::InterestsIgnored,
    Fault::InterestsNeverWiden,
];

struct Broken {
    inner: Arc<dyn EngineOps>,
    fault: Fault,
}

impl Broken {
    fn outcome(&self, o: Outcome) -> Outcome {
        if self.fault == Fault::TimersLost {
            return Outcome {
                timers: Vec::new(),
                ..o
            };
        }
        o
    }
}

#[async_trait]
impl ClientOperations for Broken {
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        let mut a = self.inner.attach(user, conn, resume).await?;
        a.outcome = self.outcome(a.outcome);
        Ok(a)
    }

    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        self.inner.detach(user, conn).await.map(|o| self.outcome(o))
    }

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        attributes: Arc<Attributes>,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError> {
        let mut prefs = prefs;
        let mut attributes = attributes;
        match self.fault {
            Fault::AttributesLost => attributes = Arc::default(),
            Fault::InterestsIgnored => {
                prefs.interests.clear();
                prefs.interests_only = false;
            }
            _ => {}
        }
        match self.inner.enqueue(user, prefs, attributes, reference).await {
            // Says yes where a limit says no.
            Err(MatchError::RateLimited { .. }) if self.fault == Fault::RateIgnored => {
                Ok(Outcome::default())
            }
            Err(MatchError::Cooldown { .. }) if self.fault == Fault::CooldownIgnored => {
                Ok(Outcome::default())
            }
            other => other.map(|o| self.outcome(o)),
        }
    }

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        if self.fault == Fault::SkipIsEnd {
            return self.inner.end(user, reference).await;
        }
        self.inner
            .skip(user, reference)
            .await
            .map(|o| self.outcome(o))
    }

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        self.inner
            .end(user, reference)
            .await
            .map(|o| self.outcome(o))
    }

    async fn status(&self, user: &UserId) -> Result<Status, MatchError> {
        self.inner.status(user).await
    }

    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError> {
        self.inner
            .block(user, session)
            .await
            .map(|o| self.outcome(o))
    }

    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<RecentPeer, MatchError> {
        self.inner.recent_peer(user, session).await
    }

    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        if self.fault == Fault::AcceptIgnored {
            return Ok(Outcome::default());
        }
        self.inner
            .accept(user, match_id)
            .await
            .map(|o| self.outcome(o))
    }

    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        self.inner
            .decline(user, match_id)
            .await
            .map(|o| self.outcome(o))
    }

    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError> {
        self.inner.relay(user, message).await
    }
}

#[async_trait]
impl Timers for Broken {
    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        if self.fault == Fault::ExpireIgnored {
            return Ok(Outcome::default());
        }
        self.inner.expire(user, conn).await.map(|o| self.outcome(o))
    }

    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError> {
        self.inner.refresh_pool(pool).await
    }

    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError> {
        if self.fault == Fault::InterestsNeverWiden && matches!(timer, Timer::Interests { .. }) {
            return Ok(Outcome::default());
        }
        self.inner.wake(user, timer).await.map(|o| self.outcome(o))
    }
}

#[async_trait]
impl Administration for Broken {
    async fn stats(&self) -> Result<Stats, MatchError> {
        self.inner.stats().await
    }

    async fn lease(&self, name: &str, ttl: Duration) -> Result<bool, MatchError> {
        self.inner.lease(name, ttl).await
    }

    async fn restore_blocks(&self, blocker: &UserId, blocked: &[UserId]) -> Result<(), MatchError> {
        self.inner.restore_blocks(blocker, blocked).await
    }

    async fn overview(&self) -> Result<Overview, MatchError> {
        self.inner.overview().await
    }

    async fn moderator_end(&self, session: &str) -> Result<Option<Outcome>, MatchError> {
        self.inner.moderator_end(session).await
    }
}

#[async_trait]
impl MediaEvents for Broken {
    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<MediaReady, MatchError> {
        let ready = self.inner.media_ready(session, media).await?;
        Ok(MediaReady {
            outcome: self.outcome(ready.outcome),
            ..ready
        })
    }

    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError> {
        if self.fault == Fault::MediaFailureIgnored {
            return Ok(Outcome::default());
        }
        self.inner
            .media_failed(session)
            .await
            .map(|o| self.outcome(o))
    }

    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<MediaLeft, MatchError> {
        self.inner.media_left(session, left, event_id, dedupe).await
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError> {
        self.inner.sessions().await
    }
}

/// Cases each broken engine may take to be caught. Proptest draws each case independently
/// (a random seed per run, or `PROPTEST_RNG_SEED`), so the cases a fault takes are
/// geometric: with `p` the share of cases that catch it, it slips through with probability
/// `(1 - p)^300`. Measured with the cooldown scene of `differential.rs` (November 2026), the
/// rarest is `MediaFailureIgnored`: mean 22 cases over 200 seeds (p ~ 0.046), so about 1e-6
/// per run (5e-6 at the 95% bound of the mean); over 30 seeds each, the cooldown, rate and
/// attribute faults took under 10 cases on average (below 1e-14), the others under 5. A
/// generator change that makes a rule rare must keep these odds.
const BUDGET: u32 = 300;

#[test]
fn every_broken_engine_is_caught() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for fault in FAULTS {
        let mut runner = TestRunner::new(Config {
            cases: BUDGET,
            failure_persistence: None,
            // The first failing case is enough: no shrinking.
            max_shrink_iters: 0,
            ..Config::default()
        });
        let outcome = runner.run(&case_strategy(), |case| {
            rt.block_on(async {
                let clock = Arc::new(ManualClock::new(1_700_000_000_000));
                let config = config(&case);
                let mut broken = Engine::memory(&config, clock.clone());
                broken.name = "broken";
                broken.mm = Arc::new(Broken {
                    inner: broken.mm.clone(),
                    fault,
                });
                let engines = vec![Engine::memory(&config, clock.clone()), broken];
                run_case(&case, engines, clock).await
            })
            .map_err(TestCaseError::fail)
        });
        assert!(
            outcome.is_err(),
            "the broken engine {fault:?} passed {BUDGET} cases"
        );
    }
}
