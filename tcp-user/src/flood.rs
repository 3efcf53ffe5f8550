//! The SYN-flood rule, per listening port, over a sliding window.
//!
//! Rule: a port is flooded while, over the last `window`, SYNs towards it arrive at
//! `rate` per second or more **and** fewer than `completion` of them end in a completed
//! handshake. Legitimate load, however high its connection rate, completes nearly every
//! handshake (ratio close to 1); a spoofed-source flood completes none (ratio close to 0).
//! Counting half-open attempts rather than raw SYNs is what keeps busy servers quiet.
//!
//! The kernel keeps cumulative per-port tallies (`SYN_PORTS`, counted before any table insert,
//! so a full half-open table does not hide a flood); the agent samples them once a second and
//! keeps, per port, the samples of the last window.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tcp_common::metrics::PortStats;

/// The rule's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloodRule {
    /// SYNs per second (averaged over the window) at or above which a port may be flagged.
    pub rate: f64,
    /// Completed handshakes / SYNs below which a port may be flagged.
    pub completion: f64,
    /// Window length, ns.
    pub window_ns: u64,
    /// Busiest ports reported besides the flagged ones.
    pub top: usize,
    /// How long a port that was flagged keeps being reported (as 0) after the rule stops
    /// holding, ns, so that dashboards and alerts see it return to 0.
    pub hold_ns: u64,
    /// At most this many such formerly flagged ports are reported (the most recent).
    pub held_max: usize,
}

impl FloodRule {
    /// Defaults (README §SYN flood explains them): 100 SYN/s, completion below 0.5, 5 s window.
    pub const DEFAULT: Self = Self {
        rate: 100.0,
        completion: 0.5,
        window_ns: 5_000_000_000,
        top: 10,
        hold_ns: 600_000_000_000,
        held_max: 64,
    };
}

/// What the window says about one port.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PortWindow {
    /// SYNs per second over the window.
    pub syn_rate: f64,
    /// Completed handshakes / SYNs over the window (1 when no SYN).
    pub completion: f64,
    /// Whether the rule holds.
    pub flooded: bool,
}

#[derive(Debug, Default)]
struct PortHistory {
    samples: VecDeque<(u64, PortStats)>,
    window: Option<PortWindow>,
    /// Last time the rule held (ns), if ever.
    last_flagged_ns: Option<u64>,
}

/// The detector's state.
#[derive(Debug)]
pub struct FloodDetector {
    rule: FloodRule,
    ports: HashMap<u16, PortHistory>,
    last_tick_ns: Option<u64>,
}

/// A port whose flag changed at the last update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Change {
    /// The port.
    pub port: u16,
    /// Its window now.
    pub window: PortWindow,
}

impl FloodDetector {
    /// A detector with no history.
    #[must_use]
    pub fn new(rule: FloodRule) -> Self {
        Self {
            rule,
            ports: HashMap::new(),
            last_tick_ns: None,
        }
    }

    /// Takes a new sample of the kernel's cumulative per-port tallies at `now_ns`; returns the
    /// ports whose flag changed.
    pub fn update(&mut self, now_ns: u64, stats: &[(u16, PortStats)]) -> Vec<Change> {
        let rule = self.rule;
        let previous_tick = self.last_tick_ns;
        let mut changes = Vec::new();
        let present: std::collections::HashSet<u16> = stats.iter().map(|(p, _)| *p).collect();
        for (port, cur) in stats {
            let h = self.ports.entry(*port).or_default();
            let reset = h
                .samples
                .back()
                .is_some_and(|(_, last)| cur.syn < last.syn || cur.completed < last.completed);
            if reset {
                h.samples.clear();
            }
            if h.samples.is_empty() {
                // A port that appeared since the previous sample had nothing before it; at
                // start-up (maps kept from an earlier run) the first sample is the baseline.
                if let Some(t) = previous_tick {
                    h.samples.push_back((t, PortStats::default()));
                }
            }
            h.samples.push_back((now_ns, *cur));
            // Keep the newest sample at least a window old as the baseline.
            while h.samples.len() > 2 && now_ns - h.samples[1].0 >= rule.window_ns {
                h.samples.pop_front();
            }
            let was = h.window.is_some_and(|w| w.flooded);
            h.window = window(&rule, &h.samples);
            let now_flooded = h.window.is_some_and(|w| w.flooded);
            if now_flooded {
                h.last_flagged_ns = Some(now_ns);
            }
            if was != now_flooded
                && let Some(window) = h.window
            {
                changes.push(Change {
                    port: *port,
                    window,
                });
            }
        }
        // Ports the kernel forgot (LRU) or that went quiet long ago.
        self.ports.retain(|port, h| {
            present.contains(port)
                || h.last_flagged_ns
                    .is_some_and(|t| now_ns.saturating_sub(t) < rule.hold_ns)
        });
        for (port, h) in &mut self.ports {
            if !present.contains(port) && h.window.is_some_and(|w| w.flooded) {
                h.window = Some(PortWindow {
                    syn_rate: 0.0,
                    completion: 1.0,
                    flooded: false,
                });
                changes.push(Change {
                    port: *port,
                    window: h.window.expect("just set"),
                });
            }
        }
        self.last_tick_ns = Some(now_ns);
        changes
    }

    /// Per-port tallies to export besides the flood flags: the ports of [`Self::exposition`]
    /// and the `top` with the most unanswered SYNs and accept-queue overflows, with their
    /// latest totals; in port order.
    #[must_use]
    pub fn port_tallies(&self, now_ns: u64) -> Vec<(u16, PortStats)> {
        let latest = |port: &u16| {
            self.ports
                .get(port)
                .and_then(|h| h.samples.back())
                .map(|(_, s)| *s)
        };
        let mut out: BTreeMap<u16, PortStats> = self
            .exposition(now_ns)
            .iter()
            .filter_map(|(port, _)| Some((*port, latest(port)?)))
            .collect();
        let mut unanswered: Vec<(u64, u16)> = self
            .ports
            .iter()
            .filter_map(|(port, h)| {
                let s = h.samples.back()?.1;
                let n = s.unanswered + s.overflows;
                (n > 0).then_some((n, *port))
            })
            .collect();
        unanswered.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, port) in unanswered.into_iter().take(self.rule.top) {
            if let Some(s) = latest(&port) {
                out.insert(port, s);
            }
        }
        out.into_iter().collect()
    }

    /// The window of one port, if it has one.
    #[must_use]
    pub fn window_of(&self, port: u16) -> Option<PortWindow> {
        self.ports.get(&port).and_then(|h| h.window)
    }

    /// The ports to report and whether each is flooded: every flagged port (at most the kernel
    /// map's 1,024), the `held_max` most recently flagged within the hold time, and the `top`
    /// busiest by SYN rate; in port order.
    #[must_use]
    pub fn exposition(&self, now_ns: u64) -> Vec<(u16, bool)> {
        let mut out: BTreeMap<u16, bool> = BTreeMap::new();
        let mut busiest: Vec<(f64, u16)> = Vec::new();
        let mut held: Vec<(u64, u16)> = Vec::new();
        for (port, h) in &self.ports {
            let Some(w) = h.window else { continue };
            if w.flooded {
                out.insert(*port, true);
            } else if let Some(t) = h.last_flagged_ns
                && now_ns.saturating_sub(t) < self.rule.hold_ns
            {
                held.push((t, *port));
            }
            if w.syn_rate > 0.0 {
                busiest.push((w.syn_rate, *port));
            }
        }
        held.sort_unstable_by(|a, b| b.cmp(a));
        for (_, port) in held.into_iter().take(self.rule.held_max) {
            out.insert(port, false);
        }
        busiest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, port) in busiest.into_iter().take(self.rule.top) {
            out.entry(port).or_insert(false);
        }
        out.into_iter().collect()
    }
}

/// The rule over the samples of one port (oldest first).
fn window(rule: &FloodRule, samples: &VecDeque<(u64, PortStats)>) -> Option<PortWindow> {
    let (t0, first) = samples.front()?;
    let (t1, last) = samples.back()?;
    let span = t1.checked_sub(*t0).filter(|s| *s > 0)?;
    let syn = last.syn.saturating_sub(first.syn);
    let completed = last.completed.saturating_sub(first.completed);
    // Over the whole window even when the history is shorter (a port that just appeared, a
    // stalled tick): a burst must be worth `rate` x `window` SYNs before it counts.
    let syn_rate = syn as f64 * 1e9 / span.max(rule.window_ns) as f64;
    let completion = if syn == 0 {
        1.0
    } else {
        (completed as f64 / syn as f64).min(1.0)
    };
    Some(PortWindow {
        syn_rate,
        completion,
        flooded: syn_rate >= rule.rate && completion < rule.completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn stats(syn: u64, completed: u64) -> PortStats {
        PortStats {
            syn,
            completed,
            unanswered: 0,
            overflows: 0,
        }
    }

    #[test]
    fn a_flood_is_flagged_and_cleared_when_the_window_passes() {
        let mut d = FloodDetector::new(FloodRule::DEFAULT);
        assert!(d.update(0, &[(80, stats(0, 0))]).is_empty());
        // 1000 SYN/s, nothing completes.
        let c = d.update(S, &[(80, stats(1000, 0))]);
        assert_eq!(c.len(), 1);
        assert!(c[0].window.flooded);
        assert_eq!(d.exposition(S), vec![(80, true)]);
        // The flood stops; the window still holds it for a while, then clears.
        let mut cleared_at = None;
        for t in 2..20 {
            if !d.update(t * S, &[(80, stats(1000, 0))]).is_empty() {
                cleared_at = Some(t);
                break;
            }
        }
        let cleared_at = cleared_at.expect("cleared");
        assert!(cleared_at <= 7, "window is 5 s: cleared at {cleared_at} s");
        // Still reported, as 0, during the hold time.
        assert_eq!(d.exposition(cleared_at * S), vec![(80, false)]);
    }

    #[test]
    fn a_busy_server_that_completes_its_handshakes_is_never_flagged() {
        let mut d = FloodDetector::new(FloodRule::DEFAULT);
        for t in 0..30 {
            let c = d.update(t * S, &[(443, stats(t * 5000, t * 5000 - t.min(1) * 10))]);
            assert!(c.is_empty(), "{c:?}");
        }
        assert_eq!(d.exposition(30 * S), vec![(443, false)]);
    }

    #[test]
    fn slow_unanswered_syns_stay_below_the_rate() {
        let mut d = FloodDetector::new(FloodRule::DEFAULT);
        for t in 0..30 {
            assert!(d.update(t * S, &[(22, stats(t * 50, 0))]).is_empty());
        }
    }

    #[test]
    fn a_port_that_appears_mid_run_counts_from_zero() {
        let mut d = FloodDetector::new(FloodRule::DEFAULT);
        d.update(0, &[]);
        let c = d.update(S, &[(8080, stats(500, 0))]);
        assert_eq!(c.len(), 1, "500 SYN in the first second is a flood");
    }

    #[test]
    fn the_first_sample_after_start_is_a_baseline() {
        let mut d = FloodDetector::new(FloodRule::DEFAULT);
        // Counts kept in pinned maps from an earlier run are not a burst.
        assert!(d.update(0, &[(8080, stats(1_000_000, 0))]).is_empty());
        assert!(d.update(S, &[(8080, stats(1_000_000, 0))]).is_empty());
    }

    #[test]
    fn exposition_is_bounded_to_flagged_and_top_ports() {
        let mut rule = FloodRule::DEFAULT;
        rule.top = 3;
        let mut d = FloodDetector::new(rule);
        let ports: Vec<(u16, PortStats)> = (1..=50).map(|p| (p, stats(0, 0))).collect();
        d.update(0, &ports);
        let ports: Vec<(u16, PortStats)> = (1..=50)
            .map(|p| (p, stats(u64::from(p) * 10, u64::from(p) * 10)))
            .collect();
        d.update(S, &ports);
        assert_eq!(d.exposition(S), vec![(48, false), (49, false), (50, false)]);
    }
}
