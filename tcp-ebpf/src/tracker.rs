//! Running the shared state machine on the flow tables.
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
//! Tolerated races: a segment of the same flow handled on another CPU while a record is being
//! promoted may land on the half-open copy just before it is removed (one update lost).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use tcp_common::{
    counters::{EventCounters, event_slots},
    flow::{Flow, FlowEntry, FlowKey},
    parse::Segment,
    state::{Side, events as ev},
    track::track,
};

use crate::maps::{EVENTS, FLOWS, HALF_OPEN, SCRATCH};

/// What to do with a record after the update.
const KEEP: u8 = 0;
const DROP: u8 = 1;
const PROMOTE: u8 = 2;

fn counters() -> Option<&'static mut EventCounters> {
    // SAFETY: this CPU's slot of a per-CPU array; BPF programs are not preempted on it.
    EVENTS.get_ptr_mut(0).map(|c| unsafe { &mut *c })
}

/// Tracks one parsed TCP segment sent by an endpoint on `side`. A BPF-to-BPF call of its own,
/// so that the parser's frame and the tracker's are separate.
#[inline(never)]
pub fn track_segment(seg: &Segment, side: Side) {
    let (key, dir) = FlowKey::of(seg);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (entry, half_open) = match FLOWS.get_ptr_mut(&key) {
        Some(e) => (e, false),
        None => match HALF_OPEN.get_ptr_mut(&key) {
            Some(e) => (e, true),
            None => {
                let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
                    return;
                };
                // SAFETY: this CPU's scratch slot.
                unsafe { *scratch = FlowEntry::new(Flow::EMPTY) };
                // SAFETY: as above; the map copies the value.
                let stored = HALF_OPEN.insert(&key, unsafe { &*scratch }, u64::from(BPF_NOEXIST));
                if let (Err(e), Some(c)) = (stored, counters()) {
                    // EEXIST: another CPU created it just now, and the lookup below finds it.
                    if e != -17 {
                        c.bump(event_slots::HALF_OPEN_INSERT_FAILED);
                        c.bump(event_slots::UNTRACKED_SEGMENTS);
                        return;
                    }
                }
                match HALF_OPEN.get_ptr_mut(&key) {
                    Some(e) => (e, true),
                    None => return,
                }
            }
        },
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `entry` comes from a successful lookup and stays valid while the program runs
    // (RCU); the lock serializes every writer of its record; `track` is inlined pure code;
    // the scratch slot is this CPU's, written with plain stores (allowed under the lock).
    let (events, action) = unsafe {
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let flow = &mut (*entry).flow;
        let events = track(flow, seg, dir, side, now);
        let action = if events & ev::UNTRACKED != 0 && flow.flags == 0 {
            DROP
        } else if half_open && !flow.is_half_open() {
            (*scratch).flow = *flow;
            PROMOTE
        } else {
            KEEP
        };
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
        (events, action)
    };
    let mut slot = None;
    if action == DROP {
        let _ = HALF_OPEN.remove(&key);
    } else if action == PROMOTE {
        // SAFETY: this CPU's scratch slot.
        let copy = unsafe { &mut *scratch };
        copy.lock = Default::default();
        copy.pad = 0;
        let moved = FLOWS.insert(&key, copy, u64::from(BPF_NOEXIST)).is_ok();
        let _ = HALF_OPEN.remove(&key);
        slot = Some(if moved {
            event_slots::PROMOTIONS
        } else {
            event_slots::FLOWS_INSERT_FAILED
        });
    }
    if let Some(c) = counters() {
        c.add_events(events);
        if let Some(s) = slot {
            c.bump(s);
        }
    }
}
