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
    counters::EventCounters,
    flow::{Established, Flow},
    state::{Role, Side, TcpState},
};

/// Slots of [`Metrics::endpoints`]: one per (state, role, side), CLOSED excluded (an endpoint
/// that holds no state is not counted). 256 so that any `u8` indexes it: the kernel needs no
/// bounds check (one the verifier can always follow); slot [`NO_SLOT`] is a sink never read.
pub const GAUGE_SLOTS: usize = 256;
/// "Not counted" (CLOSED endpoint).
pub const NO_SLOT: u8 = 0xff;

const ROLES: usize = Role::ALL.len();
const SIDES: usize = Side::ALL.len();
const _: () = assert!(TcpState::COUNT * ROLES * SIDES < NO_SLOT as usize);

/// Gauge slot of an endpoint in `state` with `role` on `side`, or [`NO_SLOT`] for CLOSED.
#[must_use]
#[inline(always)]
pub const fn gauge_slot(state: TcpState, role: Role, side: Side) -> u8 {
    if matches!(state, TcpState::Closed) {
        return NO_SLOT;
    }
    ((state as usize * ROLES + role as usize) * SIDES + side as usize) as u8
}

/// Gauge slot of endpoint `i` (0 or 1) of a record.
#[must_use]
#[inline(always)]
pub fn endpoint_slot(flow: &Flow, i: usize) -> u8 {
    let ep = &flow.ep[i & 1];
    slot_of(ep.state, flow.client, ep.side, i)
}

/// Gauge slot of endpoint `i` (0 or 1) of a compact record.
#[must_use]
#[inline(always)]
pub fn established_slot(rec: &Established, i: usize) -> u8 {
    let i = i & 1;
    slot_of(rec.state[i] & 0x0f, rec.client, rec.ep_flags[i] >> 6, i)
}

/// Gauge slot of endpoint `i` from the stored bytes of its state, the flow's client index and
/// its side. Plain arithmetic (no enum tables): this runs under the record's lock in the
/// kernel. Same result as `gauge_slot(state, role, side)`.
#[inline(always)]
fn slot_of(state: u8, client: u8, side: u8, i: usize) -> u8 {
    let state = state as usize;
    if state == 0 || state >= TcpState::COUNT {
        return NO_SLOT;
    }
    let role = if client as usize == (i & 1) {
        Role::Client as usize
    } else if client < 2 {
        Role::Server as usize
    } else {
        Role::Unknown as usize
    };
    let side = if (side as usize) < SIDES {
        side as usize
    } else {
        0
    };
    ((state * ROLES + role) * SIDES + side) as u8
}

/// The (state, role, side) of a gauge slot, `None` for unused slots.
#[must_use]
pub const fn slot_labels(slot: usize) -> Option<(TcpState, Role, Side)> {
    let side = slot % SIDES;
    let role = (slot / SIDES) % ROLES;
    let state = slot / (SIDES * ROLES);
    if state == 0 || state >= TcpState::COUNT {
        return None;
    }
    Some((TcpState::ALL[state], Role::ALL[role], Side::ALL[side]))
}

/// Finite histogram buckets.
pub const BUCKETS: usize = 24;

/// Upper bound (inclusive, Prometheus `le`) of bucket `k`: 10 µs x 2^k, so 10 µs ... 83.9 s
/// (the same bounds as `prometheus::exponential_buckets(1e-5, 2.0, 24)`).
#[must_use]
#[inline(always)]
pub const fn bucket_bound_ns(k: usize) -> u64 {
    10_000 << k
}

/// Bucket of a duration: the first `k` with `ns <= bound(k)`, or [`BUCKETS`] (+Inf).
#[must_use]
#[inline(always)]
pub const fn bucket(ns: u64) -> usize {
    let mut k = 0;
    while k < BUCKETS {
        if ns <= bucket_bound_ns(k) {
            return k;
        }
        k += 1;
    }
    BUCKETS
}

/// One latency histogram: per-bucket (not cumulative) counts, sum and count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket; the last one is above every finite bound.
    pub buckets: [u64; BUCKETS + 1],
    /// Sum of the observations, ns.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Empty.
    pub const ZERO: Self = Self {
        buckets: [0; BUCKETS + 1],
        sum_ns: 0,
        count: 0,
    };

    /// Adds one observation.
    #[inline(always)]
    pub fn observe(&mut self, ns: u64) {
        if let Some(b) = self.buckets.get_mut(bucket(ns)) {
            *b = b.wrapping_add(1);
        }
        self.sum_ns = self.sum_ns.wrapping_add(ns);
        self.count = self.count.wrapping_add(1);
    }

    /// Adds another CPU's copy.
    pub fn accumulate(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
        self.count = self.count.wrapping_add(other.count);
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::ZERO
    }
}

/// Handshake phases, measured at the observation point from the *first* SYN.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// First SYN to first SYN-ACK.
    SynToSynack = 0,
    /// First SYN-ACK to the ACK that completes the handshake.
    SynackToAck = 1,
    /// First SYN to the completing ACK.
    SynToAck = 2,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Self; 3] = [Self::SynToSynack, Self::SynackToAck, Self::SynToAck];

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SynToSynack => "syn_to_synack",
            Self::SynackToAck => "synack_to_ack",
            Self::SynToAck => "syn_to_ack",
        }
    }
}

/// The three phase durations of a completed handshake, or `None` when the record lacks a SYN
/// or a SYN-ACK (picked up, SYN-ACK seen first) or its times are not in order.
#[must_use]
#[inline(always)]
pub const fn handshake_phases(syn_ns: u64, synack_ns: u64, ack_ns: u64) -> Option<[u64; 3]> {
    if syn_ns == 0 || synack_ns < syn_ns || ack_ns < synack_ns {
        return None;
    }
    Some([synack_ns - syn_ns, ack_ns - synack_ns, ack_ns - syn_ns])
}

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
    /// Endpoints per [`gauge_slot`] (wrapping deltas; sum over CPUs as `i64`).
    pub endpoints: [u64; GAUGE_SLOTS],
    /// Records inserted, per table.
    pub inserts: [u64; table::COUNT],
    /// Records removed, per table (`inserts - removes` = records held).
    pub removes: [u64; table::COUNT],
    /// Records removed on an idle timeout while the connection was still live (handshake in
    /// progress, established, closing): state given up rather than seen to its end.
    pub evictions: [u64; table::COUNT],
    /// Handshake latency per [`Phase`].
    pub handshake: [Histogram; 3],
}

impl Metrics {
    /// All zero.
    pub const ZERO: Self = Self {
        events: EventCounters {
            slots: [0; crate::counters::EVENT_SLOTS],
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

    /// Counts the endpoint in gauge slot `slot` (see [`gauge_slot`]), of age `age_ns`, whose
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

/// What the agent asks the reaper program (run through `BPF_PROG_TEST_RUN`) to do, and what it
/// answers, as the bytes of the test packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReapRequest {
    /// Timeouts, ns: TIME-WAIT, closed, half-open, established, closing, FIN-WAIT-2 (the
    /// fields of [`crate::track::Timeouts`] in order).
    pub timeouts: [u64; 6],
    /// The tables to walk: bit `t` for table `t` ([`ReapRequest::ALL_TABLES`]: every one).
    /// The agent leaves out a table that held nothing at its last walk and has had nothing
    /// inserted since (see `tcp-user/src/reaper.rs`): walking a table visits every bucket,
    /// empty or not.
    pub tables: u64,
    /// 1: remove the established records the agent put in the DOOMED maps, each if unchanged
    /// since the agent read it (reconciliation with the kernel's socket table).
    pub reconcile: u64,
    /// The walked tables whose records are visited by key rather than by a walk: bit `t` for
    /// table `t`, whose keys the agent listed (with `BPF_MAP_LOOKUP_BATCH`) into the LISTED
    /// array, slots `listed_from[t]..listed_from[t] + listed_len[t]`. A walk of a hash map
    /// visits every bucket, at about 16 ns each with the SRSO mitigation, while the listing
    /// skips an empty one in about 2 ns: a sparse table of a million slots is listed.
    pub listed: u64,
    /// First LISTED slot of each listed table.
    pub listed_from: [u64; table::COUNT],
    /// Keys listed for each listed table.
    pub listed_len: [u64; table::COUNT],
    /// Out: records visited, per table.
    pub visited: [u64; table::COUNT],
    /// Out: records removed, per table.
    pub reaped: [u64; table::COUNT],
}

/// Words of a [`ReapRequest`].
const REAP_WORDS: usize = 9 + 4 * table::COUNT;

/// Slots of the LISTED array: keys listed per walk, all tables together (see
/// [`ReapRequest::listed`]). 8192 keys of 40 bytes: 320 KiB.
pub const LISTED_SLOTS: u32 = 8192;

impl ReapRequest {
    /// [`ReapRequest::tables`]: every table.
    pub const ALL_TABLES: u64 = (1 << table::COUNT) - 1;

    /// Whether the request asks for table `t` to be walked.
    #[must_use]
    #[inline(always)]
    pub const fn walks(&self, t: usize) -> bool {
        self.tables & (1 << t) != 0
    }

    /// Whether table `t`'s records are visited by their listed keys (see
    /// [`ReapRequest::listed`]).
    #[must_use]
    #[inline(always)]
    pub const fn lists(&self, t: usize) -> bool {
        self.listed & (1 << t) != 0
    }

    /// The request bytes (at least an Ethernet header's worth, as the kernel requires).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; core::mem::size_of::<Self>()] {
        let mut out = [0; core::mem::size_of::<Self>()];
        let words = self
            .timeouts
            .iter()
            .chain(core::iter::once(&self.tables))
            .chain(core::iter::once(&self.reconcile))
            .chain(core::iter::once(&self.listed))
            .chain(self.listed_from.iter())
            .chain(self.listed_len.iter())
            .chain(self.visited.iter())
            .chain(self.reaped.iter());
        for (chunk, w) in out.as_chunks_mut::<8>().0.iter_mut().zip(words) {
            *chunk = w.to_ne_bytes();
        }
        out
    }

    /// Parses the answer bytes.
    #[must_use]
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < core::mem::size_of::<Self>() {
            return None;
        }
        let mut words = [0u64; REAP_WORDS];
        for (w, chunk) in words.iter_mut().zip(b.as_chunks::<8>().0) {
            *w = u64::from_ne_bytes(*chunk);
        }
        let mut r = Self::default();
        let fields = r
            .timeouts
            .iter_mut()
            .chain(core::iter::once(&mut r.tables))
            .chain(core::iter::once(&mut r.reconcile))
            .chain(core::iter::once(&mut r.listed))
            .chain(r.listed_from.iter_mut())
            .chain(r.listed_len.iter_mut())
            .chain(r.visited.iter_mut())
            .chain(r.reaped.iter_mut());
        for (f, w) in fields.zip(words) {
            *f = w;
        }
        Some(r)
    }
}

const _: () = assert!(core::mem::size_of::<ReapRequest>() == REAP_WORDS * 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counted_triple_has_its_own_slot_and_labels_round_trip() {
        let mut seen = std::vec::Vec::new();
        for state in TcpState::ALL {
            for role in Role::ALL {
                for side in Side::ALL {
                    let slot = gauge_slot(state, role, side);
                    if state == TcpState::Closed {
                        assert_eq!(slot, NO_SLOT);
                        continue;
                    }
                    assert!(usize::from(slot) < GAUGE_SLOTS);
                    assert_eq!(slot_labels(slot.into()), Some((state, role, side)));
                    seen.push(slot);
                }
            }
        }
        let n = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n);
        assert_eq!(n, 10 * 9);
    }

    #[test]
    fn endpoint_slot_agrees_with_gauge_slot() {
        let mut flow = Flow::EMPTY;
        for client in 0..3u8 {
            for state in TcpState::ALL {
                for side in Side::ALL {
                    flow.client = client;
                    flow.ep[1].state = state as u8;
                    flow.ep[1].side = side as u8;
                    assert_eq!(
                        endpoint_slot(&flow, 1),
                        gauge_slot(state, flow.role(1), side)
                    );
                }
            }
        }
    }

    #[test]
    fn buckets_follow_prometheus_le_semantics() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(20_000), 1);
        assert_eq!(bucket(bucket_bound_ns(BUCKETS - 1)), BUCKETS - 1);
        assert_eq!(bucket(bucket_bound_ns(BUCKETS - 1) + 1), BUCKETS);
        assert!(bucket_bound_ns(BUCKETS - 1) > 60_000_000_000);
        for ns in [1u64, 999, 12_345, 60_000_000, 1_000_000_000, 59_000_000_000] {
            let k = bucket(ns);
            assert!(ns <= bucket_bound_ns(k));
            assert!(k == 0 || ns > bucket_bound_ns(k - 1));
        }
    }

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

    #[test]
    fn phases_need_ordered_times() {
        assert_eq!(handshake_phases(10, 30, 35), Some([20, 5, 25]));
        assert_eq!(handshake_phases(0, 30, 35), None);
        assert_eq!(handshake_phases(40, 30, 35), None);
    }

    #[test]
    fn reap_request_round_trips() {
        let r = ReapRequest {
            timeouts: [1, 2, 3, 4, 5, 6],
            tables: 0b101,
            reconcile: 1,
            listed: 0b100,
            listed_from: [12, 13, 14],
            listed_len: [15, 16, 17],
            visited: [6, 7, 8],
            reaped: [9, 10, 11],
        };
        assert_eq!(ReapRequest::from_bytes(&r.to_bytes()), Some(r));
    }
}
