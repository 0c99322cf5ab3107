//! Reports: a user tells on the peer of their current or most recent session (or of the one
//! they name). The matchmaker says who that peer was; the moderation backend stores the
//! report and counts it towards an automatic ban, which closes the reported user's
//! connections wherever they are. The backend also keeps one account from flooding the store
//! (one report per session, an hourly limit per reporter).

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use super::Gateway;
use crate::ids::unix_ms;
use crate::matching::overview::Overview;
use crate::matching::{ConnId, MatchError, UserId};
use crate::metrics::BanSource;
use crate::moderation::Report;
use crate::privacy;
use crate::protocol::{Reply, ReportReason};
use crate::webhooks::Event;

impl Gateway {
    /// A moderator ends the live session `session` (see [`crate::matching::Matchmaker`]):
    /// false when no live session has that id.
    pub async fn moderator_end(self: &Arc<Self>, session: &str) -> Result<bool, MatchError> {
        let (ended, outcome) = self.matchmaker.moderator_end(session).await?;
        self.apply_outcome(outcome);
        Ok(ended)
    }

    /// The matching state at a glance, for the admin API's stats.
    pub async fn overview(&self) -> Result<Overview, MatchError> {
        self.matchmaker.overview().await
    }

    /// Handles a `report`: returns the direct reply and whether it is an error the client
    /// caused.
    pub(super) async fn report(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        reason: ReportReason,
        details: Option<String>,
        session: Option<&str>,
        reference: Option<&str>,
    ) -> (Utf8Bytes, bool) {
        match self.file_report(user, reason, details, session).await {
            Ok(()) => {
                let ack = Reply::Ack {
                    action: "report",
                    reference,
                };
                (ack.encode(), false)
            }
            Err(e) => self.match_error(conn, &e, reference),
        }
    }

    async fn file_report(
        &self,
        user: &UserId,
        reason: ReportReason,
        details: Option<String>,
        session: Option<&str>,
    ) -> Result<(), MatchError> {
        let (session_id, reported) = self.matchmaker.recent_peer(user, session).await?;
        let report = Report {
            session_id,
            reporter: user.clone(),
            reported: reported.clone(),
            reason,
            details,
            at_ms: unix_ms(),
        };
        let filed = self.moderation.report(report.clone()).await?;
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
