//! The maps shared with the agent. Names are at most 15 bytes (the kernel truncates), and the
//! agent knows them from `tcp_common::object`.
//!
//! Table choice: plain hashes, not LRU. A record's `bpf_spin_lock` is only allowed in
//! (non-LRU) hash and array maps, and an LRU would let a flood evict live connections; here
//! a full table refuses new records (counted) and the in-kernel reaper frees expired ones.
//! Half-open records have their own table, so a spoofed-SYN flood can fill only that one.
//! Established records live in a table per address family, so that an IPv4 flow pays for a
//! 16-byte key, not for two IPv6 addresses.

use aya_ebpf::{
    Global,
    btf_maps::HashMap,
    cty::c_void,
    macros::{btf_map, map},
    maps::{Array, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use tcp_common::{
    counters::{HOOKS, HookCounters},
    flow::{EstablishedEntry, Flow, FlowKey, FlowKey4, HalfOpenEntry},
    metrics::{Metrics, PortStats, WalkView, table},
    object,
    parse::Parsed,
    reap::LISTED_SLOTS,
    transition::RING_BYTES,
};

// The tables' default capacities (the agent may set others at load time).
const FLOWS4_CAPACITY: usize = object::DEFAULT_FLOWS_CAPACITY as usize;
const FLOWS6_CAPACITY: usize = object::DEFAULT_FLOWS6_CAPACITY as usize;
const HALF_OPEN_CAPACITY: usize = object::DEFAULT_HALF_OPEN_CAPACITY as usize;

/// Packet counters per hook (key: `Hook` discriminant), one copy per CPU.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<HookCounters> = PerCpuArray::with_max_entries(HOOKS, 0);

/// State-machine events, endpoint gauges, table occupancy and handshake histograms, one copy
/// per CPU: one lookup per segment reaches all of it. Key 0: the packet programs; key 1: the
/// reaper (see `tracker::metrics`).
#[map(name = "METRICS")]
pub static METRICS: PerCpuArray<Metrics> = PerCpuArray::with_max_entries(object::writer::COUNT, 0);

/// Listening ports the SYN-flood rule watches.
pub const SYN_PORTS_CAPACITY: u32 = 1024;

/// SYNs and completed handshakes per listening port (key: port), one copy per CPU; the least
/// recently used port gives way when full, so a port scan cannot grow it.
#[map(name = "SYN_PORTS")]
pub static SYN_PORTS: LruPerCpuHashMap<u32, PortStats> =
    LruPerCpuHashMap::with_max_entries(SYN_PORTS_CAPACITY, 0);

/// Ports of the per-port view (`--ports`): the value at a port is its index among them plus
/// one, 0 for ports not watched. Set by the agent at load; read only by the reaper's walk (an
/// array lookup, which the verifier inlines).
#[map(name = "PORT_INDEX")]
pub static PORT_INDEX: Array<u8> = Array::with_max_entries(65_536, 0);

/// What the reaper's walk finds (see `WalkView`), read by the agent after each walk.
#[map(name = "WALK_VIEW")]
pub static WALK_VIEW: Array<WalkView> = Array::with_max_entries(1, 0);

/// Keys of sparse tables' records, listed by the agent before a walk so that the reaper and
/// the view visit those records by lookup rather than by a walk of every bucket (see
/// [`tcp_common::reap::ReapRequest::listed`]). An IPv4 key fills a slot's first 16 bytes.
#[map(name = "LISTED")]
pub static LISTED: Array<FlowKey> = Array::with_max_entries(LISTED_SLOTS, 0);

/// What the `slot`-th listed key finds in its table now (see [`listed_record`]).
pub enum Listed {
    /// Past the array's end: stop.
    End,
    /// The record is gone since the agent listed its key.
    Gone,
    /// The table, the key and the record: what a walk's callback is handed.
    Record([*mut c_void; 3]),
}

/// The record of the `slot`-th listed key, in table `t` (as in `tcp_common::metrics::table`).
#[inline(always)]
pub fn listed_record(t: usize, slot: u64) -> Listed {
    let Some(key) = u32::try_from(slot)
        .ok()
        .and_then(|slot| LISTED.get_ptr_mut(slot))
    else {
        return Listed::End;
    };
    let map: *mut c_void = match t {
        table::ESTABLISHED_V4 => core::ptr::from_ref(&FLOWS4).cast_mut().cast(),
        table::ESTABLISHED_V6 => core::ptr::from_ref(&FLOWS6).cast_mut().cast(),
        _ => core::ptr::from_ref(&HALF_OPEN).cast_mut().cast(),
    };
    // SAFETY: `map` is that table and `key` a slot of the LISTED array, at least the table's
    // key size (an IPv4 key fills the first 16 bytes).
    let value = unsafe { aya_ebpf::helpers::bpf_map_lookup_elem(map, key.cast()) };
    if value.is_null() {
        Listed::Gone
    } else {
        Listed::Record([map, key.cast(), value])
    }
}

/// IPv4 connections past their handshake (or picked up mid-stream), compact records.
#[btf_map]
pub static FLOWS4: HashMap<FlowKey4, EstablishedEntry, FLOWS4_CAPACITY> = HashMap::new();

/// IPv6 connections past their handshake (or picked up mid-stream), compact records.
#[btf_map]
pub static FLOWS6: HashMap<FlowKey, EstablishedEntry, FLOWS6_CAPACITY> = HashMap::new();

/// Connections of either family whose handshake is in progress, full records.
#[btf_map]
pub static HALF_OPEN: HashMap<FlowKey, HalfOpenEntry, HALF_OPEN_CAPACITY> = HashMap::new();

/// Room for the records one reconciliation may remove (more wait for the next one).
const DOOMED_CAPACITY: usize = object::DOOMED_CAPACITY as usize;

/// IPv4 established records the agent found stale (host mode: their local socket is gone or
/// in another state, per sock_diag; mirror mode: not seen since a restart), with the record's
/// `last` when the agent read it. A walk asked to reconcile removes each one that is unchanged
/// since, under its lock (see the reaper). Filled and emptied by the agent around that walk;
/// not pinned.
#[btf_map]
pub static DOOMED4: HashMap<FlowKey4, u32, DOOMED_CAPACITY> = HashMap::new();

/// The same for the IPv6 established table.
#[btf_map]
pub static DOOMED6: HashMap<FlowKey, u32, DOOMED_CAPACITY> = HashMap::new();

/// State changes for `tcpscope events` (see `transitions`), pinned: the reader is another
/// process. A ring buffer, not a per-CPU perf buffer: one reader sees every CPU's records in
/// the order they were reserved, and a full ring costs the writer one failed reservation
/// (counted), never a wait.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// The pid of the `tcpscope events` process reading [`EVENTS`], 0 for none (pinned; written by
/// the reader, cleared by it on exit or by the agent when it is gone). An array: the verifier
/// inlines the lookup, so a transition checks it with a few instructions and no call.
#[map(name = "EVENTS_READER")]
pub static EVENTS_READER: Array<u32> = Array::with_max_entries(1, 0);

/// 1 in mirror mode (both directions arrive on ingress; sides unknown), set at load time.
#[unsafe(no_mangle)]
pub static MIRROR: Global<u8> = Global::new(0);

/// What the slow path hands from inside a record's lock to the code after it.
#[repr(C)]
pub struct Scratch {
    /// A half-open record on its way into its table (new, or moved out of the established
    /// one).
    pub entry: HalfOpenEntry,
    /// The full record the state machine works on for an established one (unpacked under
    /// the lock), and on its way into the established table on promotion.
    pub work: Flow,
    /// Gauge slots of both endpoints before and after the segment.
    pub slots: [u8; 4],
    /// Event bits of the segment.
    pub events: u32,
    /// What to do with the record.
    pub action: u32,
    /// 1: the established table holds a DEAD record of the connection (a completed handshake
    /// then stays in the half-open table until the reaper has deleted it).
    pub blocked: u32,
    /// SYN and SYN-ACK times of the record when its handshake completed.
    pub times: [u64; 2],
    /// The record being written into an established table.
    pub established: EstablishedEntry,
    /// The segment's flow key (wide: the half-open and IPv6 tables').
    pub key: FlowKey,
    /// The endpoint (0 or 1) that sent the segment.
    pub dir: u32,
    /// A `tcp_common::transition::cause` other than a segment for the endpoints leaving the
    /// gauges (the record could not move to its new table), 0 otherwise.
    pub cause: u32,
}

/// One [`Scratch`] per CPU. Results computed under the lock go through it rather than through
/// registers: read back from map memory they are plain unknown scalars to the verifier, so the
/// many paths through the state machine converge after the unlock instead of each being
/// verified again through everything that follows.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// What the hot path hands the slow path with the tail call.
#[repr(C)]
pub struct Handoff {
    /// The packet, parsed (by the plain parser when `ready` is 1).
    pub parsed: Parsed,
    /// 1: `parsed` holds a plain TCP segment, already counted; 0: the slow path parses and
    /// counts the frame itself.
    pub ready: u8,
    /// 1: the hot path found no record of the connection in its established table (the slow
    /// path does not look again).
    pub absent: u8,
}

/// The parser's result for the packet being handled, one per CPU: kept off the stack, whose
/// 512 bytes the parser's and the tracker's frames already share, and handed from the hot
/// path to the slow path (a tail call runs on the same CPU, with nothing in between).
#[map(name = "PARSED")]
pub static PARSED: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

/// The slow path of the XDP hook (index 0), set by the agent at load. A tail call, so that the
/// verifier checks the slow path once, on its own, rather than once for every way the hot
/// path's branches can reach it; and a tail call returns nothing, which costs less than a
/// call on CPUs with return-stack mitigations.
#[map(name = "SLOW_XDP")]
pub static SLOW_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The slow path of the TC hook (a program array holds programs of one type only).
#[map(name = "SLOW_TC")]
pub static SLOW_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);
