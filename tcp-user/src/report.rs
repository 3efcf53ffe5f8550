//! Tallies of what the tracker saw, rendered as Prometheus text (the exporter's metric names)
//! or JSON.

use std::{collections::BTreeMap, net::IpAddr};

use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Serialize;
use tcp_common::{
    counters::{Counter, EventCounters, HookCounters},
    flow::{Flow, FlowKey, flow_flags},
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
    /// Connections (attempts) with a SYN and no SYN-ACK.
    pub syn_without_synack: u64,
    /// Established connections aborted by RST.
    pub closed_by_rst: u64,
    /// Connections closed by FIN from both sides.
    pub closed_by_fin: u64,
    /// Of those, simultaneous closes.
    pub simultaneous_closes: u64,
    /// New SYNs on a 4-tuple in TIME-WAIT.
    pub time_wait_reuses: u64,
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
    /// Endpoints per (state, role, side) at the end.
    #[serde(skip)]
    pub endpoints: BTreeMap<(TcpState, Role, Side), u64>,
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
            ev::PICKED_UP => &mut self.picked_up,
            ev::INVALID_RST => &mut self.invalid_rst,
            ev::INVALID_FIN => &mut self.invalid_fin,
            ev::INVALID_FLAGS => &mut self.invalid_flags,
            ev::INVALID_ACK => &mut self.invalid_ack,
            _ => return None,
        })
    }

    /// Adds the events of one segment.
    pub fn count_events(&mut self, e: u32) {
        for bit in (0..32).map(|i| 1u32 << i).filter(|b| e & b != 0) {
            if let Some(field) = self.field_mut(bit) {
                *field += 1;
            }
        }
    }

    /// Adds the kernel's per-event tallies (summed over CPUs).
    pub fn add_kernel_events(&mut self, events: &EventCounters) {
        for i in 0..24 {
            if let Some(field) = self.field_mut(1 << i) {
                *field += events.slots[i];
            }
        }
    }

    /// Accounts for a record that ends (expired, or replaced by a new connection).
    pub fn finish(&mut self, flow: &Flow) {
        self.finish_open(flow);
        if flow.is_half_open() && !flow.has(flow_flags::HANDSHAKE_DONE) {
            self.handshakes_failed_timeout += 1;
        }
    }

    /// Accounts for a record still held at the end.
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
    pub fn endpoints_in(&self, state: TcpState, role: Role) -> u64 {
        self.endpoints
            .iter()
            .filter(|((s, r, _), _)| *s == state && *r == role)
            .map(|(_, n)| n)
            .sum()
    }

    /// Prometheus text exposition of these tallies; `hook` labels the packet counters.
    ///
    /// # Errors
    /// Only if the prometheus crate rejects a metric definition (a bug).
    pub fn prometheus_text(&self, hook: &str) -> prometheus::Result<String> {
        let registry = Registry::new();
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "tcpscope_endpoints",
                "TCP endpoints currently in each RFC 793 state",
            ),
            &["state", "role", "side"],
        )?;
        registry.register(Box::new(endpoints.clone()))?;
        for state in TcpState::ALL.iter().filter(|s| **s != TcpState::Closed) {
            for role in Role::ALL {
                for side in Side::ALL {
                    let n = self
                        .endpoints
                        .get(&(*state, role, side))
                        .copied()
                        .unwrap_or(0);
                    endpoints
                        .with_label_values(&[state.name(), role.name(), side.name()])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
        let counter = |name: &str, help: &str, v: u64| -> prometheus::Result<()> {
            let c = IntCounter::new(name, help)?;
            c.inc_by(v);
            registry.register(Box::new(c))
        };
        counter(
            "tcpscope_syn_total",
            "SYN (no ACK) segments, retransmissions included",
            self.syn,
        )?;
        counter(
            "tcpscope_syn_retransmits_total",
            "Repeated SYNs on a half-open flow",
            self.syn_retransmits,
        )?;
        counter("tcpscope_synack_total", "SYN+ACK segments", self.synack)?;
        counter(
            "tcpscope_handshakes_completed_total",
            "Three-way handshakes seen to completion",
            self.handshakes_completed,
        )?;
        counter(
            "tcpscope_time_wait_reuses_total",
            "New SYNs on a 4-tuple with an endpoint in TIME-WAIT",
            self.time_wait_reuses,
        )?;
        counter(
            "tcpscope_simultaneous_closes_total",
            "Connections closed by FINs that crossed",
            self.simultaneous_closes,
        )?;
        let vec = |name: &str,
                   help: &str,
                   label: &str,
                   values: &[(&str, u64)]|
         -> prometheus::Result<()> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            for (l, v) in values {
                c.with_label_values(&[*l]).inc_by(*v);
            }
            registry.register(Box::new(c))
        };
        vec(
            "tcpscope_handshakes_failed_total",
            "Handshakes that did not complete",
            "reason",
            &[
                ("rst", self.handshakes_failed_rst),
                ("timeout", self.handshakes_failed_timeout),
            ],
        )?;
        vec(
            "tcpscope_closes_total",
            "Connections ended, by how",
            "reason",
            &[("fin", self.closed_by_fin), ("rst", self.closed_by_rst)],
        )?;
        vec(
            "tcpscope_invalid_segments_total",
            "Segments ignored by the state machine",
            "reason",
            &[
                ("rst_out_of_window", self.invalid_rst),
                ("fin_out_of_window", self.invalid_fin),
                ("bad_flags", self.invalid_flags),
                ("bad_ack", self.invalid_ack),
            ],
        )?;
        let packets = IntCounterVec::new(
            Opts::new("tcpscope_packets_total", "Packets seen, by parse result"),
            &["hook", "result"],
        )?;
        for c in Counter::ALL.iter().filter(|c| c.is_result()) {
            packets
                .with_label_values(&[hook, c.name()])
                .inc_by(self.packets.get(*c));
        }
        registry.register(Box::new(packets))?;
        let mut out = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
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
