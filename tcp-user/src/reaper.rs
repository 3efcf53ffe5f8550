//! Expiry, the agent's side: a thread of its own runs the kernel's reaper program (see
//! `tcp-ebpf/src/reaper.rs`) once a second, so that a scrape never waits behind a walk of a
//! million records, and a slow scrape never delays expiry.

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use tcp_common::{
    metrics::{WalkView, table},
    track::Timeouts,
};

use crate::loader::{Tracker, error_chain};

/// How often the tables are walked.
pub const PERIOD: Duration = Duration::from_secs(1);

/// The running reaper thread; stopped (and joined) on [`Reaper::stop`] or drop.
pub struct Reaper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    view: Arc<Mutex<Option<WalkView>>>,
}

impl Reaper {
    /// Starts walking `tracker`'s tables every [`PERIOD`] with `timeouts`.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(tracker: Arc<Tracker>, timeouts: Timeouts) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let view = Arc::new(Mutex::new(None));
        let latest = Arc::clone(&view);
        let thread = std::thread::Builder::new()
            .name("tcpscope-reap".to_owned())
            .spawn(move || run(&tracker, &timeouts, &signal, &latest))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            view,
        })
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
    stop: &(Mutex<bool>, Condvar),
    view: &Mutex<Option<WalkView>>,
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
    // The error last logged: a failure that persists is logged once, not every second.
    let mut failing: Option<String> = None;
    let mut failing_view: Option<String> = None;
    loop {
        let reaped = tracker.reap(timeouts);
        // The view, walked after the expiry: exported only when this walk made it (a stale
        // one is worse than none).
        let walked = handle.as_mut().map(|h| {
            h.clear()?;
            tracker.walk_into_view()?;
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
