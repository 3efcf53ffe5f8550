//! Expiry, the agent's side: a thread of its own runs the kernel's reaper program (see
//! `tcp-ebpf/src/reaper.rs`) once a second, so that a scrape never waits behind a walk of a
//! million records, and a slow scrape never delays expiry.
//!
//! A walk (`bpf_for_each_map_elem`) visits every bucket of a table, empty or not: with the
//! SRSO mitigation, about 16 ns a bucket here (the helper enters and leaves an RCU section
//! per bucket), so 1M slots cost 3.4% of a CPU for the two walks a second (expiry, then the
//! view). Two things keep an idle agent's cost from growing with empty capacity:
//! - A table is left out when it cannot hold a record: its last walk visited none and nothing
//!   was inserted into it since (the programs count every insert, and the count is read
//!   before the walk, so a record inserted during a walk that missed it is walked the next
//!   second).
//! - A sparse table (at most one record per `SPARSE_SLOTS_PER_RECORD` slots at its last walk,
//!   and at most `LISTED_SLOTS` of them) is not walked: its keys are listed with
//!   `BPF_MAP_LOOKUP_BATCH`, which skips an empty bucket in about 2 ns, and both programs
//!   visit those records by lookup. A record inserted after the listing is visited the next
//!   second, as one a walk missed would be. The listing is kept while nothing is inserted
//!   into its tables (a removed record's key is simply not found), so an idle table is
//!   listed once.

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use tcp_common::{
    metrics::{WalkView, table},
    reap::ReapRequest,
    track::Timeouts,
};

use crate::{
    collector::sparse_tables,
    error::error_chain,
    loader::Tracker,
    reconcile::{Policy, Reconciler},
};

/// How often the tables are walked.
pub const PERIOD: Duration = Duration::from_secs(1);

/// The running reaper thread; stopped (and joined) on [`Reaper::stop`] or drop.
pub struct Reaper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    view: Arc<Mutex<Option<WalkView>>>,
    durations: prometheus::Histogram,
}

impl Reaper {
    /// Starts walking `tracker`'s tables every [`PERIOD`] with `timeouts`, reconciling them
    /// as `reconcile` says (see `reconcile.rs`).
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(
        tracker: Arc<Tracker>,
        timeouts: Timeouts,
        reconcile: Option<Policy>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let view = Arc::new(Mutex::new(None));
        let latest = Arc::clone(&view);
        let durations = crate::selfstats::reap_duration_histogram();
        let observed = durations.clone();
        let thread = std::thread::Builder::new()
            .name("tcpscope-reap".to_owned())
            .spawn(move || run(&tracker, &timeouts, reconcile, &signal, &latest, &observed))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            view,
            durations,
        })
    }

    /// How long each cycle took (`tcpscope_reap_duration_seconds`).
    #[must_use]
    pub fn durations(&self) -> &prometheus::Histogram {
        &self.durations
    }

    /// What the last walk found (`None` before the first one).
    #[must_use]
    pub fn view(&self) -> Option<WalkView> {
        *self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the thread and waits for it (a walk in progress finishes first).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread's loop: a walk, then sleep until the next period (after a stall, the next walk
/// comes one period later rather than in a burst), until told to stop.
fn run(
    tracker: &Tracker,
    timeouts: &Timeouts,
    reconcile: Option<Policy>,
    stop: &(Mutex<bool>, Condvar),
    view: &Mutex<Option<WalkView>>,
    durations: &prometheus::Histogram,
) {
    let (flag, wake) = stop;
    let mut next = Instant::now();
    let mut handle = match tracker.walk_view() {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(
                "the per-port view and the oldest endpoints are unavailable: {}",
                error_chain(&e)
            );
            None
        }
    };
    let mut reconciler = reconcile.and_then(|p| match Reconciler::new(tracker, p) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("reconciliation unavailable: {}", error_chain(&e));
            None
        }
    });
    let capacities = match tracker.capacities() {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(
                "table capacities unknown ({}): every table is walked whole",
                error_chain(&e)
            );
            None
        }
    };
    let mut failing_list: Option<String> = None;
    // The keys in the LISTED array, while no insert makes them incomplete.
    let mut listing: Option<Listing> = None;
    let mut failing_reconcile: Option<String> = None;
    // The error last logged: a failure that persists is logged once, not every second.
    let mut failing: Option<String> = None;
    let mut failing_view: Option<String> = None;
    // Per table: records its last walk visited, and the inserts counted before that walk.
    let mut visited = [u64::MAX; table::COUNT];
    let mut inserts_then: Option<[u64; table::COUNT]> = None;
    loop {
        let started = Instant::now();
        let inserts = tracker.metrics().ok().map(|m| m.inserts);
        let mut tables = walked_tables(&visited, inserts_then.as_ref(), inserts.as_ref());
        let mut doomed = false;
        if let Some(r) = reconciler.as_mut().filter(|r| r.due()) {
            match r.prepare(tracker) {
                Ok(pass) => {
                    failing_reconcile = None;
                    doomed = pass.doomed > 0;
                    if doomed {
                        tables = ReapRequest::ALL_TABLES;
                    }
                }
                Err(e) => {
                    r.after_walk();
                    let error = error_chain(&e);
                    if failing_reconcile.as_ref() != Some(&error) {
                        warn!("reconciling: {error} (logged again only if it changes)");
                        failing_reconcile = Some(error);
                    }
                }
            }
        }
        let mut request = ReapRequest {
            timeouts: timeouts.to_array(),
            tables,
            reconcile: u64::from(doomed),
            ..ReapRequest::default()
        };
        let sparse = capacities.map_or(0, |c| sparse_tables(tables, &visited, &c));
        let reused = listing
            .as_ref()
            .filter(|l| l.still_complete(sparse, inserts.as_ref()));
        if let Some(l) = reused {
            l.apply(&mut request);
        } else if sparse != 0 {
            listing = None;
            match tracker.list_keys(&mut request, sparse) {
                Ok(()) => {
                    listing = inserts.map(|inserts| Listing::of(&request, sparse, inserts));
                    if failing_list.take().is_some() {
                        info!("listing sparse tables works again");
                    }
                }
                Err(e) => {
                    request.listed = 0;
                    let error = error_chain(&e);
                    if failing_list.as_ref() != Some(&error) {
                        warn!(
                            "listing sparse tables: {error}; walking them whole (logged again \
                             only if it changes)"
                        );
                        failing_list = Some(error);
                    }
                }
            }
        }
        let reaped = tracker.reap_as(&request);
        if let Some(r) = reconciler.as_mut() {
            r.after_walk();
        }
        match &reaped {
            Ok(r) => {
                visited = r.visited;
                inserts_then = inserts;
            }
            Err(_) => {
                visited = [u64::MAX; table::COUNT];
                inserts_then = None;
            }
        }
        // The view, walked after the expiry: exported only when this walk made it (a stale
        // one is worse than none).
        let walked = handle.as_mut().map(|h| {
            h.clear()?;
            tracker.view_as(&request)?;
            h.read()
        });
        let walked = match walked {
            Some(Ok(v)) => {
                if failing_view.take().is_some() {
                    info!("the per-port view works again");
                }
                Some(v)
            }
            Some(Err(e)) => {
                let error = error_chain(&e);
                if failing_view.as_ref() != Some(&error) {
                    warn!("walking the per-port view: {error} (logged again only if it changes)");
                    failing_view = Some(error);
                }
                None
            }
            None => None,
        };
        *view.lock().unwrap_or_else(PoisonError::into_inner) = walked;
        durations.observe(started.elapsed().as_secs_f64());
        match reaped {
            Ok(r) => {
                if failing.take().is_some() {
                    info!("expiring flows works again");
                }
                if r.reaped.iter().any(|n| *n > 0) {
                    debug!(
                        "expired {} IPv4 and {} IPv6 established and {} half-open records",
                        r.reaped[table::ESTABLISHED_V4],
                        r.reaped[table::ESTABLISHED_V6],
                        r.reaped[table::HALF_OPEN]
                    );
                }
            }
            Err(e) => {
                let error = error_chain(&e);
                if failing.as_ref() != Some(&error) {
                    warn!("expiring flows: {error} (logged again only if it changes)");
                    failing = Some(error);
                }
            }
        }
        next = (next + PERIOD).max(Instant::now());
        let mut stopped = flag.lock().unwrap_or_else(PoisonError::into_inner);
        while !*stopped {
            let Some(left) = next.checked_duration_since(Instant::now()) else {
                break;
            };
            stopped = wake
                .wait_timeout(stopped, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if *stopped {
            return;
        }
    }
}

/// The keys last listed into the LISTED array (see [`Tracker::list_keys`]). They remain every
/// key of their tables for as long as nothing is inserted into those: a record removed since
/// is not found by its key, and is skipped. So an idle table is listed once, not every second.
struct Listing {
    /// The tables that were candidates for the listing ([`sparse_tables`]).
    candidates: u64,
    /// The tables listed, and where their keys are.
    listed: u64,
    from: [u64; table::COUNT],
    len: [u64; table::COUNT],
    /// The inserts counted before the listing.
    inserts: [u64; table::COUNT],
}

impl Listing {
    fn of(request: &ReapRequest, candidates: u64, inserts: [u64; table::COUNT]) -> Self {
        Self {
            candidates,
            listed: request.listed,
            from: request.listed_from,
            len: request.listed_len,
            inserts,
        }
    }

    /// Whether the listing still holds every key of the same candidates: no insert into any of
    /// them since (`inserts_now`: unknown counts nothing).
    fn still_complete(&self, candidates: u64, inserts_now: Option<&[u64; table::COUNT]>) -> bool {
        let Some(now) = inserts_now else {
            return false;
        };
        candidates == self.candidates
            && (0..table::COUNT)
                .filter(|t| candidates & (1 << t) != 0)
                .all(|t| now[t] == self.inserts[t])
    }

    fn apply(&self, request: &mut ReapRequest) {
        request.listed = self.listed;
        request.listed_from = self.from;
        request.listed_len = self.len;
    }
}

/// The tables a walk must visit ([`ReapRequest::tables`]): those whose last walk visited a
/// record, or that had a record inserted since the inserts counted before that walk; all of
/// them when either count is unknown.
fn walked_tables(
    visited: &[u64; table::COUNT],
    inserts_then: Option<&[u64; table::COUNT]>,
    inserts_now: Option<&[u64; table::COUNT]>,
) -> u64 {
    let (Some(then), Some(now)) = (inserts_then, inserts_now) else {
        return ReapRequest::ALL_TABLES;
    };
    (0..table::COUNT)
        .filter(|&t| visited[t] > 0 || now[t] != then[t])
        .fold(0, |mask, t| mask | 1 << t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_with_no_insert_since_is_left_out() {
        let none = [0; table::COUNT];
        assert_eq!(walked_tables(&none, Some(&[5; 3]), Some(&[5; 3])), 0);
        let mut one = none;
        one[table::HALF_OPEN] = 1;
        assert_eq!(
            walked_tables(&one, Some(&[5; 3]), Some(&[5; 3])),
            1 << table::HALF_OPEN
        );
        let mut later = [5; 3];
        later[table::ESTABLISHED_V6] = 6;
        assert_eq!(
            walked_tables(&none, Some(&[5; 3]), Some(&later)),
            1 << table::ESTABLISHED_V6
        );
        assert_eq!(
            walked_tables(&none, None, Some(&[5; 3])),
            ReapRequest::ALL_TABLES
        );
    }

    #[test]
    fn sparse_tables_are_those_with_a_record_per_16_slots_at_most() {
        let million = [1 << 20; table::COUNT];
        let all = ReapRequest::ALL_TABLES;
        assert_eq!(sparse_tables(all, &[64, 0, 8192], &million), all);
        // Unknown (before the first walk), over the array, or denser than 1 in 16.
        assert_eq!(sparse_tables(all, &[u64::MAX, 8193, 64], &million), 1 << 2);
        assert_eq!(
            sparse_tables(all, &[4096, 4097, 0], &[65_536; table::COUNT]),
            1 | 1 << 2
        );
        // Only among the walked tables.
        assert_eq!(sparse_tables(1 << 1, &[0; table::COUNT], &million), 1 << 1);
    }

    #[test]
    fn a_listing_is_reused_until_an_insert_into_one_of_its_tables() {
        let request = ReapRequest {
            listed: 0b001,
            listed_from: [0, 0, 0],
            listed_len: [3, 0, 0],
            ..ReapRequest::default()
        };
        // Candidates: both established tables; the IPv6 one did not fit.
        let l = Listing::of(&request, 0b011, [10, 20, 30]);
        assert!(l.still_complete(0b011, Some(&[10, 20, 30])));
        // Inserts into the half-open table, not a candidate, change nothing.
        assert!(l.still_complete(0b011, Some(&[10, 20, 99])));
        assert!(!l.still_complete(0b011, Some(&[11, 20, 30])));
        assert!(!l.still_complete(0b011, Some(&[10, 21, 30])));
        assert!(!l.still_complete(0b001, Some(&[10, 20, 30])));
        assert!(!l.still_complete(0b011, None));
        let mut next = ReapRequest::default();
        l.apply(&mut next);
        assert_eq!(
            (next.listed, next.listed_len),
            (request.listed, request.listed_len)
        );
    }
}
