//! The Prometheus exposition: every metric family the exporter serves, declared as a table
//! (name, help, type, and where its samples come from), and the text format. The same
//! [`Report`] comes from the kernel's summed per-CPU metrics (`run`, `stats`) or from a replay,
//! so both speak exactly the same names.

use std::collections::BTreeMap;

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{self, MetricFamily, MetricType},
};
use tcp_common::{
    counters::{Counter, HookCounters},
    histogram::{BUCKETS, Histogram, Phase, bucket_bound_ns},
    metrics::{PortStats, WalkView, port_view_slot},
    state::{Role, Side, TcpState},
};

use crate::report::Report;

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
    /// Families served after the tracker's own: the agent's (`process_*`, scrape and reap
    /// durations; see [`crate::selfstats`]). Empty for a replay.
    pub agent: Vec<MetricFamily>,
    /// State changes the event ring buffer had no room for (none for a replay).
    pub events_lost: Option<u64>,
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

/// A sample's labels.
type Labels = Vec<(&'static str, String)>;
/// A family's samples: labels and value each.
type Samples = Vec<(Labels, f64)>;

/// Where a family's samples come from.
enum Source {
    /// Counter or gauge values; `None`: the family is not part of this exposition (no walk, no
    /// tables, no reconciliation: a replay).
    Values(fn(&Exposition<'_>) -> Option<Samples>),
    /// One histogram per label set.
    Histograms(fn(&Exposition<'_>) -> Vec<(Labels, Histogram)>),
}

/// One metric family of the exposition.
struct Spec {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    source: Source,
}

/// A single unlabelled value.
fn one(v: u64) -> Option<Samples> {
    Some(vec![(Vec::new(), v as f64)])
}

/// One value per value of `label`.
fn by(label: &'static str, values: &[(&'static str, u64)]) -> Option<Samples> {
    Some(
        values
            .iter()
            .map(|(l, v)| (vec![(label, (*l).to_owned())], *v as f64))
            .collect(),
    )
}

/// One value per side.
fn by_side(v: &[u64; 3]) -> Option<Samples> {
    Some(
        Side::ALL
            .iter()
            .map(|side| {
                (
                    vec![("side", side.name().to_owned())],
                    v[*side as usize] as f64,
                )
            })
            .collect(),
    )
}

/// One value per flow table (none for a replay).
fn by_table(e: &Exposition<'_>, f: fn(&TableStats) -> f64) -> Option<Samples> {
    (!e.tables.is_empty()).then(|| {
        e.tables
            .iter()
            .map(|t| {
                let labels = vec![
                    ("table", t.name.to_owned()),
                    ("family", t.family.to_owned()),
                ];
                (labels, f(t))
            })
            .collect()
    })
}

/// One value per reported port.
fn by_port<T>(items: &[(u16, T)], f: fn(&T) -> f64) -> Option<Samples> {
    Some(
        items
            .iter()
            .map(|(port, v)| (vec![("port", port.to_string())], f(v)))
            .collect(),
    )
}

/// States an endpoint is counted in (CLOSED holds no state).
fn counted_states() -> impl Iterator<Item = TcpState> {
    TcpState::ALL.into_iter().filter(|s| *s != TcpState::Closed)
}

/// Every family, in exposition order.
const FAMILIES: &[Spec] = &[
    Spec {
        name: "tcpscope_endpoints",
        help: "TCP endpoints currently in each RFC 793 state, by role and side",
        kind: MetricType::GAUGE,
        source: Source::Values(|e| {
            let mut out = Vec::new();
            for state in counted_states() {
                for role in Role::ALL {
                    for side in Side::ALL {
                        // A scrape reads the CPUs' copies one after another, not as one
                        // snapshot: an endpoint that moved between CPUs meanwhile may show as
                        // -1 for that scrape; never expose less than nothing.
                        let n = e
                            .report
                            .endpoints
                            .get(&(state, role, side))
                            .copied()
                            .unwrap_or(0)
                            .max(0);
                        let labels = vec![
                            ("state", state.name().to_owned()),
                            ("role", role.name().to_owned()),
                            ("side", side.name().to_owned()),
                        ];
                        out.push((labels, n as f64));
                    }
                }
            }
            Some(out)
        }),
    },
    Spec {
        name: "tcpscope_port_endpoints",
        help: "Endpoints of each --ports port, per state and side, as of the last expiry walk",
        kind: MetricType::GAUGE,
        source: Source::Values(|e| {
            let w = e.walk.as_ref()?;
            let mut out = Vec::new();
            for (i, port) in w.ports.iter().enumerate() {
                for state in counted_states() {
                    for side in w.sides {
                        let n = w.view.ports[port_view_slot(i, state as usize, *side as usize)];
                        let labels = vec![
                            ("port", port.to_string()),
                            ("state", state.name().to_owned()),
                            ("side", side.name().to_owned()),
                        ];
                        out.push((labels, f64::from(n)));
                    }
                }
            }
            Some(out)
        }),
    },
    Spec {
        name: "tcpscope_oldest_endpoint_seconds",
        help: "How long the oldest endpoint of each state has been in it, as its record knows \
               (TIME-WAIT since the close, the others since their last segment), as of the \
               last expiry walk; 0: none",
        kind: MetricType::GAUGE,
        source: Source::Values(|e| {
            let w = e.walk.as_ref()?;
            let mut out = Vec::new();
            for state in counted_states() {
                for side in w.sides {
                    let ns = w.view.oldest_ns[state as usize * Side::ALL.len() + *side as usize];
                    let labels = vec![
                        ("state", state.name().to_owned()),
                        ("side", side.name().to_owned()),
                    ];
                    out.push((labels, ns as f64 / 1e9));
                }
            }
            Some(out)
        }),
    },
    Spec {
        name: "tcpscope_flows",
        help: "Flow records held now, per table (the established one per address family)",
        kind: MetricType::GAUGE,
        source: Source::Values(|e| by_table(e, |t| t.held.max(0) as f64)),
    },
    Spec {
        name: "tcpscope_flow_table_capacity",
        help: "Configured capacity of each flow table",
        kind: MetricType::GAUGE,
        source: Source::Values(|e| by_table(e, |t| f64::from(t.capacity))),
    },
    Spec {
        name: "tcpscope_flow_table_insert_failures_total",
        help: "New records refused because the table was full",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| by_table(e, |t| t.insert_failures as f64)),
    },
    Spec {
        name: "tcpscope_flow_table_evictions_total",
        help: "Records dropped on an idle timeout while their connection was still live",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| by_table(e, |t| t.evictions as f64)),
    },
    Spec {
        name: "tcpscope_syn_total",
        help: "SYN (no ACK) segments, retransmissions included",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.syn)),
    },
    Spec {
        name: "tcpscope_syn_retransmits_total",
        help: "Repeated SYNs on a half-open flow",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.syn_retransmits)),
    },
    Spec {
        name: "tcpscope_synack_total",
        help: "SYN+ACK segments, retransmissions included",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.synack)),
    },
    Spec {
        name: "tcpscope_synack_retransmits_total",
        help: "SYN+ACKs repeating one their sender already sent",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.synack_retransmits)),
    },
    Spec {
        name: "tcpscope_simultaneous_opens_total",
        help: "Connections opened by SYNs that crossed",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.simultaneous_opens)),
    },
    Spec {
        name: "tcpscope_handshakes_completed_total",
        help: "Three-way handshakes seen to completion",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.handshakes_completed)),
    },
    Spec {
        name: "tcpscope_handshakes_failed_total",
        help: "Handshakes that did not complete, by how they ended",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let r = e.report;
            by(
                "reason",
                &[
                    ("rst", r.handshakes_failed_rst),
                    ("timeout", r.handshakes_failed_timeout),
                ],
            )
        }),
    },
    Spec {
        name: "tcpscope_syn_flood_active",
        help: "1 while the SYN-flood rule holds for a listening port (flagged and busiest ports \
               only)",
        kind: MetricType::GAUGE,
        source: Source::Values(|e| by_port(&e.flood_ports, |a| f64::from(u8::from(*a)))),
    },
    Spec {
        name: "tcpscope_unanswered_syns_total",
        help: "SYNs (first and retransmitted) of attempts towards a port that ended without any \
               SYN-ACK (a listener dropping SYNs: accept queue full, or a filter)",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| by_port(&e.port_tallies, |s| s.unanswered as f64)),
    },
    Spec {
        name: "tcpscope_accept_queue_overflows_total",
        help: "Connections whose listener ignored the handshake-completing ACK (sent its SYN-ACK \
               again) or reset right after it: a full accept queue",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| by_port(&e.port_tallies, |s| s.overflows as f64)),
    },
    Spec {
        name: "tcpscope_reconciled_total",
        help: "Reconciliation of the tables with the truth: records removed (host mode: their \
               local socket gone or in another state, per sock_diag; mirror mode: untouched \
               since a restart) and connections picked up from the kernel's socket table",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let [removed, picked_up] = e.reconciled?;
            by("action", &[("removed", removed), ("picked_up", picked_up)])
        }),
    },
    Spec {
        name: "tcpscope_events_lost_total",
        help: "Records of state changes `tcpscope events` did not get (one per segment or \
               expiry, holding both endpoints' changes): the ring buffer was full (its reader \
               fell behind)",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.events_lost?)),
    },
    Spec {
        name: "tcpscope_silent_servers_total",
        help: "Connections whose server sent nothing after its SYN-ACK while the client sent \
               data or a FIN, at two expiry walks in a row (a SYN-cookie handshake into a full \
               accept queue, or a server gone)",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.silent_servers)),
    },
    Spec {
        name: "tcpscope_handshake_duration_seconds",
        help: "Handshake latency at the observation point, from the first SYN",
        kind: MetricType::HISTOGRAM,
        source: Source::Histograms(|e| {
            Phase::ALL
                .iter()
                .map(|p| {
                    let labels = vec![("phase", p.name().to_owned())];
                    (labels, e.report.handshake[*p as usize])
                })
                .collect()
        }),
    },
    Spec {
        name: "tcpscope_closes_total",
        help: "Connections ended, by how",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let r = e.report;
            by(
                "reason",
                &[
                    ("fin", r.closed_by_fin),
                    ("rst", r.closed_by_rst),
                    ("keepalive", r.closed_by_keepalive),
                ],
            )
        }),
    },
    Spec {
        name: "tcpscope_keepalive_probes_total",
        help: "Keepalive probes, by the side of the prober",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| by_side(&e.report.keepalive_probes)),
    },
    Spec {
        name: "tcpscope_keepalive_acks_total",
        help: "Answers to keepalive probes, by the side of the prober",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| by_side(&e.report.keepalive_acks)),
    },
    Spec {
        name: "tcpscope_simultaneous_closes_total",
        help: "Connections closed by FINs that crossed",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.simultaneous_closes)),
    },
    Spec {
        name: "tcpscope_fin_retransmits_total",
        help: "FINs repeating one their sender already sent",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.fin_retransmits)),
    },
    Spec {
        name: "tcpscope_half_close_data_segments_total",
        help: "Data segments sent by the side that got its peer's FIN and has not sent its own",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.half_close_data_segments)),
    },
    Spec {
        name: "tcpscope_time_wait_reuses_total",
        help: "New SYNs on a 4-tuple with an endpoint in TIME-WAIT, by the answer they got",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let r = e.report;
            by(
                "outcome",
                &[
                    ("accepted", r.time_wait_reuses_accepted),
                    ("refused", r.time_wait_reuses_refused),
                ],
            )
        }),
    },
    Spec {
        name: "tcpscope_picked_up_total",
        help: "Connections first seen mid-stream (no handshake observed)",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| one(e.report.picked_up)),
    },
    Spec {
        name: "tcpscope_invalid_segments_total",
        help: "Segments ignored by the state machine",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let r = e.report;
            by(
                "reason",
                &[
                    ("rst_out_of_window", r.invalid_rst),
                    ("rst_in_window", r.invalid_rst_in_window),
                    ("fin_out_of_window", r.invalid_fin),
                    ("bad_flags", r.invalid_flags),
                    ("bad_ack", r.invalid_ack),
                ],
            )
        }),
    },
    Spec {
        name: "tcpscope_untracked_segments_total",
        help: "TCP segments not applied to any record",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let r = e.report;
            by(
                "reason",
                &[
                    ("table_full", r.untracked_table_full),
                    ("record_removed", r.untracked_lost_race),
                ],
            )
        }),
    },
    Spec {
        name: "tcpscope_packets_total",
        help: "Packets seen, by hook and parse result",
        kind: MetricType::COUNTER,
        source: Source::Values(|e| {
            let mut out = Vec::new();
            for (hook, counters) in &e.packets {
                for c in Counter::ALL.iter().filter(|c| c.is_result()) {
                    let labels = vec![
                        ("hook", (*hook).to_owned()),
                        ("result", c.name().to_owned()),
                    ];
                    out.push((labels, counters.get(*c) as f64));
                }
            }
            Some(out)
        }),
    },
    Spec {
        name: "tcpscope_build_info",
        help: "Always 1; the labels describe the running build",
        kind: MetricType::GAUGE,
        source: Source::Values(|_| {
            let labels = vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("revision", crate::selfstats::REVISION.to_owned()),
                ("kernel", crate::selfstats::kernel_release()),
                ("layout", tcp_common::LAYOUT_VERSION.to_string()),
            ];
            Some(vec![(labels, 1.0)])
        }),
    },
];

impl Exposition<'_> {
    /// Every metric family, in exposition order (see [`FAMILIES`]).
    #[must_use]
    pub fn families(&self) -> Vec<MetricFamily> {
        let tracker = FAMILIES.iter().filter_map(|spec| {
            let mut family = Family::new(spec.name, spec.help, spec.kind);
            match spec.source {
                Source::Values(samples) => {
                    for (labels, v) in samples(self)? {
                        family = family.value(&borrowed(&labels), v);
                    }
                }
                Source::Histograms(histograms) => {
                    for (labels, h) in histograms(self) {
                        family = family.histogram(&borrowed(&labels), &h);
                    }
                }
            }
            Some(family.done())
        });
        tracker.chain(self.agent.iter().cloned()).collect()
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

/// Labels as the family builder takes them.
fn borrowed(labels: &Labels) -> Vec<(&str, &str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

impl Report {
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
            agent: Vec::new(),
            events_lost: None,
        }
        .text()
    }
}
