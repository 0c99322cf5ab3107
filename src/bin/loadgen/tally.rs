//! The run's bookkeeping, shared by every user task behind one mutex (taken once per
//! `matched` and per error, never per heartbeat): the sessions seen and by whom, the latency
//! histogram, matches in the measured window, and errors by kind.
//!
//! Sessions are checked, not just counted. Every `matched` is a *sighting* of its session by
//! one user; a session must be sighted exactly once by exactly two users. A second sighting by
//! the same user, a third user, or a user matched while still in another session is a
//! `duplicate`; a session sighted by one user only when the run ends is `half_seen`. Both must
//! be 0 on a correct gateway.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in µs up to an hour (longer ones are clamped to it), with three
/// significant digits.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// A session's sightings: the users who saw its `matched`.
#[derive(Clone, Copy)]
struct Sighting {
    first: u32,
    /// `NOBODY` until the second user saw it.
    second: u32,
    /// Whether the first sighting fell inside the measured window. The match belongs to the
    /// window by its first sighting, and both members' latency samples go with it: a session
    /// whose two `matched` straddle the window's start would otherwise count as a match with
    /// one sample.
    in_window: bool,
}

const NOBODY: u32 = u32::MAX;

/// What one `matched` meant for the bookkeeping.
#[derive(Debug, PartialEq, Eq)]
pub struct Sighted {
    /// The session's second sighting, of a session first sighted inside the measured window:
    /// one more match.
    pub completed_in_window: bool,
    /// Matches in the window so far.
    pub matches_in_window: u64,
}

pub struct Tally {
    sessions: HashMap<u64, Sighting>,
    /// Sessions sighted once so far.
    half_open: u64,
    duplicates: u64,
    matches_in_window: u64,
    latency: Histogram<u64>,
    handshake: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// Things worth counting that are not errors (reconnects, resumes, arrivals).
    counters: BTreeMap<&'static str, u64>,
    /// Set when the run closes: sightings after that are not counted.
    frozen: bool,
    /// Users by their state at the end of the run.
    end_states: BTreeMap<&'static str, u64>,
}

impl Default for Tally {
    fn default() -> Tally {
        let histogram =
            || Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds");
        Tally {
            sessions: HashMap::new(),
            half_open: 0,
            duplicates: 0,
            matches_in_window: 0,
            latency: histogram(),
            handshake: histogram(),
            errors: BTreeMap::new(),
            counters: BTreeMap::new(),
            end_states: BTreeMap::new(),
            frozen: false,
        }
    }
}

impl Tally {
    /// User `user` received `matched` for session `key`; `in_window` says whether the moment
    /// is inside the measured window (what counts is the session's first sighting), `wait` is
    /// the latency sample (none when the wait was not one: it timed out, or it started with no
    /// request of the user's).
    pub fn matched(
        &mut self,
        user: u32,
        key: u64,
        in_window: bool,
        wait: Option<Duration>,
    ) -> Sighted {
        let mut completed_in_window = false;
        if self.frozen {
            return Sighted {
                completed_in_window,
                matches_in_window: self.matches_in_window,
            };
        }
        let measured = match self.sessions.get_mut(&key) {
            None => {
                self.sessions.insert(
                    key,
                    Sighting {
                        first: user,
                        second: NOBODY,
                        in_window,
                    },
                );
                self.half_open += 1;
                in_window
            }
            Some(s) if s.first != user && s.second == NOBODY => {
                s.second = user;
                self.half_open -= 1;
                if s.in_window {
                    self.matches_in_window += 1;
                    completed_in_window = true;
                }
                s.in_window
            }
            Some(_) => {
                self.duplicates += 1;
                false
            }
        };
        if let (true, Some(wait)) = (measured, wait) {
            let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
            self.latency.saturating_record(us.max(1));
        }
        Sighted {
            completed_in_window,
            matches_in_window: self.matches_in_window,
        }
    }

    /// Stops counting sightings: the run is closing, and a session's second member may be
    /// gone before its `matched` arrives.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// A user was matched while its previous session had not ended.
    pub fn matched_while_in_session(&mut self) {
        if !self.frozen {
            self.duplicates += 1;
        }
    }

    /// Sessions sighted by one user only, so far.
    pub fn half_open(&self) -> u64 {
        self.half_open
    }

    pub fn handshake(&mut self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.handshake.saturating_record(us.max(1));
    }

    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    pub fn count(&mut self, what: &'static str) {
        *self.counters.entry(what).or_default() += 1;
    }

    pub fn counter(&self, what: &str) -> u64 {
        self.counters.get(what).copied().unwrap_or(0)
    }

    pub fn end_state(&mut self, state: &'static str) {
        *self.end_states.entry(state).or_default() += 1;
    }

    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    pub fn end_states(&self) -> &BTreeMap<&'static str, u64> {
        &self.end_states
    }

    pub fn sessions_seen(&self) -> u64 {
        self.sessions.len() as u64
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn matches_in_window(&self) -> u64 {
        self.matches_in_window
    }

    pub fn latency(&self) -> Percentiles {
        Percentiles::of(&self.latency)
    }

    pub fn handshake_latency(&self) -> Percentiles {
        Percentiles::of(&self.handshake)
    }
}

/// A latency distribution in ms (µs resolution).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            samples: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_session_seen_by_both_members_is_one_match() {
        let mut t = Tally::default();
        let first = t.matched(1, 77, true, Some(MS));
        assert!(!first.completed_in_window);
        assert_eq!(t.half_open(), 1);
        let second = t.matched(2, 77, true, Some(2 * MS));
        assert_eq!(
            second,
            Sighted {
                completed_in_window: true,
                matches_in_window: 1
            }
        );
        assert_eq!(
            (t.half_open(), t.duplicates(), t.sessions_seen()),
            (0, 0, 1)
        );
        assert_eq!(t.latency().samples, 2);
    }

    #[test]
    fn repeated_and_third_sightings_are_duplicates() {
        let mut t = Tally::default();
        t.matched(1, 5, true, None);
        t.matched(1, 5, true, None); // the same user twice, before the peer
        assert_eq!((t.duplicates(), t.half_open()), (1, 1));
        t.matched(2, 5, true, None);
        t.matched(2, 5, true, None); // the same user twice, after the pair completed
        t.matched(3, 5, true, None); // a third user
        assert_eq!(
            (t.duplicates(), t.half_open(), t.matches_in_window()),
            (3, 0, 1)
        );
    }

    #[test]
    fn a_session_seen_once_stays_half_open() {
        let mut t = Tally::default();
        t.matched(1, 1, true, Some(MS));
        t.matched(2, 1, true, Some(MS));
        t.matched(3, 2, true, Some(MS));
        assert_eq!(t.half_open(), 1);
        assert_eq!(t.matches_in_window(), 1);
    }

    #[test]
    fn outside_the_window_nothing_is_measured_but_sessions_are_checked() {
        let mut t = Tally::default();
        t.matched(1, 9, false, Some(MS));
        let s = t.matched(2, 9, false, Some(MS));
        assert!(!s.completed_in_window);
        assert_eq!(
            (t.matches_in_window(), t.latency().samples, t.half_open()),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_session_belongs_to_the_window_of_its_first_sighting_with_both_samples() {
        let mut t = Tally::default();
        // Straddles the window's start: not measured at all.
        t.matched(1, 3, false, Some(MS));
        let s = t.matched(2, 3, true, Some(MS));
        assert!(!s.completed_in_window);
        // Straddles its end (the run stopped between the two): one match, two samples.
        t.matched(3, 6, true, Some(MS));
        let s = t.matched(4, 6, false, Some(MS));
        assert!(s.completed_in_window);
        assert_eq!((t.matches_in_window(), t.latency().samples), (1, 2));
        assert_eq!(t.half_open(), 0);
    }

    #[test]
    fn nothing_is_sighted_after_the_freeze() {
        let mut t = Tally::default();
        t.matched(1, 4, true, None);
        t.freeze();
        t.matched(2, 4, true, None);
        t.matched(3, 8, true, None);
        assert_eq!(
            (t.half_open(), t.sessions_seen(), t.matches_in_window()),
            (1, 1, 0)
        );
    }

    #[test]
    fn percentiles_are_in_ms_with_microsecond_resolution() {
        let mut t = Tally::default();
        for us in [250u64, 1_500, 2_000, 40_000] {
            t.matched(us as u32, us, true, Some(Duration::from_micros(us)));
        }
        let p = t.latency();
        assert_eq!(p.samples, 4);
        assert!((p.p50 - 1.5).abs() < 0.01, "{p:?}");
        assert!((p.max - 40.0).abs() < 0.05, "{p:?}");
        assert!(Percentiles::of(&Histogram::new(3).unwrap()).samples == 0);
    }
}
