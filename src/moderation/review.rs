//! Reviewing reports: the ids reports are stored under, their review state (open, resolved,
//! dismissed), and the query the admin API lists them with (filters, a cursor, a bounded
//! page).
//!
//! Both backends name a report `<ms>-<n>` (the Redis stream's entry ids; the memory backend
//! uses the time it stored the report and a counter), so ids sort by age and a page's cursor
//! (the last id it listed) means the same in either backend. A listing walks the reports
//! newest first and looks at no more than [`SCAN_BUDGET`] of them per call, so a filter that
//! matches little cannot make one request read the whole store: it then answers a short (or
//! empty) page with a cursor to carry on from.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::Report;
use crate::matching::UserId;
use crate::protocol::ReportReason;

/// Reports looked at per listing call at most, matching or not.
pub const SCAN_BUDGET: usize = 2_000;

/// The largest page the admin API serves, and the default.
pub const MAX_PAGE: usize = 200;
pub const DEFAULT_PAGE: usize = 50;

/// A stored report's id: the ms it was stored and a sequence number, ordered as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReportId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for ReportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for ReportId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |part: &str| {
            (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
        };
        s.split_once('-')
            .and_then(|(ms, seq)| {
                Some(ReportId {
                    ms: parse(ms)?,
                    seq: parse(seq)?,
                })
            })
            .ok_or_else(|| format!("{s:?} is not a report id (<ms>-<n>)"))
    }
}

/// Where a report stands in review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewState {
    Open,
    Resolved,
    Dismissed,
}

impl ReviewState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewState::Open => "open",
            ReviewState::Resolved => "resolved",
            ReviewState::Dismissed => "dismissed",
        }
    }

    pub fn parse(s: &str) -> Option<ReviewState> {
        [
            ReviewState::Open,
            ReviewState::Resolved,
            ReviewState::Dismissed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

/// A review decision: resolved or dismissed, and when (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Review {
    pub state: ReviewState,
    pub at_ms: u64,
}

/// A report as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReport {
    pub id: ReportId,
    pub report: Report,
    /// `None` while open.
    pub review: Option<Review>,
}

impl StoredReport {
    pub fn state(&self) -> ReviewState {
        self.review.map_or(ReviewState::Open, |r| r.state)
    }
}

/// Which reports to list: every filter that is set must hold.
#[derive(Debug, Clone, Default)]
pub struct ReportQuery {
    /// The reporter or the reported user.
    pub user: Option<UserId>,
    pub reason: Option<ReportReason>,
    pub state: Option<ReviewState>,
    /// Stored at or after (unix ms).
    pub since_ms: Option<u64>,
    /// Stored before (unix ms).
    pub until_ms: Option<u64>,
    /// Only reports older than this one (the previous page's cursor).
    pub before: Option<ReportId>,
    /// At most this many (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

impl ReportQuery {
    /// Whether `r` passes the filters (the time range and the cursor are the caller's walk).
    pub fn admits(&self, r: &StoredReport) -> bool {
        self.user
            .as_ref()
            .is_none_or(|u| *r.report.reporter == **u || *r.report.reported == **u)
            && self.reason.is_none_or(|reason| r.report.reason == reason)
            && self.state.is_none_or(|state| r.state() == state)
    }

    /// The newest id to walk down from, exclusive: the cursor or the end of the time range,
    /// whichever comes first.
    pub fn upper(&self) -> Option<ReportId> {
        let until = self.until_ms.map(|ms| ReportId { ms, seq: 0 });
        match (self.before, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The oldest id the walk reaches, inclusive.
    pub fn lower(&self) -> ReportId {
        ReportId {
            ms: self.since_ms.unwrap_or(0),
            seq: 0,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ReportPage {
    pub reports: Vec<StoredReport>,
    /// Where the next page starts, or `None` when the walk reached the end of the range.
    pub next: Option<ReportId>,
}

impl ReportPage {
    /// Builds a page from a walk down the range: `walked` are the reports looked at, newest
    /// first (at most [`SCAN_BUDGET`]), and `exhausted` whether the range had no more.
    pub fn from_walk(
        query: &ReportQuery,
        walked: impl IntoIterator<Item = StoredReport>,
        exhausted: bool,
    ) -> ReportPage {
        let mut page = ReportPage::default();
        let mut last = None;
        for r in walked {
            last = Some(r.id);
            if query.admits(&r) {
                page.reports.push(r);
                if page.reports.len() == query.limit {
                    page.next = last;
                    return page;
                }
            }
        }
        page.next = if exhausted { None } else { last };
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_what_they_write_and_sort_by_age() {
        let id: ReportId = "1700000000000-3".parse().unwrap();
        assert_eq!(id.to_string(), "1700000000000-3");
        assert!(id < "1700000000000-10".parse().unwrap());
        assert!(id < "1700000000001-0".parse().unwrap());
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "+1-2",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<ReportId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_page_stops_at_the_limit_or_says_where_the_walk_stopped() {
        let report = |ms, reason| StoredReport {
            id: ReportId { ms, seq: 0 },
            report: Report {
                session_id: "s".into(),
                reporter: "a".into(),
                reported: "b".into(),
                reason,
                details: None,
                at_ms: ms,
            },
            review: None,
        };
        let walked = || {
            (0..10).rev().map(|ms| {
                report(
                    ms,
                    if ms % 2 == 0 {
                        ReportReason::Spam
                    } else {
                        ReportReason::Other
                    },
                )
            })
        };
        let query = ReportQuery {
            reason: Some(ReportReason::Spam),
            limit: 2,
            ..Default::default()
        };
        let page = ReportPage::from_walk(&query, walked(), true);
        let ids: Vec<u64> = page.reports.iter().map(|r| r.id.ms).collect();
        assert_eq!(ids, [8, 6]);
        assert_eq!(page.next, Some(ReportId { ms: 6, seq: 0 }));
        let all = ReportQuery {
            limit: 50,
            ..query.clone()
        };
        assert_eq!(ReportPage::from_walk(&all, walked(), true).next, None);
        assert_eq!(
            ReportPage::from_walk(&all, walked(), false).next,
            Some(ReportId { ms: 0, seq: 0 }),
            "the budget ran out: carry on below the last one looked at"
        );
        let by_user = ReportQuery {
            user: Some("b".into()),
            limit: 50,
            ..Default::default()
        };
        assert_eq!(
            ReportPage::from_walk(&by_user, walked(), true)
                .reports
                .len(),
            10
        );
        let nobody = ReportQuery {
            user: Some("c".into()),
            limit: 50,
            ..Default::default()
        };
        assert!(ReportPage::from_walk(&nobody, walked(), true)
            .reports
            .is_empty());
    }
}
