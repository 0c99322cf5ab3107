//! Reports, bans and the admin side of the gateway.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use super::Gateway;
use crate::matching::UserId;
use crate::protocol::ReportReason;

impl Gateway {
    /// Handles a `report`: returns the direct reply and whether it is an error the client
    /// caused.
    pub(super) async fn report(
        self: &Arc<Self>,
        user: &UserId,
        reason: ReportReason,
        details: Option<String>,
        session: Option<&str>,
        reference: Option<&str>,
    ) -> (Utf8Bytes, bool) {
        let _ = (user, reason, details, session, reference);
        todo!("reports: issue 5")
    }
}
