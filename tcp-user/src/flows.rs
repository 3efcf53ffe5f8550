//! Reading the kernel's flow tables (expiry runs in the kernel: see the reaper program).

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use serde::Serialize;
use tcp_common::{
    flow::{EstablishedEntry, Flow, FlowKey, FlowKey4, HalfOpenEntry, flow_flags},
    parse::Segment,
    state::TcpState,
};

use tcp_common::object::{FLOWS4_MAP, FLOWS6_MAP, HALF_OPEN_MAP};

use crate::{error::Error, pins::layout_dir, report::endpoint_string};

/// Nanoseconds of CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Which table a record is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Handshake done or picked up.
    Established,
    /// Handshake in progress.
    HalfOpen,
}

impl Table {
    /// Metric label / display name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Opens a pinned map of this build's layout under `base`.
///
/// # Errors
/// When nothing (or an incompatible layout) is pinned there.
pub fn open_pinned_map(base: &Path, name: &'static str) -> Result<Map, Error> {
    let path = layout_dir(base).join(name);
    if !path.exists() {
        let others: Vec<String> = std::fs::read_dir(base)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        return Err(Error::NotPinned {
            path,
            found: others.join(", "),
        });
    }
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    Ok(Map::HashMap(data))
}

/// One record of the tables, as [`read_tables`] gives it.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// Which table holds it.
    pub table: Table,
    /// Its key.
    pub key: FlowKey,
    /// The record, in full form.
    pub flow: Flow,
    /// The view walk marked its server silent since its SYN-ACK (see
    /// [`tcp_common::flow::view_marks`]).
    pub server_silent: bool,
}

/// The records of an established table, as full records at `now` (a compact record keeps
/// no handshake times and 16 bits of each ISN), DEAD ones left out.
fn established<K: aya::Pod, T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, K, EstablishedEntry>,
    now: u64,
    widen: impl Fn(&K) -> FlowKey,
) -> Result<Vec<Record>, MapError> {
    let mut out = Vec::new();
    for r in map.iter() {
        let (k, e) = r?;
        if !e.rec.has(flow_flags::DEAD) {
            out.push(Record {
                table: Table::Established,
                key: widen(&k),
                flow: e.rec.unpack(&Segment::default(), 0, now),
                server_silent: e.rec.marks & tcp_common::flow::view_marks::SERVER_SILENT != 0,
            });
        }
    }
    Ok(out)
}

/// Every record of the three tables of a loaded or pinned tracker (`maps`: the IPv4 and IPv6
/// established tables and the half-open one), at `now`, tagged with their table, in key
/// order; records on their way out (DEAD: already off the gauges) are left out.
///
/// # Errors
/// When the kernel refuses the reads.
pub fn read_tables(maps: [&Map; 3], now: u64) -> Result<Vec<Record>, Error> {
    let err = |name| move |source| Error::Map { name, source };
    let v4: HashMap<&MapData, FlowKey4, EstablishedEntry> =
        HashMap::try_from(maps[0]).map_err(err(FLOWS4_MAP))?;
    let mut out = established(&v4, now, FlowKey4::widen).map_err(err(FLOWS4_MAP))?;
    let v6: HashMap<&MapData, FlowKey, EstablishedEntry> =
        HashMap::try_from(maps[1]).map_err(err(FLOWS6_MAP))?;
    out.extend(established(&v6, now, |k| *k).map_err(err(FLOWS6_MAP))?);
    let half: HashMap<&MapData, FlowKey, HalfOpenEntry> =
        HashMap::try_from(maps[2]).map_err(err(HALF_OPEN_MAP))?;
    for r in half.iter() {
        let (k, e) = r.map_err(err(HALF_OPEN_MAP))?;
        if !e.flow.has(flow_flags::DEAD) {
            out.push(Record {
                table: Table::HalfOpen,
                key: k,
                flow: e.flow,
                server_silent: false,
            });
        }
    }
    out.sort_by_key(|r| r.key);
    Ok(out)
}

/// [`read_tables`] of the tracker pinned under `base`.
///
/// # Errors
/// When the tables are not pinned under `base` or cannot be read.
pub fn read_pinned(base: &Path) -> Result<Vec<Record>, Error> {
    let v4 = open_pinned_map(base, FLOWS4_MAP)?;
    let v6 = open_pinned_map(base, FLOWS6_MAP)?;
    let half = open_pinned_map(base, HALF_OPEN_MAP)?;
    read_tables([&v4, &v6, &half], monotonic_ns())
}

/// One endpoint of a flow, for display.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// `address:port`.
    pub address: String,
    /// RFC 793 state (`time_wait`, ...).
    pub state: &'static str,
    /// client / server / unknown.
    pub role: &'static str,
    /// local / remote / unknown.
    pub side: &'static str,
    /// Keepalive probes it sent (saturating at 255).
    pub keepalive_probes: u8,
    /// The address alone.
    #[serde(skip)]
    pub ip: std::net::IpAddr,
    /// The port alone.
    #[serde(skip)]
    pub port: u16,
}

/// What `tcpscope flows` keeps: flows with an endpoint that matches every filter given.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// The endpoint's state.
    pub state: Option<TcpState>,
    /// The endpoint's port.
    pub port: Option<u16>,
    /// The endpoint's address.
    pub addr: Option<std::net::IpAddr>,
    /// The endpoint's side (`local`, `remote`).
    pub side: Option<tcp_common::state::Side>,
}

impl Filter {
    /// Whether `e` matches every filter given.
    #[must_use]
    pub fn matches(&self, e: &EndpointView) -> bool {
        self.state.is_none_or(|s| e.state == s.name())
            && self.port.is_none_or(|p| e.port == p)
            && self
                .addr
                .is_none_or(|a| e.ip == a || Some(e.ip) == mapped(a))
            && self.side.is_none_or(|s| e.side == s.name())
    }
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for, and the reverse.
fn mapped(a: std::net::IpAddr) -> Option<std::net::IpAddr> {
    match a {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
        std::net::IpAddr::V4(v4) => Some(std::net::IpAddr::V6(v4.to_ipv6_mapped())),
    }
}

/// One flow, for display.
#[derive(Debug, Serialize)]
pub struct FlowView {
    /// Both endpoints, in key order.
    pub endpoints: [EndpointView; 2],
    /// Which table holds it.
    pub table: Table,
    /// Outer VLAN id (0: none).
    pub vlan: u16,
    /// Milliseconds since its last segment.
    pub idle_ms: u64,
    /// Created mid-stream.
    pub picked_up: bool,
    /// Its server has sent nothing since its SYN-ACK while its client sent data or a FIN, for
    /// two expiry walks in a row: a SYN-cookie handshake into a full accept queue (the server
    /// keeps no state), or a server gone.
    pub server_silent: bool,
}

impl FlowView {
    /// The view of one record at `now`.
    #[must_use]
    pub fn new(record: &Record, now: u64) -> Self {
        let (table, key, flow) = (record.table, &record.key, &record.flow);
        let ep = |i: usize| {
            let a = key.addr[i];
            EndpointView {
                address: endpoint_string(key, i),
                state: flow.ep[i].state().name(),
                role: flow.role(i).name(),
                side: flow.ep[i].side().name(),
                keepalive_probes: flow.ep[i].probes,
                ip: if key.ipv6 != 0 {
                    std::net::IpAddr::from(a)
                } else {
                    std::net::IpAddr::from([a[0], a[1], a[2], a[3]])
                },
                port: key.port[i],
            }
        };
        Self {
            endpoints: [ep(0), ep(1)],
            table,
            vlan: key.vlan,
            idle_ms: now.saturating_sub(flow.last_ns) / 1_000_000,
            picked_up: flow.has(flow_flags::PICKED_UP),
            server_silent: record.server_silent,
        }
    }

    /// Whether either endpoint is in `state`.
    #[must_use]
    pub fn has_state(&self, state: TcpState) -> bool {
        self.endpoints.iter().any(|e| e.state == state.name())
    }

    /// Whether an endpoint matches every filter of `f`.
    #[must_use]
    pub fn matches(&self, f: &Filter) -> bool {
        self.endpoints.iter().any(|e| f.matches(e))
    }
}

/// A state from its metric name (`time_wait`) or its `ss` name (`time-wait`, `TIME-WAIT`).
#[must_use]
pub fn parse_state(s: &str) -> Option<TcpState> {
    let norm = s.to_ascii_lowercase().replace('-', "_");
    TcpState::ALL.iter().copied().find(|st| {
        st.name() == norm
            || (norm == "syn_recv" && *st == TcpState::SynReceived)
            || (norm == "estab" && *st == TcpState::Established)
    })
}
