//! Reports: a user tells on the peer of their current or most recent session (or of the one
//! they name). The matchmaker says who that peer was; the moderation backend stores the
//! report and counts it towards an automatic ban, which closes the reported user's
//! connections wherever they are. The backend also keeps one account from flooding the store
//! (one report per session, an hourly limit per reporter). Blocks, reports and the bans they
//! bring about also go to the ledger, when there is one.

use std::sync::Arc;

use super::{Answer, Gateway, Origin};
use crate::ids::{unix_ms, ConnId, UserId};
use crate::matching::overview::Overview;
use crate::matching::{MatchError, Outcome, RecentPeer};
use crate::metrics::BanSource;
use crate::moderation::Report;
use crate::privacy;
use crate::protocol::{Reply, ReportReason};
use crate::webhooks::Event;

impl Gateway {
    /// A moderator ends the live session `session` (see [`crate::matching::Administration::moderator_end`]):
    /// false when no live session has that id.
    pub async fn moderator_end(self: &Arc<Self>, session: &str) -> Result<bool, MatchError> {
        let Some(outcome) = self.matchmaker.moderator_end(session).await? else {
            return Ok(false);
        };
        self.apply(Origin::Background, outcome);
        Ok(true)
    }

    /// The matching state at a glance, for the admin API's stats.
    pub async fn overview(&self) -> Result<Overview, MatchError> {
        self.matchmaker.overview().await
    }

    /// Handles a `report`: returns the direct reply (an `ack`, or the error).
    pub(super) async fn report(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        reason: ReportReason,
        details: Option<String>,
        session: Option<&str>,
        reference: Option<&str>,
    ) -> Answer {
        match self.file_report(user, reason, details, session).await {
            Ok(()) => {
                let ack = Reply::Ack {
                    action: "report",
                    reference,
                };
                Answer::reply(ack.encode())
            }
            Err(e) => self.match_error(conn, &e, reference),
        }
    }

    /// Blocks the peer of `session` (see [`crate::matching::Matchmaker::block`]). With a
    /// ledger, the session is resolved first and exactly its peer blocked, so that the ledger
    /// records whom.
    pub(super) async fn block(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<Outcome, MatchError> {
        let Some(ledger) = &self.ledger else {
            return self.matchmaker.block(user, session).await;
        };
        let Ok(RecentPeer { session_id, peer }) = self.matchmaker.recent_peer(user, session).await
        else {
            // No such session (or the backend is down): the block fails alike, with its error.
            return self.matchmaker.block(user, session).await;
        };
        let outcome = self.matchmaker.block(user, Some(&session_id)).await?;
        ledger.block(user, peer, session_id);
        Ok(outcome)
    }

    async fn file_report(
        &self,
        user: &UserId,
        reason: ReportReason,
        details: Option<String>,
        session: Option<&str>,
    ) -> Result<(), MatchError> {
        let RecentPeer {
            session_id,
            peer: reported,
        } = self.matchmaker.recent_peer(user, session).await?;
        let report = Report {
            session_id,
            reporter: user.clone(),
            reported: reported.clone(),
            reason,
            details,
            at_ms: unix_ms(),
        };
        let filed = self.moderation.report(report.clone()).await?;
        if let Some(ledger) = &self.ledger {
            ledger.report(report.clone());
            if let Some(ban) = &filed.ban {
                ledger.ban(ban, BanSource::Reports);
            }
        }
        self.metrics.report(reason);
        self.notify(|| Event::report_created(filed.id, &report));
        tracing::info!(
            reporter = %privacy::shown(user),
            reported = %privacy::shown(&reported),
            reason = reason.as_str(),
            "report"
        );
        if let Some(ban) = filed.ban {
            self.metrics.ban(BanSource::Reports);
            self.notify(|| Event::user_banned(&ban, BanSource::Reports));
            tracing::info!(
                user = %privacy::shown(&ban.value),
                until_ms = ban.until_ms,
                "banned after reports"
            );
        }
        Ok(())
    }
}
