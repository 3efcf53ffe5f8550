//! Expiry, in the kernel: the agent runs the reaper program through `BPF_PROG_TEST_RUN` once a
//! second with the timeouts as the "packet"; it walks both flow tables with
//! `bpf_for_each_map_elem` and removes what has expired.
//!
//! Why in the kernel rather than a userspace sweep of lookups and deletes: a record must leave
//! the gauges exactly when it leaves its table, and a segment may update it between a
//! userspace read and delete. Here the expiry decision and the DEAD mark are taken under the
//! record's lock, the endpoints are subtracted from the gauges with the states they had at that
//! moment, and any segment that finds the record afterwards changes nothing (see the tracker).
//! It is also cheaper: one syscall a second instead of two per record.
//!
//! Why not `bpf_timer` per record: 16 more bytes per flow and a timer re-armed on state changes,
//! for a precision (seconds) the sweep already gives.

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_for_each_map_elem, bpf_ktime_get_ns, bpf_map_lookup_elem},
    programs::XdpContext,
};
use tcp_common::{
    counters::event_slots,
    flow::{FlowEntry, flow_flags},
    metrics::{NO_SLOT, ReapRequest, endpoint_slot, table},
    track::{Timeouts, expired, finished},
};

use crate::{
    maps::{FLOWS, HALF_OPEN},
    tracker::{REAPER, metrics},
};

/// How long a record that a packet program marked DEAD, or created and not yet touched, is
/// left to that program (which deletes or fills it within microseconds) before the reaper
/// takes it as abandoned. Deleting it earlier could let a new record be created under its key
/// and then be deleted by the marking program's delete-by-key.
const GRACE_NS: u64 = 10_000_000_000;

/// 1 on kernels before 6.2, set at load time. Their verifier knows a held lock only by the id
/// of the pointer it was taken through, and the record pointer a map walk hands its callback
/// has none (the lock would count as never taken). There the callback takes the lock through a
/// lookup of the record's key instead: one more hash lookup per record visited. Read-only
/// data, so the verifier sees a constant and checks only the branch this kernel takes.
#[unsafe(no_mangle)]
pub static LOCK_BY_LOOKUP: Global<u8> = Global::new(0);

/// State shared with the per-record callback (on the reaper's stack).
#[repr(C)]
struct Walk {
    timeouts: Timeouts,
    now: u64,
    table: u64,
    visited: u64,
    reaped: u64,
}

/// Called for every record of a table.
#[inline(never)]
extern "C" fn visit(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = ctx.cast::<Walk>();
    let entry = if LOCK_BY_LOOKUP.load() == 0 {
        value.cast::<FlowEntry>()
    } else {
        // SAFETY: `map` and `key` are the walked map and the current record's key, as the
        // kernel passes them.
        let found = unsafe { bpf_map_lookup_elem(map, key) };
        if found.is_null() {
            return 0;
        }
        found.cast::<FlowEntry>()
    };
    // SAFETY: the kernel passes the caller's context and a live record of the walked table.
    let (was_dead, slots, failed_handshake, evicted, table) = unsafe {
        (*walk).visited += 1;
        let table = (*walk).table as usize;
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let flow = &mut (*entry).flow;
        let now = (*walk).now;
        let was_dead = flow.flags & flow_flags::DEAD != 0;
        let fresh = flow.flags == 0 || was_dead;
        let keep = if fresh {
            now.saturating_sub(flow.last_ns) < GRACE_NS
        } else {
            !expired(flow, now, &(*walk).timeouts)
        };
        if keep {
            aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
            return 0;
        }
        let slots = [endpoint_slot(flow, 0), endpoint_slot(flow, 1)];
        let failed_handshake =
            flow.is_half_open() && flow.syn_ns != 0 && flow.flags & flow_flags::HANDSHAKE_DONE == 0;
        let evicted = !finished(flow);
        flow.flags |= flow_flags::DEAD;
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
        (was_dead, slots, failed_handshake, evicted, table)
    };
    let Some(m) = metrics(REAPER) else {
        return 0;
    };
    if !was_dead {
        // Accounted once, when marked; a record already DEAD was accounted by whoever
        // marked it and is only being removed here.
        m.move_endpoint(slots[0], NO_SLOT);
        m.move_endpoint(slots[1], NO_SLOT);
        if failed_handshake {
            m.events.bump(event_slots::HANDSHAKES_TIMED_OUT);
        }
        if evicted && let Some(e) = m.evictions.get_mut(table) {
            *e = e.wrapping_add(1);
        }
    }
    // SAFETY: `map` and `key` are the walked map and the current record's key, as the kernel
    // passes them; deleting the current element during the walk is allowed for hash maps.
    let gone = unsafe { aya_ebpf::helpers::bpf_map_delete_elem(map, key) } == 0;
    if gone {
        m.removed(table);
        // SAFETY: as above.
        unsafe { (*walk).reaped += 1 };
    }
    0
}

/// Walks one table.
#[inline(always)]
fn walk_table(map: *mut c_void, walk: &mut Walk, t: usize) {
    walk.table = t as u64;
    walk.visited = 0;
    walk.reaped = 0;
    // SAFETY: `map` is one of this object's hash maps, `visit` has the callback signature the
    // helper expects, and `walk` outlives the call.
    unsafe {
        bpf_for_each_map_elem(
            map,
            visit as *mut c_void,
            core::ptr::from_mut(walk).cast(),
            0,
        );
    }
}

/// The reaper program's body. Answers in place of the request (visited and reaped counts).
#[inline(always)]
pub fn reap(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + core::mem::size_of::<ReapRequest>() > end {
        return xdp_action::XDP_ABORTED;
    }
    let req = start as *mut ReapRequest;
    // SAFETY: bounds checked above; the "packet" is the agent's request.
    let timeouts = Timeouts::from_array(unsafe { &(*req).timeouts });
    let mut walk = Walk {
        timeouts,
        // SAFETY: no preconditions.
        now: unsafe { bpf_ktime_get_ns() },
        table: 0,
        visited: 0,
        reaped: 0,
    };
    let tables: [(*mut c_void, usize); 2] = [
        (
            core::ptr::from_ref(&FLOWS).cast_mut().cast(),
            table::ESTABLISHED,
        ),
        (
            core::ptr::from_ref(&HALF_OPEN).cast_mut().cast(),
            table::HALF_OPEN,
        ),
    ];
    for (map, t) in tables {
        walk_table(map, &mut walk, t);
        // SAFETY: bounds checked above; `t` is 0 or 1.
        unsafe {
            if let Some(v) = (*req).visited.get_mut(t) {
                *v = walk.visited;
            }
            if let Some(r) = (*req).reaped.get_mut(t) {
                *r = walk.reaped;
            }
        }
    }
    xdp_action::XDP_PASS
}
