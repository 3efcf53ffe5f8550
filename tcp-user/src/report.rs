//! Tallies of what the tracker saw ([`Report`]), from the kernel's summed per-CPU metrics
//! (`run`, `stats`) or from the userspace replay of a capture (`replay`); `exposition.rs`
//! turns them into the exporter's metric families, and `--format json` prints them as they are.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;
use tcp_common::{
    counters::HookCounters,
    event_counters::{EventCounters, event_slots},
    flow::{Flow, FlowKey, flow_flags},
    gauges::{GAUGE_SLOTS, slot_labels},
    histogram::Histogram,
    metrics::Metrics,
    state::{Role, Side, TcpState, events as ev},
};

/// Event and endpoint tallies.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Parse results of every frame.
    #[serde(skip)]
    pub packets: HookCounters,
    /// SYN segments (no ACK), retransmissions included.
    pub syn: u64,
    /// Repeated SYNs of a handshake in progress.
    pub syn_retransmits: u64,
    /// SYN+ACK segments.
    pub synack: u64,
    /// Three-way handshakes seen to completion.
    pub handshakes_completed: u64,
    /// Handshakes ended by RST.
    pub handshakes_failed_rst: u64,
    /// Handshakes that never completed before their record ended.
    pub handshakes_failed_timeout: u64,
    /// Connections (attempts) with a SYN and no SYN-ACK (replay only: needs every record).
    pub syn_without_synack: u64,
    /// Established connections aborted by RST.
    pub closed_by_rst: u64,
    /// Connections closed by FIN from both sides.
    pub closed_by_fin: u64,
    /// Of those, simultaneous closes.
    pub simultaneous_closes: u64,
    /// New SYNs on a 4-tuple in TIME-WAIT (attempts).
    pub time_wait_reuses: u64,
    /// Of those, answered by a SYN-ACK.
    pub time_wait_reuses_accepted: u64,
    /// Of those, answered by an ACK or a RST.
    pub time_wait_reuses_refused: u64,
    /// Repeated SYN-ACKs.
    pub synack_retransmits: u64,
    /// Repeated FINs.
    pub fin_retransmits: u64,
    /// Simultaneous opens (SYNs that crossed).
    pub simultaneous_opens: u64,
    /// Data segments sent into a half-closed connection (by the side that got the FIN).
    pub half_close_data_segments: u64,
    /// RSTs inside the window but not at the expected sequence number, ignored (RFC 5961).
    pub invalid_rst_in_window: u64,
    /// Keepalive probes, by the side of the prober ([`Side`] as index).
    pub keepalive_probes: [u64; 3],
    /// Answers to keepalive probes, by the side of the prober.
    pub keepalive_acks: [u64; 3],
    /// Connections reset while a keepalive probe was outstanding.
    pub closed_by_keepalive: u64,
    /// Connections whose server stayed silent after its SYN-ACK while the client sent (the
    /// view walk's mark; the agent only).
    pub silent_servers: u64,
    /// Records created mid-stream.
    pub picked_up: u64,
    /// Out-of-window RSTs ignored.
    pub invalid_rst: u64,
    /// Out-of-window FINs ignored.
    pub invalid_fin: u64,
    /// Impossible flag combinations ignored.
    pub invalid_flags: u64,
    /// SYN-ACKs or handshake ACKs not acknowledging the peer's SYN.
    pub invalid_ack: u64,
    /// Segments of flows whose record could not be stored (table full).
    #[serde(skip)]
    pub untracked_table_full: u64,
    /// Segments that found their record being removed on another CPU.
    #[serde(skip)]
    pub untracked_lost_race: u64,
    /// Endpoints per (state, role, side).
    #[serde(skip)]
    pub endpoints: BTreeMap<(TcpState, Role, Side), i64>,
    /// SYNs of attempts that expired without a SYN-ACK, per server port (replay; the agent
    /// reads the kernel's per-port tallies).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unanswered_syns: BTreeMap<u16, u64>,
    /// Accept-queue overflows per listening port (replay; the agent reads the kernel's).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub accept_queue_overflows: BTreeMap<u16, u64>,
    /// Handshake latency per [`Phase`].
    #[serde(skip)]
    pub handshake: [Histogram; 3],
}

impl Report {
    /// The tally an event bit adds to, if any.
    fn field_mut(&mut self, bit: u32) -> Option<&mut u64> {
        Some(match bit {
            ev::SYN => &mut self.syn,
            ev::SYN_RETRANSMIT => &mut self.syn_retransmits,
            ev::SYN_ACK => &mut self.synack,
            ev::HANDSHAKE_COMPLETED => &mut self.handshakes_completed,
            ev::HANDSHAKE_FAILED_RST => &mut self.handshakes_failed_rst,
            ev::RESET => &mut self.closed_by_rst,
            ev::CLOSED_BY_FIN => &mut self.closed_by_fin,
            ev::SIMULTANEOUS_CLOSE => &mut self.simultaneous_closes,
            ev::TIME_WAIT_REUSE => &mut self.time_wait_reuses,
            ev::TIME_WAIT_REUSE_ACCEPTED => &mut self.time_wait_reuses_accepted,
            ev::TIME_WAIT_REUSE_REFUSED => &mut self.time_wait_reuses_refused,
            ev::SYNACK_RETRANSMIT => &mut self.synack_retransmits,
            ev::FIN_RETRANSMIT => &mut self.fin_retransmits,
            ev::SIMULTANEOUS_OPEN => &mut self.simultaneous_opens,
            ev::HALF_CLOSE_DATA => &mut self.half_close_data_segments,
            ev::RST_IN_WINDOW => &mut self.invalid_rst_in_window,
            ev::CLOSED_BY_KEEPALIVE => &mut self.closed_by_keepalive,
            ev::PICKED_UP => &mut self.picked_up,
            ev::INVALID_RST => &mut self.invalid_rst,
            ev::INVALID_FIN => &mut self.invalid_fin,
            ev::INVALID_FLAGS => &mut self.invalid_flags,
            ev::INVALID_ACK => &mut self.invalid_ack,
            _ => return None,
        })
    }

    /// Adds the events of one segment sent by an endpoint on `side`.
    pub fn count_events(&mut self, e: u32, side: Side) {
        for bit in (0..event_slots::STATE_EVENTS)
            .map(|i| 1u32 << i)
            .filter(|b| e & b != 0)
        {
            if let Some(field) = self.field_mut(bit) {
                *field += 1;
            }
        }
        if e & ev::KEEPALIVE_PROBE != 0 {
            self.keepalive_probes[side as usize] += 1;
        }
        if e & ev::KEEPALIVE_ACK != 0 {
            self.keepalive_acks[side.opposite() as usize] += 1;
        }
    }

    /// Adds the kernel's per-event tallies (summed over CPUs).
    pub fn add_kernel_events(&mut self, events: &EventCounters) {
        for i in 0..event_slots::STATE_EVENTS {
            if let Some(field) = self.field_mut(1 << i) {
                *field += events.slots[i];
            }
        }
        self.silent_servers += events.slots[event_slots::SILENT_SERVERS];
        for side in 0..Side::ALL.len() {
            self.keepalive_probes[side] += events.slots[event_slots::KEEPALIVE_PROBES + side];
            self.keepalive_acks[side] += events.slots[event_slots::KEEPALIVE_ACKS + side];
        }
        self.handshakes_failed_timeout += events.slots[event_slots::HANDSHAKES_TIMED_OUT];
        self.untracked_table_full += events.slots[event_slots::UNTRACKED_SEGMENTS];
        self.untracked_lost_race += events.slots[event_slots::LOST_RACE];
    }

    /// The report of the kernel's metrics (summed over CPUs) and ingress packet counters.
    #[must_use]
    pub fn from_kernel(metrics: &Metrics, packets: HookCounters) -> Self {
        let mut report = Self {
            packets,
            handshake: metrics.handshake,
            ..Self::default()
        };
        report.add_kernel_events(&metrics.events);
        for slot in 0..GAUGE_SLOTS {
            if let Some(labels) = slot_labels(slot) {
                let n = metrics.endpoints_in(slot);
                if n != 0 {
                    report.endpoints.insert(labels, n);
                }
            }
        }
        report
    }

    /// Adds a handshake of `flow` that its segment at `now` completed (userspace replay).
    pub fn observe_handshake(&mut self, flow: &Flow, now: u64) {
        if let Some(phases) =
            tcp_common::histogram::handshake_phases(flow.syn_ns, flow.synack_ns, now)
        {
            for (h, ns) in self.handshake.iter_mut().zip(phases) {
                h.observe(ns);
            }
        }
    }

    /// Accounts for a record that ends (expired, or replaced by a new connection; replay).
    pub fn finish(&mut self, flow: &Flow) {
        self.finish_open(flow);
        if flow.handshake_failed() {
            self.handshakes_failed_timeout += 1;
        }
    }

    /// Accounts for a record that expires (replay): an attempt that never got a SYN-ACK adds
    /// its SYNs to its server port's unanswered ones, as the kernel's reaper does.
    pub fn expire(&mut self, key: &FlowKey, flow: &Flow) {
        if flow.is_half_open()
            && flow.syn_ns != 0
            && flow.synack_ns == 0
            && !flow.has(flow_flags::HANDSHAKE_DONE)
            && flow.client < 2
            && flow.ep[usize::from(flow.client)].side() != Side::Local
        {
            let port = key.port[1 - usize::from(flow.client)];
            *self.unanswered_syns.entry(port).or_default() += u64::from(flow.syns);
        }
        self.finish(flow);
    }

    /// Accounts for a record still held at the end (replay).
    pub fn finish_open(&mut self, flow: &Flow) {
        if flow.syn_ns != 0 && flow.synack_ns == 0 {
            self.syn_without_synack += 1;
        }
    }

    /// Adds the endpoints of a record still held to the per-state counts.
    pub fn count_endpoints(&mut self, flow: &Flow) {
        for i in 0..2 {
            let state = flow.ep[i].state();
            if state != TcpState::Closed {
                *self
                    .endpoints
                    .entry((state, flow.role(i), flow.ep[i].side()))
                    .or_default() += 1;
            }
        }
    }

    /// Endpoints in `state` with `role`, any side.
    #[must_use]
    pub fn endpoints_in(&self, state: TcpState, role: Role) -> i64 {
        self.endpoints
            .iter()
            .filter(|((s, r, _), _)| *s == state && *r == role)
            .map(|(_, n)| n)
            .sum()
    }
}

/// `address:port` (IPv6 in brackets) of endpoint `i` of a key.
#[must_use]
pub fn endpoint_string(key: &FlowKey, i: usize) -> String {
    let a = key.addr[i];
    let ip = if key.ipv6 != 0 {
        IpAddr::from(a)
    } else {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    };
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{}", key.port[i]),
        IpAddr::V6(v6) => format!("[{v6}]:{}", key.port[i]),
    }
}
