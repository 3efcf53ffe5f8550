//! Running the shared state machine on the flow tables, and keeping the metrics exact.
//!
//! One code path for every segment: find the record (established table, then half-open;
//! a connection neither holds first gets an empty record in the half-open table), take its
//! `bpf_spin_lock`, run the pure, inlined `track`, release. Nothing between lock and unlock
//! calls a helper, as the verifier requires, and `track` is expanded once, which keeps the
//! verifier's work bounded. Afterwards a record that must not be kept (the segment cannot
//! start a flow) is removed, and one whose handshake completed moves to the established table
//! (copied out under the lock into a per-CPU scratch slot), so a spoofed-SYN flood can only
//! ever fill the half-open table.
//!
//! Exact gauges: under the lock the gauge slots of both endpoints are read before and after
//! `track`, and the difference is applied to this CPU's [`Metrics`] after the unlock. A record
//! that leaves its table (dropped, promoted, or expired by the reaper) is first marked
//! [`DEAD`](flow_flags::DEAD) under the same lock; a segment that then finds it (on another
//! CPU, before the delete) changes nothing and is counted as a lost race. So every endpoint
//! is added to the gauges exactly once and removed exactly once.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use tcp_common::{
    counters::event_slots,
    flow::{Flow, FlowEntry, FlowKey, flow_flags},
    metrics::{Metrics, NO_SLOT, PortStats, endpoint_slot, handshake_phases, table},
    parse::{Segment, tcp_flags},
    state::{Side, events as ev},
    track::track,
};

use crate::maps::{FLOWS, HALF_OPEN, METRICS, SCRATCH, SYN_PORTS};

/// What to do with a record after the update.
const KEEP: u32 = 0;
const DROP: u32 = 1;
const PROMOTE: u32 = 2;
/// The record was already on its way out: nothing changed.
const LOST: u32 = 3;

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

/// [`metrics`] copy of the packet programs.
pub const PACKETS: u32 = 0;
/// [`metrics`] copy of the reaper.
pub const REAPER: u32 = 1;

/// Adds to this CPU's tallies of listening port `port`.
#[inline(never)]
fn count_port(port: u16, syn: u64, completed: u64) {
    let key = u32::from(port);
    let stats = match SYN_PORTS.get_ptr_mut(&key) {
        Some(s) => s,
        None => {
            let _ = SYN_PORTS.insert(&key, &PortStats::default(), 0);
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

/// Copies a record word by word with volatile accesses. A plain assignment may be compiled
/// into a call to `memcpy`, and older kernels (6.1 among them) refuse any function call while a spin
/// lock is held.
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

/// Tracks one parsed TCP segment sent by an endpoint on `side`. A BPF-to-BPF call of its own,
/// so that the parser's frame and the tracker's are separate.
#[inline(never)]
pub fn track_segment(seg: &Segment, side: Side) {
    let Some(m) = metrics(PACKETS) else {
        return;
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // The SYN-flood rule watches listening ports of this host (segments arriving from the
    // remote side) or, in mirror mode, every port. Counted before any table insert, so that
    // a full half-open table cannot hide a flood.
    let towards_listener = side != Side::Local;
    if towards_listener && seg.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
        count_port(seg.dport, 1, 0);
    }
    let (key, dir) = FlowKey::of(seg);
    let tag = key.tag();
    let syn = seg.flags & tcp_flags::SYN != 0;
    let (entry, half_open, now) = match FLOWS.get_ptr_mut(&key) {
        // The hot path. Past the handshake a record's times only drive expiry (seconds): the
        // coarse clock (one tick behind at most) costs a fraction of the precise one. A SYN
        // may start a new handshake on the record (TIME-WAIT reuse), which is timed.
        Some(e) => (e, false, if syn { precise_now() } else { coarse_now() }),
        None => match HALF_OPEN.get_ptr_mut(&key) {
            Some(e) => (e, true, precise_now()),
            None => {
                let now = precise_now();
                // SAFETY: this CPU's scratch slot. Stamped with the time, so that the reaper
                // leaves it to its creator for a while.
                unsafe {
                    (*scratch).entry = FlowEntry::new(Flow::EMPTY, tag);
                    (*scratch).entry.flow.last_ns = now;
                }
                // SAFETY: as above; the map copies the value.
                let stored =
                    HALF_OPEN.insert(&key, unsafe { &(*scratch).entry }, u64::from(BPF_NOEXIST));
                match stored {
                    Ok(()) => m.inserted(table::HALF_OPEN),
                    // EEXIST: another CPU created it just now, and the lookup below finds it.
                    Err(-17) => {}
                    Err(_) => {
                        m.events.bump(event_slots::HALF_OPEN_INSERT_FAILED);
                        m.events.bump(event_slots::UNTRACKED_SEGMENTS);
                        return;
                    }
                }
                match HALF_OPEN.get_ptr_mut(&key) {
                    Some(e) => (e, true, now),
                    None => return,
                }
            }
        },
    };
    // SAFETY: `entry` comes from a successful lookup and stays valid while the program runs
    // (RCU); the lock serializes every writer of its record; `track` is inlined pure code;
    // the scratch slot is this CPU's, written with plain stores (allowed under the lock).
    unsafe {
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let flow = &mut (*entry).flow;
        let out = &mut *scratch;
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
            out.times = [flow.syn_ns, flow.synack_ns, flow.established_ns];
            // A record marked DEAD here is deleted by this CPU just after the unlock (by key:
            // nobody can create another record under the key while this one is in the
            // table); the reaper leaves such records alone (see `reaper`), `last_ns` dates
            // the mark.
            out.action = if events & ev::UNTRACKED != 0 && flow.flags == 0 {
                flow.flags |= flow_flags::DEAD;
                flow.last_ns = now;
                DROP
            } else if half_open && !flow.is_half_open() {
                copy_flow(&mut out.entry.flow, flow);
                flow.flags |= flow_flags::DEAD;
                PROMOTE
            } else {
                KEEP
            };
        }
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
    }
    // SAFETY: this CPU's scratch slot, filled above. Volatile reads keep the compiler from
    // forwarding the values in registers (see `Scratch`).
    let (action, events, slots) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*scratch).action),
            core::ptr::read_volatile(&raw const (*scratch).events),
            core::ptr::read_volatile(&raw const (*scratch).slots),
        )
    };
    if action == LOST {
        m.events.bump(event_slots::LOST_RACE);
        return;
    }
    m.move_endpoint(slots[0], slots[2]);
    m.move_endpoint(slots[1], slots[3]);
    if action == DROP {
        if HALF_OPEN.remove(&key).is_ok() {
            m.removed(table::HALF_OPEN);
        }
    } else if action == PROMOTE {
        // SAFETY: this CPU's scratch slot.
        let copy = unsafe { &mut (*scratch).entry };
        copy.lock = Default::default();
        copy.tag = tag;
        if FLOWS.insert(&key, copy, u64::from(BPF_NOEXIST)).is_ok() {
            m.inserted(table::ESTABLISHED);
            m.events.bump(event_slots::PROMOTIONS);
        } else {
            // The connection is lost to the tracker: so are its endpoints.
            m.events.bump(event_slots::FLOWS_INSERT_FAILED);
            m.move_endpoint(slots[2], NO_SLOT);
            m.move_endpoint(slots[3], NO_SLOT);
        }
        if HALF_OPEN.remove(&key).is_ok() {
            m.removed(table::HALF_OPEN);
        }
    }
    if events & ev::HANDSHAKE_COMPLETED != 0 {
        // SAFETY: as above.
        let times = unsafe { core::ptr::read_volatile(&raw const (*scratch).times) };
        if let Some(phases) = handshake_phases(times[0], times[1], times[2]) {
            m.observe_handshake(phases);
        }
        // The completing ACK goes from the client to the listening port.
        if towards_listener {
            count_port(seg.dport, 0, 1);
        }
    }
    if events != 0 {
        m.events.add_events(events);
    }
}
