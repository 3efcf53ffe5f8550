//! What the kernel keeps for the exporter besides the per-hook packet counters: event tallies,
//! endpoints per (state, role, side), table occupancy and the handshake-latency histograms, all
//! in one per-CPU value ([`Metrics`]) that a packet reaches with a single map lookup.
//!
//! Every field is a per-CPU *counter*: gauges are kept as wrapping sums of +1/-1 deltas, so a
//! CPU's copy may be "negative" (a record created on one CPU and removed on another); only the
//! sum over CPUs, taken as `i64`, is meaningful, and it is exact because every change of a
//! record's contribution is computed under that record's lock (see `tcp-ebpf`'s tracker).
//! A scrape reads `CPUs x size_of::<Metrics>()` bytes, whatever the number of flows.

use crate::{
    event_counters::EventCounters,
    gauges::{GAUGE_SLOTS, NO_SLOT},
    histogram::Histogram,
    state::{Role, Side, TcpState},
};

const ROLES: usize = Role::ALL.len();
const SIDES: usize = Side::ALL.len();

/// Flow tables, as indices of the per-table fields.
pub mod table {
    /// IPv4 connections past their handshake (or picked up).
    pub const ESTABLISHED_V4: usize = 0;
    /// IPv6 connections past their handshake (or picked up).
    pub const ESTABLISHED_V6: usize = 1;
    /// Handshakes in progress, both families.
    pub const HALF_OPEN: usize = 2;
    /// Number of tables.
    pub const COUNT: usize = 3;

    /// The established table of a family.
    #[must_use]
    #[inline(always)]
    pub const fn established(ipv6: bool) -> usize {
        if ipv6 { ESTABLISHED_V6 } else { ESTABLISHED_V4 }
    }
}

/// Everything the tracker accounts for, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metrics {
    /// State-machine events and table pressure.
    pub events: EventCounters,
    /// Endpoints per [`crate::gauges::gauge_slot`] (wrapping deltas; sum over CPUs as `i64`).
    pub endpoints: [u64; GAUGE_SLOTS],
    /// Records inserted, per table.
    pub inserts: [u64; table::COUNT],
    /// Records removed, per table (`inserts - removes` = records held).
    pub removes: [u64; table::COUNT],
    /// Records removed on an idle timeout while the connection was still live (handshake in
    /// progress, established, closing): state given up rather than seen to its end.
    pub evictions: [u64; table::COUNT],
    /// Handshake latency per [`crate::histogram::Phase`].
    pub handshake: [Histogram; 3],
}

impl Metrics {
    /// All zero.
    pub const ZERO: Self = Self {
        events: EventCounters {
            slots: [0; crate::event_counters::EVENT_SLOTS],
        },
        endpoints: [0; GAUGE_SLOTS],
        inserts: [0; table::COUNT],
        removes: [0; table::COUNT],
        evictions: [0; table::COUNT],
        handshake: [Histogram::ZERO; 3],
    };

    /// Moves one endpoint from gauge slot `from` to `to` (either may be [`NO_SLOT`]).
    #[inline(always)]
    pub fn move_endpoint(&mut self, from: u8, to: u8) {
        if from == to {
            return;
        }
        let g = &mut self.endpoints[usize::from(from)];
        *g = g.wrapping_sub(1);
        let g = &mut self.endpoints[usize::from(to)];
        *g = g.wrapping_add(1);
    }

    /// Counts one record inserted into table `t`.
    #[inline(always)]
    pub fn inserted(&mut self, t: usize) {
        if let Some(v) = self.inserts.get_mut(t) {
            *v = v.wrapping_add(1);
        }
    }

    /// Counts one record removed from table `t`.
    #[inline(always)]
    pub fn removed(&mut self, t: usize) {
        if let Some(v) = self.removes.get_mut(t) {
            *v = v.wrapping_add(1);
        }
    }

    /// Adds a completed handshake's phases.
    #[inline(always)]
    pub fn observe_handshake(&mut self, phases: [u64; 3]) {
        self.handshake[0].observe(phases[0]);
        self.handshake[1].observe(phases[1]);
        self.handshake[2].observe(phases[2]);
    }

    /// Adds another CPU's copy.
    pub fn accumulate(&mut self, other: &Self) {
        self.events.accumulate(&other.events);
        let pairs = self
            .endpoints
            .iter_mut()
            .zip(other.endpoints.iter())
            .chain(self.inserts.iter_mut().zip(other.inserts.iter()))
            .chain(self.removes.iter_mut().zip(other.removes.iter()))
            .chain(self.evictions.iter_mut().zip(other.evictions.iter()));
        for (a, b) in pairs {
            *a = a.wrapping_add(*b);
        }
        for (a, b) in self.handshake.iter_mut().zip(other.handshake.iter()) {
            a.accumulate(b);
        }
    }

    /// Endpoints in gauge slot `slot` (summed copies only).
    #[must_use]
    pub fn endpoints_in(&self, slot: usize) -> i64 {
        if slot == usize::from(NO_SLOT) {
            return 0;
        }
        self.endpoints.get(slot).map_or(0, |v| *v as i64)
    }

    /// Records held in table `t` (summed copies only).
    #[must_use]
    pub fn held(&self, t: usize) -> i64 {
        self.inserts[t].wrapping_sub(self.removes[t]) as i64
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::ZERO
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, made only of `u64`s (no padding); every bit pattern is valid.
unsafe impl aya::Pod for Metrics {}

/// Ports the per-port view can watch (`--ports`).
pub const MAX_WATCHED_PORTS: usize = 64;
/// (state, side) pairs: `state * 3 + side`.
pub const STATE_SIDES: usize = TcpState::COUNT * SIDES;

/// What the reaper's walk finds in the tables, for the views that a gauge kept per packet would
/// cost too much for: endpoints per watched port, state and side, and the age of the oldest
/// endpoint per state and side. Zeroed at the start of every walk and filled during it; the
/// agent reads it after the walk (exact as of the walk, at most a second old).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkView {
    /// Endpoints per [`port_view_slot`].
    pub ports: [u32; MAX_WATCHED_PORTS * STATE_SIDES],
    /// Per (state, side) (`state * 3 + side`): ns since its oldest endpoint entered its state
    /// as the record knows it (the close for TIME-WAIT, the last segment otherwise), 0: none.
    pub oldest_ns: [u64; STATE_SIDES],
}

impl WalkView {
    /// Nothing seen.
    pub const ZERO: Self = Self {
        ports: [0; MAX_WATCHED_PORTS * STATE_SIDES],
        oldest_ns: [0; STATE_SIDES],
    };

    /// Counts the endpoint in gauge slot `slot` (see [`crate::gauges::gauge_slot`]), of age `age_ns`, whose
    /// port is watched at index `watched` (`None`: not watched).
    #[inline(always)]
    pub fn add(&mut self, slot: u8, watched: Option<usize>, age_ns: u64) {
        let slot = slot as usize;
        let (state, side) = (slot / (SIDES * ROLES), slot % SIDES);
        if slot == NO_SLOT as usize || state >= TcpState::COUNT {
            return;
        }
        // The indexes pass through memory, so the bounds checks below stay: the compiler
        // could prove them from the arithmetic, the eBPF verifier (which does not follow a
        // division or a remainder) cannot.
        let at = |i: usize| {
            // SAFETY: reading a local.
            unsafe { core::ptr::read_volatile(&i) }
        };
        if let Some(o) = self.oldest_ns.get_mut(at(state * SIDES + side))
            && age_ns > *o
        {
            *o = age_ns;
        }
        if let Some(i) = watched
            && let Some(c) = self.ports.get_mut(at(port_view_slot(i, state, side)))
        {
            *c = c.wrapping_add(1);
        }
    }
}

impl Default for WalkView {
    fn default() -> Self {
        Self::ZERO
    }
}

/// Index in [`WalkView::ports`] of the endpoints of watched port `index` in `state` on `side`.
#[must_use]
#[inline(always)]
pub const fn port_view_slot(index: usize, state: usize, side: usize) -> usize {
    (index * TcpState::COUNT + state) * SIDES + side
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers only, no implicit padding (the u32 array is an even length).
unsafe impl aya::Pod for WalkView {}

/// SYNs and completed handshakes towards one listening port, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// SYN (no ACK) segments towards the port, retransmissions included; counted before any
    /// table insert, so a full half-open table does not hide a flood.
    pub syn: u64,
    /// Handshakes completed towards the port.
    pub completed: u64,
    /// SYNs (first and retransmitted) of connection attempts towards the port that ended
    /// without any SYN-ACK (counted when their record expires).
    pub unanswered: u64,
    /// Connections whose listener on the port ignored the handshake-completing ACK or reset
    /// right after it ([`crate::state::events::ACCEPT_QUEUE_OVERFLOW`]).
    pub overflows: u64,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `u64`s only.
unsafe impl aya::Pod for PortStats {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gauges::gauge_slot;

    #[test]
    fn gauges_sum_exactly_across_copies() {
        let mut a = Metrics::ZERO;
        let mut b = Metrics::ZERO;
        let s = gauge_slot(TcpState::TimeWait, Role::Client, Side::Local);
        a.move_endpoint(NO_SLOT, s);
        b.move_endpoint(s, NO_SLOT);
        b.move_endpoint(NO_SLOT, s);
        let mut sum = Metrics::ZERO;
        sum.accumulate(&a);
        sum.accumulate(&b);
        assert_eq!(sum.endpoints_in(s.into()), 1);
        assert_eq!(b.endpoints_in(s.into()), 0);
    }
}
