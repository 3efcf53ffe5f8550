//! The slow path: running the shared state machine on the flow tables, and keeping the
//! metrics exact. Every segment the fast path (see `fast`) does not take comes here.
//!
//! Three tables: an established table per address family (compact records, see
//! [`Established`]) and one half-open table (full records). A segment's record is looked up
//! in the established table of its family first, then in the half-open one:
//! - **Established record**: under its `bpf_spin_lock` it is unpacked into this CPU's scratch
//!   record, the pure, inlined `track` runs on that, and only the fields that changed are
//!   written back (the fast path may be updating the other endpoint's fields meanwhile). A
//!   segment that starts a new handshake on the 4-tuple (TIME-WAIT reuse, a new attempt after a
//!   reset) moves the record to the half-open table, where handshakes are timed: the
//!   established record is marked DEAD and a half-open one inserted.
//! - **Half-open record**: `track` runs on it in place under its lock; one whose handshake
//!   completed is packed and moves to the established table (marked DEAD here, then deleted).
//! - **Neither**: `track` runs on an empty record in this CPU's scratch, and the result is
//!   inserted, finished, into the table it belongs in (nothing at all for a segment that cannot
//!   start a flow): no lock, no second lookup. A handshake in progress goes to the half-open
//!   table, so that a spoofed-SYN flood can only ever fill that one; a connection picked up
//!   mid-stream goes straight to its established table, in host mode only from a segment of
//!   the local side (a spoofer can send ACKs, not make this host's stack answer them).
//!
//! Nothing between lock and unlock calls a function, as the verifier requires (6.1 refuses
//! even `memcpy`): copies there are field by field.
//!
//! Exact gauges: the gauge slots of both endpoints are taken before and after `track` under
//! the lock, and the difference is applied to this CPU's [`Metrics`] after the unlock. A record
//! that leaves its table is first marked DEAD under the same lock; a segment that then finds it
//! changes nothing. So every endpoint is added to the gauges exactly once and removed exactly
//! once.
//!
//! Deleting: half-open records are deleted at once by whoever marks them (the element may be
//! reused at once, hence the key tag checked under the lock). Established records are deleted
//! only by the reaper, a grace period after they were marked DEAD: the fast path holds no lock,
//! and the grace period is what guarantees that no CPU still writes into an element that has
//! been reused (README: Per-packet path).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use tcp_common::{
    event_counters::event_slots,
    flow::{Established, EstablishedEntry, Flow, FlowKey, FlowKey4, HalfOpenEntry, flow_flags},
    gauges::{NO_SLOT, endpoint_slot, established_slot},
    histogram::handshake_phases,
    metrics::{Metrics, PortStats, table},
    parse::{Segment, tcp_flags},
    state::{Side, events as ev},
    track::track,
    transition::cause,
};

use crate::{
    maps::{FLOWS4, FLOWS6, HALF_OPEN, METRICS, SCRATCH, SYN_PORTS, Scratch},
    transitions,
};

/// What to do with a record after the update (set under the lock, in the scratch slot).
const KEEP: u32 = 0;
/// A half-open record completed its handshake: into the established table.
const PROMOTE: u32 = 2;
/// The record was already on its way out (or its element holds another flow now): nothing
/// changed.
const LOST: u32 = 3;
/// An established record starts a new handshake: into the half-open table.
const DEMOTE: u32 = 4;
/// The established record is DEAD: the connection, if any, is in the half-open table.
const BLOCKED: u32 = 5;

/// This CPU's metrics for `writer` ([`PACKETS`] or [`REAPER`]).
///
/// Two writers, two copies: the packet programs run with bottom halves disabled and never
/// interrupt one another, but the reaper runs in a syscall with bottom halves enabled, so a
/// packet may interrupt it on its own CPU in the middle of an update; with copies of their own
/// neither loses the other's updates. The agent sums both.
#[inline(always)]
pub fn metrics(writer: u32) -> Option<&'static mut Metrics> {
    // SAFETY: this CPU's copy of a per-CPU array entry that only `writer` updates.
    METRICS.get_ptr_mut(writer).map(|c| unsafe { &mut *c })
}

pub use tcp_common::object::writer::{PACKETS, REAPER};

/// A port's first tallies (in read-only data: a zero value built on the stack costs a
/// `memset` call, and a frame of its own on the call chain).
pub static NO_PORT_STATS: PortStats = PortStats {
    syn: 0,
    completed: 0,
    unanswered: 0,
    overflows: 0,
};

/// Adds to this CPU's tallies of listening port `port`.
#[inline(always)]
fn count_port(port: u16, syn: u64, completed: u64, overflows: u64) {
    let key = u32::from(port);
    let stats = match SYN_PORTS.get_ptr_mut(&key) {
        Some(s) => s,
        None => {
            // NOEXIST: another CPU's (or, on this one, the reaper's) creation in between keeps
            // its counts.
            let _ = SYN_PORTS.insert(&key, &NO_PORT_STATS, u64::from(BPF_NOEXIST));
            match SYN_PORTS.get_ptr_mut(&key) {
                Some(s) => s,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value of a per-CPU hash entry found just now (RCU keeps it valid
    // while the program runs); only this CPU writes it.
    unsafe {
        (*stats).syn = (*stats).syn.wrapping_add(syn);
        (*stats).completed = (*stats).completed.wrapping_add(completed);
        (*stats).overflows = (*stats).overflows.wrapping_add(overflows);
    }
}

/// CLOCK_MONOTONIC in ns: handshake phases are timed with it.
#[inline(always)]
fn precise_now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// CLOCK_MONOTONIC as of the last tick: enough for expiry.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: no preconditions (5.11+).
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Copies a full record word by word with volatile accesses. A plain assignment may be
/// compiled into a call to `memcpy`, and older kernels (6.1 among them) refuse any function
/// call while a spin lock is held.
///
/// # Safety
/// Both pointers are valid, aligned and do not overlap.
#[inline(always)]
unsafe fn copy_flow(dst: *mut Flow, src: *const Flow) {
    const WORDS: usize = core::mem::size_of::<Flow>() / 8;
    const _: () = assert!(core::mem::size_of::<Flow>() % 8 == 0);
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    let mut i = 0;
    while i < WORDS {
        // SAFETY: within both records (`Flow` is a whole number of 8-aligned words).
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// The record a new connection starts from, in read-only data: copied word by word (a plain
/// assignment becomes a `memset` call and stores).
static EMPTY: Flow = Flow::EMPTY;

/// Whether the segment came over IPv6. Read from the parser's map slot as a plain byte at each
/// use: the compiler then cannot drop a bounds check on the bool's assumed range where it
/// becomes an index (the verifier does not share that assumption), and the verifier's paths
/// for the two families, split at the established table's lookup, converge after it instead
/// of being checked twice through everything that follows.
#[inline(always)]
fn is_ipv6(seg: &Segment) -> bool {
    // SAFETY: `bool` has the size of a byte; reading it as one is always valid.
    unsafe { core::ptr::read_volatile((&raw const seg.ipv6).cast::<u8>()) != 0 }
}

/// The established-table record of a segment's connection, if its table holds one.
#[inline(always)]
fn established_lookup(seg: &Segment, ipv6: bool, key: &FlowKey) -> Option<*mut EstablishedEntry> {
    if ipv6 {
        FLOWS6.get_ptr_mut(key)
    } else {
        FLOWS4.get_ptr_mut(&FlowKey4::of(seg).0)
    }
}

/// Inserts `entry` into the established table of the segment's family (only if absent);
/// the error is the kernel's (negative errno).
#[inline(always)]
fn established_insert(
    seg: &Segment,
    ipv6: bool,
    key: &FlowKey,
    entry: &EstablishedEntry,
) -> Result<(), i32> {
    let flags = u64::from(BPF_NOEXIST);
    if ipv6 {
        FLOWS6.insert(key, entry, flags)
    } else {
        FLOWS4.insert(&FlowKey4::of(seg).0, entry, flags)
    }
}

/// Writes the `tcpscope events` record of the segment [`track_segment`] just tracked, from
/// this CPU's scratch slot (the key, the gauge slots before and after, the events, the
/// sender, the cause), `flags` being the segment's. Called by the slow program after
/// `track_segment` returned true, not from inside it: the 512-byte stack limit counts every
/// frame of a call chain (on 6.1 each rounded up to 32 bytes), and the tracker's frame is the
/// largest.
#[inline(never)]
pub fn emit_segment(flags: u8) {
    let (Some(m), Some(out)) = (metrics(PACKETS), SCRATCH.get_ptr(0)) else {
        return;
    };
    // SAFETY: fields of this CPU's scratch slot, which `track_segment` filled.
    unsafe {
        use core::ptr::read_volatile;
        let slots = u32::from_le_bytes(read_volatile(&raw const (*out).slots));
        let events = read_volatile(&raw const (*out).events);
        let dir = read_volatile(&raw const (*out).dir);
        let why = read_volatile(&raw const (*out).cause);
        let why = if why == 0 { cause::SEGMENT } else { why as u8 };
        // `out.key` is the segment's wide key.
        transitions::emit(
            m,
            (&raw const (*out).key).cast(),
            slots,
            transitions::info(why, flags, dir),
            events,
        );
    }
}

/// Event slots of SYNs and SYN-ACKs (slot `n` counts event bit `n`).
const SYN_SLOT: usize = ev::SYN.trailing_zeros() as usize;
const SYN_ACK_SLOT: usize = ev::SYN_ACK.trailing_zeros() as usize;

/// `-EEXIST`: another CPU inserted the same key first.
const EEXIST: i32 = -17;

/// Tracks one parsed TCP segment sent by an endpoint on `side`; `absent`: the hot path found
/// no record of the connection in its established table just now (not looked up again). A
/// BPF-to-BPF call of its own, so that the parser's frame and the tracker's are separate.
/// True when a `tcpscope events` record is due: the caller then calls [`emit_segment`].
#[inline(never)]
pub fn track_segment(seg: &Segment, side: Side, absent: bool) -> bool {
    let Some(m) = metrics(PACKETS) else {
        return false;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // The SYN-flood rule watches listening ports of this host (segments arriving from the
    // remote side) or, in mirror mode, every port. Counted before any table insert, so that
    // a full half-open table cannot hide a flood.
    let towards_listener = side != Side::Local;
    let syn = seg.flags & tcp_flags::SYN != 0;
    if towards_listener && seg.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
        count_port(seg.dport, 1, 0, 0);
    }
    // SYNs and SYN-ACKs are counted here, on arrival, from the flags, not from the state
    // machine's events (which `finish` leaves out): so every one counts in
    // `tcpscope_syn_total` / `tcpscope_synack_total` whether its record could be stored, was
    // lost to a race, or found its table full. The state machine reports `ev::SYN` /
    // `ev::SYN_ACK` for exactly these segments (replay counts the events; the mirror-mode
    // test compares both on every capture).
    if seg.flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) == tcp_flags::SYN {
        m.events.bump(if seg.flags & tcp_flags::ACK == 0 {
            SYN_SLOT
        } else {
            SYN_ACK_SLOT
        });
    }
    // The key lives in the scratch slot, off the stack (the verifier limits a call chain's
    // stack to 512 bytes, and 6.1 rounds every frame up to 32).
    // SAFETY: this CPU's scratch slot.
    let key = unsafe { &mut (*scratch).key };
    let dir = {
        let (k, dir) = FlowKey::of(seg);
        *key = k;
        dir
    };
    let key: &FlowKey = key;
    // 1. The established table of the family.
    // SAFETY: this CPU's scratch slot.
    unsafe {
        core::ptr::write_volatile(&raw mut (*scratch).blocked, 0);
        core::ptr::write_volatile(&raw mut (*scratch).dir, dir as u32);
        core::ptr::write_volatile(&raw mut (*scratch).cause, 0);
    }
    let established = if absent {
        None
    } else {
        established_lookup(seg, is_ipv6(seg), key)
    };
    if let Some(entry) = established {
        // Past the handshake a record's times only drive expiry (seconds): the coarse clock
        // (one tick behind at most) costs a fraction of the precise one. A SYN may start a
        // new handshake on the record (TIME-WAIT reuse), which is timed.
        let now = if syn { precise_now() } else { coarse_now() };
        // SAFETY: `entry` comes from a successful lookup and stays valid while the program
        // runs (RCU; established elements are reused only a grace period after their DEAD
        // mark); the scratch slot is this CPU's.
        unsafe { update_established(entry, seg, dir, side, now, &mut *scratch) };
        // SAFETY: this CPU's scratch slot, filled above.
        let action = unsafe { core::ptr::read_volatile(&raw const (*scratch).action) };
        if action == BLOCKED {
            // SAFETY: this CPU's scratch slot.
            unsafe { core::ptr::write_volatile(&raw mut (*scratch).blocked, 1) };
        } else {
            if action == DEMOTE {
                m.removed(table::established(is_ipv6(seg)));
                // SAFETY: this CPU's scratch slot, filled under the lock.
                let entry = unsafe { &mut (*scratch).entry };
                entry.lock = Default::default();
                entry.tag = key.tag();
                if HALF_OPEN.insert(key, entry, u64::from(BPF_NOEXIST)).is_ok() {
                    m.inserted(table::HALF_OPEN);
                } else {
                    // The new attempt is not tracked (as a SYN that finds the half-open table
                    // full): the old endpoints leave the gauges, no new ones join, and the
                    // segment's events are not counted (its SYN was, on arrival).
                    m.events.bump(event_slots::HALF_OPEN_INSERT_FAILED);
                    m.events.bump(event_slots::UNTRACKED_SEGMENTS);
                    // SAFETY: this CPU's scratch slot.
                    unsafe {
                        (*scratch).slots[2] = NO_SLOT;
                        (*scratch).slots[3] = NO_SLOT;
                        (*scratch).events = 0;
                        (*scratch).cause = u32::from(cause::TABLE_FULL);
                    }
                }
            }
            // SAFETY: this CPU's scratch slot.
            return finish(m, unsafe { &*scratch }, seg, side, now);
        }
    }
    let now = precise_now();
    // 2. The half-open table. A SYN (no ACK) usually opens a new connection: its record is
    // built and inserted at once, and looked up only when the insert finds one already there
    // (a retransmission). Other segments usually belong to a record: looked up first.
    let opening = seg.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::FIN | tcp_flags::RST)
        == tcp_flags::SYN;
    let mut entry = if opening {
        None
    } else {
        HALF_OPEN.get_ptr_mut(key)
    };
    if entry.is_none() {
        // SAFETY: this CPU's scratch slot; nothing else uses it while this program runs.
        let created = unsafe { create(m, &mut *scratch, seg, dir, side, now, key) };
        match created {
            Created::Done => {
                // SAFETY: this CPU's scratch slot.
                return finish(m, unsafe { &*scratch }, seg, side, now);
            }
            Created::Refused => return false,
            Created::Exists if opening => entry = HALF_OPEN.get_ptr_mut(key),
            Created::Exists => {
                // Another CPU created the record just now, from a segment of its own; this
                // one is counted as a lost race and changes nothing.
                m.events.bump(event_slots::LOST_RACE);
                return false;
            }
        }
    }
    let Some(entry) = entry else {
        // Created and gone again since (a lost race).
        m.events.bump(event_slots::LOST_RACE);
        return false;
    };
    // SAFETY: as above (a reused half-open element is told apart by its tag).
    unsafe { update_half_open(entry, seg, dir, side, now, key.tag(), &mut *scratch) };
    // SAFETY: this CPU's scratch slot, filled above.
    let action = unsafe { core::ptr::read_volatile(&raw const (*scratch).action) };
    if action == PROMOTE {
        // SAFETY: this CPU's scratch slot, packed under the lock.
        let est = unsafe { &mut (*scratch).established };
        est.lock = Default::default();
        if established_insert(seg, is_ipv6(seg), key, est).is_ok() {
            m.inserted(table::established(is_ipv6(seg)));
            m.events.bump(event_slots::PROMOTIONS);
        } else {
            // The connection is lost to the tracker: so are its endpoints.
            m.events
                .bump(event_slots::flows_insert_failed(is_ipv6(seg)));
            // SAFETY: this CPU's scratch slot.
            unsafe {
                (*scratch).slots[2] = NO_SLOT;
                (*scratch).slots[3] = NO_SLOT;
                (*scratch).cause = u32::from(cause::TABLE_FULL);
            }
        }
        if HALF_OPEN.remove(key).is_ok() {
            m.removed(table::HALF_OPEN);
        }
    }
    // SAFETY: this CPU's scratch slot.
    finish(m, unsafe { &*scratch }, seg, side, now)
}

/// What [`create`] did.
enum Created {
    /// Stored (or nothing to store): only [`finish`] is left.
    Done,
    /// Not stored, its table full (counted): nothing is left.
    Refused,
    /// A record of the connection is already in the table it belongs in.
    Exists,
}

/// A new record: the state machine runs on an empty record in the scratch slot, and the result
/// is inserted, finished, into the table it belongs in (nothing at all for a segment that
/// cannot start a flow). No lock: nobody else can see the record before the insert.
///
/// # Safety
/// `scratch` is this CPU's slot.
#[inline(always)]
unsafe fn create(
    m: &mut Metrics,
    scratch: &mut Scratch,
    seg: &Segment,
    dir: usize,
    side: Side,
    now: u64,
    key: &FlowKey,
) -> Created {
    if side == Side::Remote
        && seg.flags & (tcp_flags::SYN | tcp_flags::RST | tcp_flags::ACK) == tcp_flags::ACK
    {
        // A connection picked up mid-stream (an ACK-bearing segment with no record) from a
        // remote segment waits for a segment of the local side: anyone can send an ACK from
        // any address, but only a live connection makes this host's stack answer with
        // anything but a RST (and a lone RST starts nothing). So a spoofed-ACK flood cannot
        // fill the established tables, and a connection whose handshake found the half-open
        // table full (a SYN flood) is tracked from its first local segment (README:
        // Reliability). Decided on the flags alone, before the state machine runs, which
        // would pick the connection up from exactly these segments.
        scratch.events = 0;
        scratch.action = KEEP;
        scratch.slots = [NO_SLOT; 4];
        return Created::Done;
    }
    // SAFETY: a field of this CPU's scratch slot, and a constant.
    unsafe { copy_flow(&raw mut scratch.work, &raw const EMPTY) };
    let events = track(&mut scratch.work, seg, dir, side, now);
    scratch.events = events;
    scratch.action = KEEP;
    scratch.times = [scratch.work.syn_ns, scratch.work.synack_ns];
    if events & ev::UNTRACKED != 0 {
        // Nothing to store (a lone RST or FIN, invalid flags): only the events count.
        scratch.slots = [NO_SLOT; 4];
        return Created::Done;
    }
    scratch.slots = [
        NO_SLOT,
        NO_SLOT,
        endpoint_slot(&scratch.work, 0),
        endpoint_slot(&scratch.work, 1),
    ];
    let stored = if scratch.work.is_half_open() {
        scratch.entry.lock = Default::default();
        scratch.entry.tag = key.tag();
        // SAFETY: two distinct fields of this CPU's scratch slot.
        unsafe { copy_flow(&raw mut scratch.entry.flow, &raw const scratch.work) };
        HALF_OPEN
            .insert(key, &scratch.entry, u64::from(BPF_NOEXIST))
            .map(|()| table::HALF_OPEN)
            .map_err(|e| (e, event_slots::HALF_OPEN_INSERT_FAILED))
    } else {
        scratch.established.lock = Default::default();
        scratch.established.rec.pack_from(&scratch.work);
        established_insert(seg, is_ipv6(seg), key, &scratch.established)
            .map(|()| table::established(is_ipv6(seg)))
            .map_err(|e| (e, event_slots::flows_insert_failed(is_ipv6(seg))))
    };
    match stored {
        Ok(t) => {
            m.inserted(t);
            Created::Done
        }
        Err((EEXIST, _)) => Created::Exists,
        Err((_, full)) => {
            m.events.bump(full);
            m.events.bump(event_slots::UNTRACKED_SEGMENTS);
            Created::Refused
        }
    }
}

/// Runs the state machine on an established record under its lock; leaves the action, slots,
/// events and (for [`DEMOTE`]) the new half-open record in `out`.
///
/// # Safety
/// `entry` points to a live element of an established table.
#[inline(always)]
unsafe fn update_established(
    entry: *mut EstablishedEntry,
    seg: &Segment,
    dir: usize,
    side: Side,
    now: u64,
    out: &mut Scratch,
) {
    // SAFETY: `entry` is live (caller); the lock serializes every writer of its record but the
    // fast path, whose fields `apply` leaves alone unless this segment changed them; `track`
    // is inlined pure code; the scratch slot is this CPU's, written with plain stores
    // (allowed under the lock).
    unsafe {
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let rec = &raw mut (*entry).rec;
        let before = Established::read(rec);
        if before.flags & flow_flags::DEAD != 0 {
            out.action = BLOCKED;
        } else {
            before.unpack_into(&mut out.work, seg, dir, now);
            out.slots[0] = established_slot(&before, 0);
            out.slots[1] = established_slot(&before, 1);
            let events = track(&mut out.work, seg, dir, side, now);
            let work = &out.work;
            out.slots[2] = endpoint_slot(work, 0);
            out.slots[3] = endpoint_slot(work, 1);
            out.events = events;
            out.times = [work.syn_ns, work.synack_ns];
            if work.is_half_open() {
                // A new handshake: it is timed in the half-open table.
                copy_flow(&raw mut out.entry.flow, &raw const out.work);
                Established::mark_dead(rec, now);
                out.action = DEMOTE;
            } else {
                out.established.rec.pack_from(work);
                Established::apply(rec, &before, &out.established.rec);
                out.action = KEEP;
            }
        }
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
    }
}

/// Runs the state machine on a half-open record in place under its lock; leaves the action,
/// slots, events and (for [`PROMOTE`]) the packed record in `out`. `out.blocked`: the
/// established table still holds a DEAD record of this connection, so a completed handshake
/// stays here until the reaper has deleted that one.
///
/// # Safety
/// `entry` points to a live element of the half-open table.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, all of them needed"
)]
#[inline(always)]
unsafe fn update_half_open(
    entry: *mut HalfOpenEntry,
    seg: &Segment,
    dir: usize,
    side: Side,
    now: u64,
    tag: u32,
    out: &mut Scratch,
) {
    // SAFETY: `entry` is live (caller); the lock serializes every writer of its record; `track`
    // is inlined pure code; the scratch slot is this CPU's.
    unsafe {
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let flow = &mut (*entry).flow;
        // DEAD: on its way out of the table. Another tag: the element was deleted and its
        // memory reused for another flow since the lookup.
        if flow.flags & flow_flags::DEAD != 0 || (*entry).tag != tag {
            out.action = LOST;
        } else {
            out.slots[0] = endpoint_slot(flow, 0);
            out.slots[1] = endpoint_slot(flow, 1);
            let events = track(flow, seg, dir, side, now);
            out.slots[2] = endpoint_slot(flow, 0);
            out.slots[3] = endpoint_slot(flow, 1);
            out.events = events;
            out.times = [flow.syn_ns, flow.synack_ns];
            let blocked = core::ptr::read_volatile(&raw const out.blocked) != 0;
            out.action = if !blocked && !flow.is_half_open() {
                out.established.rec.pack_from(flow);
                flow.flags |= flow_flags::DEAD;
                PROMOTE
            } else {
                KEEP
            };
        }
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
    }
}

/// After the unlock: the gauges, the events, the handshake's phases.
#[inline(always)]
fn finish(m: &mut Metrics, out: &Scratch, seg: &Segment, side: Side, now: u64) -> bool {
    let towards_listener = side != Side::Local;
    // Volatile reads keep the compiler from forwarding the values in registers (see
    // `Scratch`).
    // SAFETY: fields of this CPU's scratch slot.
    let (action, events, slots) = unsafe {
        (
            core::ptr::read_volatile(&raw const out.action),
            core::ptr::read_volatile(&raw const out.events),
            core::ptr::read_volatile(&raw const out.slots),
        )
    };
    if action == LOST {
        m.events.bump(event_slots::LOST_RACE);
        return false;
    }
    m.move_endpoint(slots[0], slots[2]);
    m.move_endpoint(slots[1], slots[3]);
    // `tcpscope events`: only where an endpoint's slot changed, and only with a reader. The
    // record is written by the caller, after `track_segment` has returned (see
    // [`emit_segment`]).
    let due = transitions::changed(u32::from_le_bytes(slots)) && transitions::reader_attached();
    if events & ev::HANDSHAKE_COMPLETED != 0 {
        // SAFETY: as above.
        let times = unsafe { core::ptr::read_volatile(&raw const out.times) };
        if let Some(phases) = handshake_phases(times[0], times[1], now) {
            m.observe_handshake(phases);
        }
        // The completing ACK goes from the client to the listening port.
        if towards_listener {
            count_port(seg.dport, 0, 1, 0);
        }
    }
    // The listener (this segment's sender, a socket of this host or, in mirror mode, any)
    // overflowed its accept queue.
    if events & ev::ACCEPT_QUEUE_OVERFLOW != 0 && side != Side::Remote {
        count_port(seg.sport, 0, 0, 1);
    }
    if events != 0 {
        // SYN and SYN-ACK were counted on arrival (see `track_segment`).
        m.events.add_events(events & !(ev::SYN | ev::SYN_ACK));
        // Keepalive by the side of the prober: the sender of a probe, the receiver of its
        // answer.
        if events & ev::KEEPALIVE_PROBE != 0 {
            m.events.bump(event_slots::KEEPALIVE_PROBES + side as usize);
        }
        if events & ev::KEEPALIVE_ACK != 0 {
            m.events
                .bump(event_slots::KEEPALIVE_ACKS + side.opposite() as usize);
        }
    }
    due
}
