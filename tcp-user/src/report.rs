//! Tallies of what the tracker saw, and their Prometheus text exposition (the exporter's metric
//! names, DESIGN.md §Metrics) or JSON.
//!
//! The same [`Report`] comes from the kernel's summed per-CPU metrics (`run`, `stats`) or from
//! the userspace replay of a capture (`replay`), so both speak exactly the same names.

use std::{collections::BTreeMap, net::IpAddr};

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{self, MetricFamily, MetricType},
};
use serde::Serialize;
use tcp_common::{
    counters::{Counter, HookCounters},
    event_counters::{EventCounters, event_slots},
    flow::{Flow, FlowKey, flow_flags},
    gauges::{GAUGE_SLOTS, slot_labels},
    histogram::{BUCKETS, Histogram, Phase, bucket_bound_ns},
    metrics::{Metrics, PortStats, WalkView, port_view_slot},
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
        for bit in (0..32).map(|i| 1u32 << i).filter(|b| e & b != 0) {
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
        for i in 0..32 {
            if let Some(field) = self.field_mut(1 << i) {
                *field += events.slots[i];
            }
        }
        self.silent_servers += events.slots[event_slots::SILENT_SERVERS];
        for side in 0..3 {
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

    /// Prometheus text exposition of these tallies; `hook` labels the packet counters.
    #[must_use]
    pub fn prometheus_text(&self, hook: &'static str) -> String {
        Exposition {
            report: self,
            packets: vec![(hook, self.packets)],
            tables: Vec::new(),
            flood_ports: Vec::new(),
            port_tallies: {
                let mut ports: BTreeMap<u16, PortStats> = BTreeMap::new();
                for (port, n) in &self.unanswered_syns {
                    ports.entry(*port).or_default().unanswered = *n;
                }
                for (port, n) in &self.accept_queue_overflows {
                    ports.entry(*port).or_default().overflows = *n;
                }
                ports.into_iter().collect()
            },
            walk: None,
            reconciled: None,
        }
        .text()
    }
}

/// One flow table's occupancy and pressure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableStats {
    /// `established` or `half_open`.
    pub name: &'static str,
    /// The address family it holds: `ipv4` or `ipv6` (the established tables), `all` (the
    /// half-open one).
    pub family: &'static str,
    /// Records held now.
    pub held: i64,
    /// Configured capacity.
    pub capacity: u32,
    /// Records that could not be inserted (table full).
    pub insert_failures: u64,
    /// Records given up on an idle timeout while the connection was live.
    pub evictions: u64,
}

/// Everything one scrape exposes.
pub struct Exposition<'a> {
    /// Events, endpoints, histograms.
    pub report: &'a Report,
    /// Packet counters per hook label.
    pub packets: Vec<(&'static str, HookCounters)>,
    /// Flow tables (empty for a replay).
    pub tables: Vec<TableStats>,
    /// Ports the SYN-flood rule reports on, and whether it holds for each.
    pub flood_ports: Vec<(u16, bool)>,
    /// Per-port tallies to export (bounded as the flood ports are): unanswered SYNs.
    pub port_tallies: Vec<(u16, PortStats)>,
    /// What the reaper's last walk found, for the per-port view and the oldest endpoints
    /// (none for a replay, or before the first walk).
    pub walk: Option<WalkExport<'a>>,
    /// Records reconciliation removed and connections it picked up (none for a replay).
    pub reconciled: Option<[u64; 2]>,
}

/// The reaper walk's view and how to label it.
pub struct WalkExport<'a> {
    /// The watched ports, in index order.
    pub ports: &'a [u16],
    /// The sides endpoints can have in this mode (local and remote; unknown in mirror mode).
    pub sides: &'a [Side],
    /// The view.
    pub view: &'a WalkView,
}

/// A metric with these labels, sorted by name as the prometheus crate's registry does.
fn with_labels(labels: &[(&str, &str)]) -> proto::Metric {
    let mut pairs: Vec<proto::LabelPair> = labels
        .iter()
        .map(|(name, value)| {
            let mut l = proto::LabelPair::default();
            l.set_name((*name).to_owned());
            l.set_value((*value).to_owned());
            l
        })
        .collect();
    pairs.sort_by(|a, b| a.name().cmp(b.name()));
    proto::Metric::from_label(pairs)
}

/// A metric family under construction.
struct Family {
    inner: MetricFamily,
    metrics: Vec<proto::Metric>,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut inner = MetricFamily::default();
        inner.set_name(name.to_owned());
        inner.set_help(help.to_owned());
        inner.set_field_type(kind);
        Self {
            inner,
            metrics: Vec::new(),
        }
    }

    fn value(mut self, labels: &[(&str, &str)], v: f64) -> Self {
        let mut m = with_labels(labels);
        match self.inner.get_field_type() {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        self.metrics.push(m);
        self
    }

    fn histogram(mut self, labels: &[(&str, &str)], h: &Histogram) -> Self {
        let mut m = with_labels(labels);
        let mut p = proto::Histogram::default();
        let mut cumulative = 0;
        let buckets = (0..BUCKETS)
            .map(|k| {
                cumulative += h.buckets[k];
                let mut b = proto::Bucket::default();
                b.set_upper_bound(bucket_bound_ns(k) as f64 / 1e9);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        p.set_bucket(buckets);
        // The count from the buckets themselves: the kernel bumps `count` after the bucket,
        // and a scrape in between must not show +Inf below the last finite bucket.
        p.set_sample_count(h.buckets.iter().fold(0, |a, b| a.wrapping_add(*b)));
        p.set_sample_sum(h.sum_ns as f64 / 1e9);
        m.set_histogram(p);
        self.metrics.push(m);
        self
    }

    fn done(mut self) -> MetricFamily {
        self.inner.set_metric(self.metrics);
        self.inner
    }
}

fn counter(name: &str, help: &str, v: u64) -> MetricFamily {
    Family::new(name, help, MetricType::COUNTER)
        .value(&[], v as f64)
        .done()
}

impl Exposition<'_> {
    /// Every metric family, in exposition order.
    #[must_use]
    pub fn families(&self) -> Vec<MetricFamily> {
        let r = self.report;
        let mut out = Vec::new();
        let mut endpoints = Family::new(
            "tcpscope_endpoints",
            "TCP endpoints currently in each RFC 793 state, by role and side",
            MetricType::GAUGE,
        );
        for state in TcpState::ALL.iter().filter(|s| **s != TcpState::Closed) {
            for role in Role::ALL {
                for side in Side::ALL {
                    // A scrape reads the CPUs' copies one after another, not as one snapshot:
                    // an endpoint that moved between CPUs meanwhile may show as -1 for that
                    // scrape; never expose less than nothing.
                    let n = r
                        .endpoints
                        .get(&(*state, role, side))
                        .copied()
                        .unwrap_or(0)
                        .max(0);
                    endpoints = endpoints.value(
                        &[
                            ("state", state.name()),
                            ("role", role.name()),
                            ("side", side.name()),
                        ],
                        n as f64,
                    );
                }
            }
        }
        out.push(endpoints.done());
        if let Some(w) = &self.walk {
            let states = || TcpState::ALL.into_iter().filter(|s| *s != TcpState::Closed);
            let mut ports = Family::new(
                "tcpscope_port_endpoints",
                "Endpoints of each --ports port, per state and side, as of the last expiry walk",
                MetricType::GAUGE,
            );
            for (i, port) in w.ports.iter().enumerate() {
                let port = port.to_string();
                for state in states() {
                    for side in w.sides {
                        let n = w.view.ports[port_view_slot(i, state as usize, *side as usize)];
                        ports = ports.value(
                            &[
                                ("port", &port),
                                ("state", state.name()),
                                ("side", side.name()),
                            ],
                            f64::from(n),
                        );
                    }
                }
            }
            out.push(ports.done());
            let mut oldest = Family::new(
                "tcpscope_oldest_endpoint_seconds",
                "How long the oldest endpoint of each state has been in it, as its record knows \
                 (TIME-WAIT since the close, the others since their last segment), as of the \
                 last expiry walk; 0: none",
                MetricType::GAUGE,
            );
            for state in states() {
                for side in w.sides {
                    let ns = w.view.oldest_ns[state as usize * Side::ALL.len() + *side as usize];
                    oldest = oldest.value(
                        &[("state", state.name()), ("side", side.name())],
                        ns as f64 / 1e9,
                    );
                }
            }
            out.push(oldest.done());
        }
        if !self.tables.is_empty() {
            let table =
                |name: &str, help: &str, kind: MetricType, f: &dyn Fn(&TableStats) -> f64| {
                    let mut fam = Family::new(name, help, kind);
                    for t in &self.tables {
                        fam = fam.value(&[("table", t.name), ("family", t.family)], f(t));
                    }
                    fam.done()
                };
            out.push(table(
                "tcpscope_flows",
                "Flow records held now, per table (the established one per address family)",
                MetricType::GAUGE,
                &|t| t.held.max(0) as f64,
            ));
            out.push(table(
                "tcpscope_flow_table_capacity",
                "Configured capacity of each flow table",
                MetricType::GAUGE,
                &|t| f64::from(t.capacity),
            ));
            out.push(table(
                "tcpscope_flow_table_insert_failures_total",
                "New records refused because the table was full",
                MetricType::COUNTER,
                &|t| t.insert_failures as f64,
            ));
            out.push(table(
                "tcpscope_flow_table_evictions_total",
                "Records dropped on an idle timeout while their connection was still live",
                MetricType::COUNTER,
                &|t| t.evictions as f64,
            ));
        }
        out.push(counter(
            "tcpscope_syn_total",
            "SYN (no ACK) segments, retransmissions included",
            r.syn,
        ));
        out.push(counter(
            "tcpscope_syn_retransmits_total",
            "Repeated SYNs on a half-open flow",
            r.syn_retransmits,
        ));
        out.push(counter(
            "tcpscope_synack_total",
            "SYN+ACK segments, retransmissions included",
            r.synack,
        ));
        out.push(counter(
            "tcpscope_synack_retransmits_total",
            "SYN+ACKs repeating one their sender already sent",
            r.synack_retransmits,
        ));
        out.push(counter(
            "tcpscope_simultaneous_opens_total",
            "Connections opened by SYNs that crossed",
            r.simultaneous_opens,
        ));
        out.push(counter(
            "tcpscope_handshakes_completed_total",
            "Three-way handshakes seen to completion",
            r.handshakes_completed,
        ));
        out.push(
            Family::new(
                "tcpscope_handshakes_failed_total",
                "Handshakes that did not complete, by how they ended",
                MetricType::COUNTER,
            )
            .value(&[("reason", "rst")], r.handshakes_failed_rst as f64)
            .value(&[("reason", "timeout")], r.handshakes_failed_timeout as f64)
            .done(),
        );
        let mut flood = Family::new(
            "tcpscope_syn_flood_active",
            "1 while the SYN-flood rule holds for a listening port (flagged and busiest ports only)",
            MetricType::GAUGE,
        );
        for (port, active) in &self.flood_ports {
            flood = flood.value(&[("port", &port.to_string())], f64::from(u8::from(*active)));
        }
        out.push(flood.done());
        let mut unanswered = Family::new(
            "tcpscope_unanswered_syns_total",
            "SYNs (first and retransmitted) of attempts towards a port that ended without any \
             SYN-ACK (a listener dropping SYNs: accept queue full, or a filter)",
            MetricType::COUNTER,
        );
        let mut overflows = Family::new(
            "tcpscope_accept_queue_overflows_total",
            "Connections whose listener ignored the handshake-completing ACK (sent its SYN-ACK \
             again) or reset right after it: a full accept queue",
            MetricType::COUNTER,
        );
        for (port, stats) in &self.port_tallies {
            let port = port.to_string();
            unanswered = unanswered.value(&[("port", &port)], stats.unanswered as f64);
            overflows = overflows.value(&[("port", &port)], stats.overflows as f64);
        }
        out.push(unanswered.done());
        out.push(overflows.done());
        if let Some([removed, picked_up]) = self.reconciled {
            out.push(
                Family::new(
                    "tcpscope_reconciled_total",
                    "Reconciliation of the tables with the truth: records removed (host mode: \
                     their local socket gone or in another state, per sock_diag; mirror mode: \
                     untouched since a restart) and connections picked up from the kernel's \
                     socket table",
                    MetricType::COUNTER,
                )
                .value(&[("action", "removed")], removed as f64)
                .value(&[("action", "picked_up")], picked_up as f64)
                .done(),
            );
        }
        out.push(counter(
            "tcpscope_silent_servers_total",
            "Connections whose server sent nothing after its SYN-ACK while the client sent data \
             or a FIN, at two expiry walks in a row (a SYN-cookie handshake into a full accept \
             queue, or a server gone)",
            r.silent_servers,
        ));
        let mut hist = Family::new(
            "tcpscope_handshake_duration_seconds",
            "Handshake latency at the observation point, from the first SYN",
            MetricType::HISTOGRAM,
        );
        for phase in Phase::ALL {
            hist = hist.histogram(&[("phase", phase.name())], &r.handshake[phase as usize]);
        }
        out.push(hist.done());
        out.push(
            Family::new(
                "tcpscope_closes_total",
                "Connections ended, by how",
                MetricType::COUNTER,
            )
            .value(&[("reason", "fin")], r.closed_by_fin as f64)
            .value(&[("reason", "rst")], r.closed_by_rst as f64)
            .value(&[("reason", "keepalive")], r.closed_by_keepalive as f64)
            .done(),
        );
        let by_side = |name: &str, help: &str, v: &[u64; 3]| {
            let mut f = Family::new(name, help, MetricType::COUNTER);
            for side in Side::ALL {
                f = f.value(&[("side", side.name())], v[side as usize] as f64);
            }
            f.done()
        };
        out.push(by_side(
            "tcpscope_keepalive_probes_total",
            "Keepalive probes, by the side of the prober",
            &r.keepalive_probes,
        ));
        out.push(by_side(
            "tcpscope_keepalive_acks_total",
            "Answers to keepalive probes, by the side of the prober",
            &r.keepalive_acks,
        ));
        out.push(counter(
            "tcpscope_simultaneous_closes_total",
            "Connections closed by FINs that crossed",
            r.simultaneous_closes,
        ));
        out.push(counter(
            "tcpscope_fin_retransmits_total",
            "FINs repeating one their sender already sent",
            r.fin_retransmits,
        ));
        out.push(counter(
            "tcpscope_half_close_data_segments_total",
            "Data segments sent by the side that got its peer's FIN and has not sent its own",
            r.half_close_data_segments,
        ));
        out.push(
            Family::new(
                "tcpscope_time_wait_reuses_total",
                "New SYNs on a 4-tuple with an endpoint in TIME-WAIT, by the answer they got",
                MetricType::COUNTER,
            )
            .value(
                &[("outcome", "accepted")],
                r.time_wait_reuses_accepted as f64,
            )
            .value(&[("outcome", "refused")], r.time_wait_reuses_refused as f64)
            .done(),
        );
        out.push(counter(
            "tcpscope_picked_up_total",
            "Connections first seen mid-stream (no handshake observed)",
            r.picked_up,
        ));
        out.push(
            Family::new(
                "tcpscope_invalid_segments_total",
                "Segments ignored by the state machine",
                MetricType::COUNTER,
            )
            .value(&[("reason", "rst_out_of_window")], r.invalid_rst as f64)
            .value(
                &[("reason", "rst_in_window")],
                r.invalid_rst_in_window as f64,
            )
            .value(&[("reason", "fin_out_of_window")], r.invalid_fin as f64)
            .value(&[("reason", "bad_flags")], r.invalid_flags as f64)
            .value(&[("reason", "bad_ack")], r.invalid_ack as f64)
            .done(),
        );
        out.push(
            Family::new(
                "tcpscope_untracked_segments_total",
                "TCP segments not applied to any record",
                MetricType::COUNTER,
            )
            .value(&[("reason", "table_full")], r.untracked_table_full as f64)
            .value(
                &[("reason", "record_removed")],
                r.untracked_lost_race as f64,
            )
            .done(),
        );
        let mut packets = Family::new(
            "tcpscope_packets_total",
            "Packets seen, by hook and parse result",
            MetricType::COUNTER,
        );
        for (hook, counters) in &self.packets {
            for c in Counter::ALL.iter().filter(|c| c.is_result()) {
                packets = packets.value(
                    &[("hook", hook), ("result", c.name())],
                    counters.get(*c) as f64,
                );
            }
        }
        out.push(packets.done());
        out.push(
            Family::new(
                "tcpscope_build_info",
                "Always 1; the labels describe the running build",
                MetricType::GAUGE,
            )
            .value(
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("layout", &tcp_common::LAYOUT_VERSION.to_string()),
                ],
                1.0,
            )
            .done(),
        );
        out
    }

    /// The Prometheus text format.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        // A family without samples (no port reported yet) is left out, as the text format
        // requires; encoding into a Vec cannot fail otherwise.
        let families: Vec<MetricFamily> = self
            .families()
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::error!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
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
