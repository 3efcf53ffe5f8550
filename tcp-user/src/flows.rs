//! Reading the kernel's flow tables (expiry runs in the kernel: see the reaper program).

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use serde::Serialize;
use tcp_common::{
    flow::{Flow, FlowEntry, FlowKey, flow_flags},
    state::TcpState,
};

use crate::{
    error::Error,
    loader::{FLOWS_MAP, HALF_OPEN_MAP, layout_dir},
    report::endpoint_string,
};

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

/// Every record of a table.
///
/// # Errors
/// When the kernel refuses the reads.
pub fn entries<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, FlowKey, FlowEntry>,
) -> Result<Vec<(FlowKey, Flow)>, MapError> {
    map.iter().map(|r| r.map(|(k, e)| (k, e.flow))).collect()
}

/// Opens a pinned flow table of this build's layout under `base`.
///
/// # Errors
/// When nothing (or an incompatible layout) is pinned there.
pub fn open_pinned(
    base: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, FlowKey, FlowEntry>, Error> {
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
    HashMap::try_from(Map::HashMap(data)).map_err(|source| Error::Map { name, source })
}

/// Both tables of a pinned tracker, records tagged with their table.
///
/// # Errors
/// When the tables are not pinned under `base` or cannot be read.
pub fn read_pinned(base: &Path) -> Result<Vec<(Table, FlowKey, Flow)>, Error> {
    let mut out = Vec::new();
    for (table, name) in [
        (Table::Established, FLOWS_MAP),
        (Table::HalfOpen, HALF_OPEN_MAP),
    ] {
        let map = open_pinned(base, name)?;
        for (k, f) in entries(&map).map_err(|source| Error::Map { name, source })? {
            // A DEAD record is being removed (its endpoints already left the gauges).
            if !f.has(flow_flags::DEAD) {
                out.push((table, k, f));
            }
        }
    }
    out.sort_by_key(|r| r.1);
    Ok(out)
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
}

impl FlowView {
    /// The view of one record at `now`.
    #[must_use]
    pub fn new(table: Table, key: &FlowKey, flow: &Flow, now: u64) -> Self {
        let ep = |i: usize| EndpointView {
            address: endpoint_string(key, i),
            state: flow.ep[i].state().name(),
            role: flow.role(i).name(),
            side: flow.ep[i].side().name(),
        };
        Self {
            endpoints: [ep(0), ep(1)],
            table,
            vlan: key.vlan,
            idle_ms: now.saturating_sub(flow.last_ns) / 1_000_000,
            picked_up: flow.has(flow_flags::PICKED_UP),
        }
    }

    /// Whether either endpoint is in `state`.
    #[must_use]
    pub fn has_state(&self, state: TcpState) -> bool {
        self.endpoints.iter().any(|e| e.state == state.name())
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
