//! Expiry, in the kernel: the agent runs the reaper program through `BPF_PROG_TEST_RUN` once a
//! second with the timeouts as the "packet"; it walks the three flow tables with
//! `bpf_for_each_map_elem` and removes what has expired. It also turns the fast path's "seen"
//! marks into times, and deletes established records a grace period after their DEAD mark.
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
    bindings::{BPF_NOEXIST, xdp_action},
    cty::c_void,
    helpers::{bpf_for_each_map_elem, bpf_ktime_get_ns, bpf_loop, bpf_map_lookup_elem},
    programs::XdpContext,
};
use tcp_common::{
    event_counters::event_slots,
    flow::{Established, EstablishedEntry, FlowKey, FlowKey4, HalfOpenEntry, flow_flags},
    gauges::{NO_SLOT, endpoint_slot, established_slot},
    metrics::table,
    reap::{LISTED_SLOTS, ReapRequest},
    track::{Age, Timeouts, finished},
    transition::cause,
};

use crate::{
    maps::{DOOMED4, DOOMED6, FLOWS4, FLOWS6, HALF_OPEN, Listed, SYN_PORTS, listed_record},
    tracker::{NO_PORT_STATS, REAPER, metrics},
    transitions,
};

/// Adds `n` unanswered SYNs to this CPU's tallies of port `port`. A plain add: a packet
/// program may interrupt the reaper on this CPU and update the same port's value, but never
/// this field, which only the reaper writes.
#[inline(always)]
fn count_unanswered(port: u16, n: u64) {
    let key = u32::from(port);
    let stats = match SYN_PORTS.get_ptr_mut(&key) {
        Some(s) => s,
        None => {
            // NOEXIST: a packet program that created it in between keeps its counts.
            let _ = SYN_PORTS.insert(&key, &NO_PORT_STATS, u64::from(BPF_NOEXIST));
            match SYN_PORTS.get_ptr_mut(&key) {
                Some(s) => s,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value of a per-CPU hash entry found just now (RCU keeps it valid
    // while the program runs).
    unsafe { (*stats).unanswered = (*stats).unanswered.wrapping_add(n) };
}

/// The ports of a walked record's endpoints, from its key (`table`: the walked table).
///
/// # Safety
/// `key` is the current record's key in a table of that kind.
#[inline(always)]
pub unsafe fn key_ports(key: *const c_void, table: usize) -> [u16; 2] {
    // SAFETY: caller.
    unsafe {
        if table == table::ESTABLISHED_V4 {
            (*key.cast::<FlowKey4>()).port
        } else {
            (*key.cast::<FlowKey>()).port
        }
    }
}

/// How long a half-open record that a packet program marked DEAD is left to that program
/// (which deletes it within microseconds) before the reaper takes it as abandoned. Deleting it
/// earlier could let a new record be created under its key and then be deleted by the marking
/// program's delete-by-key.
const GRACE_NS: u64 = 10_000_000_000;

/// How long an established record stays in its table after its DEAD mark before the reaper
/// deletes it. The fast path writes into records without their lock; the mark turns it away,
/// and this grace period outlasts any packet program that read the record before the mark
/// (they run to completion in microseconds, with preemption off), so none of them can write
/// into the element once it holds another flow. Half a second: deleted at the next walk.
const DEAD_GRACE_NS: u64 = 500_000_000;

/// 1 on kernels before 6.2, set at load time. Their verifier knows a held lock only by the id
/// of the pointer it was taken through, and the record pointer a map walk hands its callback
/// has none (the lock would count as never taken). There the callback takes the lock through a
/// lookup of the record's key instead: one more hash lookup per record visited. Read-only
/// data, so the verifier sees a constant and checks only the branch this kernel takes.
#[unsafe(no_mangle)]
pub static LOCK_BY_LOOKUP: Global<u8> = Global::new(0);

/// State shared with the per-record callbacks (on the reaper's stack).
#[repr(C)]
struct Walk {
    timeouts: Timeouts,
    now: u64,
    table: u64,
    visited: u64,
    reaped: u64,
    /// 1: look the records up in the DOOMED maps (see [`ReapRequest::reconcile`]).
    reconcile: u64,
    /// The first LISTED slot of the table visited by key.
    listed_from: u64,
}

/// The record a callback is handed, locked-through-able on every kernel (see
/// [`LOCK_BY_LOOKUP`]).
#[inline(always)]
fn lockable<T>(map: *mut c_void, key: *mut c_void, value: *mut c_void) -> Option<*mut T> {
    if LOCK_BY_LOOKUP.load() == 0 {
        return Some(value.cast());
    }
    // SAFETY: `map` and `key` are the walked map and the current record's key, as the kernel
    // passes them.
    let found = unsafe { bpf_map_lookup_elem(map, key) };
    (!found.is_null()).then_some(found.cast())
}

/// Deletes the current record of a walk.
#[inline(always)]
fn delete(map: *mut c_void, key: *mut c_void) -> bool {
    // SAFETY: `map` and `key` are the walked map and the current record's key, as the kernel
    // passes them; deleting the current element during the walk is allowed for hash maps.
    unsafe { aya_ebpf::helpers::bpf_map_delete_elem(map, key) == 0 }
}

/// Called for every record of the IPv4 established table.
#[inline(never)]
extern "C" fn visit_established4(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    visit_established::<false>(map, key, value, ctx)
}

/// Called for every record of the IPv6 established table.
#[inline(never)]
extern "C" fn visit_established6(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    visit_established::<true>(map, key, value, ctx)
}

/// A record of an established table (`V6`: the IPv6 one; a callback each, so that the
/// verifier knows which key a DOOMED lookup is handed).
#[inline(always)]
fn visit_established<const V6: bool>(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = ctx.cast::<Walk>();
    let Some(entry) = lockable::<EstablishedEntry>(map, key, value) else {
        return 0;
    };
    // The record's `last` when the agent found it stale (a lookup: no helper call is allowed
    // under the lock), or none.
    // SAFETY: the caller's context and the current record's key.
    let doomed = unsafe { doomed_last::<V6>(key, (*walk).reconcile) };
    // What happened to the record under its lock: 0 kept, 1 marked DEAD now (expired), 4
    // marked DEAD now (stale, reconciliation), 2 DEAD long enough to delete, 3 kept with an
    // endpoint's FIN-WAIT-2 ended (`slots[2..]`: the endpoints' gauge slots after).
    // SAFETY: the kernel passes the caller's context and a live record of the walked table.
    let (fate, slots, evicted, table) = unsafe {
        (*walk).visited += 1;
        let table = (*walk).table as usize;
        let now = (*walk).now;
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let rec = &raw mut (*entry).rec;
        // The fast path's "seen" mark becomes the time of this walk. On a DEAD record the mark
        // is the write of a fast path that passed its state check just before the DEAD mark:
        // the grace period restarts from this walk (left at 0, it would never end).
        if core::ptr::read_volatile(&raw const (*rec).last) == 0 {
            core::ptr::write_volatile(&raw mut (*rec).last, Established::ticks(now));
        }
        // The fast path may write meanwhile: every field is read once, volatile.
        let snap = Established::read(rec);
        let timeouts = &(*walk).timeouts;
        let mut fate = if snap.flags & flow_flags::DEAD != 0 {
            u8::from(now.saturating_sub(snap.last_ns(now)) >= DEAD_GRACE_NS) * 2
        } else {
            let age = Age::of_established(&snap, now);
            if age.expired(timeouts) {
                1
            } else if doomed == Some(snap.last) {
                4
            } else if age.fin_wait2_expired(timeouts) != [false, false] {
                3
            } else {
                0
            }
        };
        let mut slots = [
            established_slot(&snap, 0),
            established_slot(&snap, 1),
            NO_SLOT,
            NO_SLOT,
        ];
        let evicted = !finished([snap.ep_state(0), snap.ep_state(1)]);
        if fate == 1 || fate == 4 {
            Established::mark_dead(rec, now);
        } else if fate == 3 {
            let mut after = snap;
            after.close_fin_wait2(now);
            Established::apply(rec, &snap, &after);
            slots[2] = established_slot(&after, 0);
            slots[3] = established_slot(&after, 1);
            fate = u8::from(slots[0] != slots[2] || slots[1] != slots[3]) * 3;
        } else {
            slots[2] = slots[0];
            slots[3] = slots[1];
        }
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
        (fate, slots, evicted, table)
    };

    let Some(m) = metrics(REAPER) else {
        return 0;
    };
    match fate {
        // Accounted when marked: its endpoints leave the gauges and the table's count; the
        // element itself is deleted a grace period later.
        1 => {
            m.move_endpoint(slots[0], NO_SLOT);
            m.move_endpoint(slots[1], NO_SLOT);
            if evicted && let Some(e) = m.evictions.get_mut(table) {
                *e = e.wrapping_add(1);
            }
            m.removed(table);
        }
        4 => {
            m.move_endpoint(slots[0], NO_SLOT);
            m.move_endpoint(slots[1], NO_SLOT);
            m.events.bump(event_slots::RECONCILED_REMOVED);
            m.removed(table);
        }
        2 => {
            if delete(map, key) {
                // SAFETY: the caller's context.
                unsafe { (*walk).reaped += 1 };
            }
        }
        3 => {
            m.move_endpoint(slots[0], slots[2]);
            m.move_endpoint(slots[1], slots[3]);
        }
        _ => {}
    }
    let (after, why) = match fate {
        1 => ([NO_SLOT; 2], cause::EXPIRED),
        4 => ([NO_SLOT; 2], cause::RECONCILED),
        3 => ([slots[2], slots[3]], cause::EXPIRED),
        _ => return 0,
    };
    let packed = u32::from_le_bytes([slots[0], slots[1], after[0], after[1]]);
    if transitions::changed(packed) && transitions::reader_attached() {
        let compact = if V6 { 0 } else { transitions::COMPACT_KEY };
        // SAFETY: `key` is the current record's key, of the kind `compact` says.
        unsafe {
            transitions::emit(
                m,
                key.cast_const().cast(),
                packed,
                transitions::info(why, 0, 0) | compact,
                0,
            );
        }
    }
    0
}

/// The `last` the agent saw on the record of `key` in an established table (`V6`: the IPv6
/// one) when it found it stale, if it did and `reconcile` asks for it.
///
/// # Safety
/// `key` is the current record's key in a table of that kind.
#[inline(always)]
unsafe fn doomed_last<const V6: bool>(key: *mut c_void, reconcile: u64) -> Option<u32> {
    if reconcile == 0 {
        return None;
    }
    let map: *mut c_void = if V6 {
        core::ptr::from_ref(&DOOMED6).cast_mut().cast()
    } else {
        core::ptr::from_ref(&DOOMED4).cast_mut().cast()
    };
    // SAFETY: `map` is a hash map whose key is the walked table's (caller), `key` a valid key.
    let found = unsafe { bpf_map_lookup_elem(map, key) }.cast::<u32>();
    // SAFETY: a value of that map, valid while the program runs.
    (!found.is_null()).then(|| unsafe { core::ptr::read_volatile(found) })
}

/// Called for every record of the half-open table.
#[inline(never)]
extern "C" fn visit_half_open(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = ctx.cast::<Walk>();
    let Some(entry) = lockable::<HalfOpenEntry>(map, key, value) else {
        return 0;
    };
    // SAFETY: the kernel passes the caller's context and a live record of the walked table.
    let (was_dead, slots, failed_handshake, evicted, unanswered) = unsafe {
        (*walk).visited += 1;
        aya_ebpf::helpers::bpf_spin_lock((&raw mut (*entry).lock).cast());
        let flow = &mut (*entry).flow;
        let now = (*walk).now;
        let was_dead = flow.flags & flow_flags::DEAD != 0;
        let keep = if was_dead {
            now.saturating_sub(flow.last_ns) < GRACE_NS
        } else {
            !Age::of_flow(flow, now).expired(&(*walk).timeouts)
        };
        if keep {
            aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
            return 0;
        }
        let slots = [endpoint_slot(flow, 0), endpoint_slot(flow, 1)];
        let failed_handshake = flow.handshake_failed();
        let evicted = !finished([flow.ep[0].state(), flow.ep[1].state()]);
        // An attempt that never got a SYN-ACK: its SYNs, towards the server's port (a port of
        // this host, or in mirror mode any port: not an attempt this host made).
        let client = usize::from(flow.client & 1);
        let unanswered = if failed_handshake
            && flow.synack_ns == 0
            && flow.client < 2
            && flow.ep[client].side() != tcp_common::state::Side::Local
        {
            let [p0, p1] = key_ports(key, table::HALF_OPEN);
            // A select, not an index: the verifier refuses the pointer arithmetic an index
            // into the key compiles to here.
            let server_port = if client == 0 { p1 } else { p0 };
            Some((server_port, u64::from(flow.syns)))
        } else {
            None
        };
        flow.flags |= flow_flags::DEAD;
        aya_ebpf::helpers::bpf_spin_unlock((&raw mut (*entry).lock).cast());
        (was_dead, slots, failed_handshake, evicted, unanswered)
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
        if let Some((port, syns)) = unanswered
            && syns > 0
        {
            count_unanswered(port, syns);
        }
        if evicted && let Some(e) = m.evictions.get_mut(table::HALF_OPEN) {
            *e = e.wrapping_add(1);
        }
        let packed = u32::from_le_bytes([slots[0], slots[1], NO_SLOT, NO_SLOT]);
        if transitions::changed(packed) && transitions::reader_attached() {
            // SAFETY: `key` is the current record's key, a wide one.
            unsafe {
                transitions::emit(
                    m,
                    key.cast_const().cast(),
                    packed,
                    transitions::info(cause::EXPIRED, 0, 0),
                    0,
                );
            }
        }
    }
    if delete(map, key) {
        m.removed(table::HALF_OPEN);
        // SAFETY: the caller's context.
        unsafe { (*walk).reaped += 1 };
    }
    0
}

/// Walks one table with `visit`.
#[inline(always)]
fn walk_table(map: *mut c_void, visit: *mut c_void, walk: &mut Walk, t: usize) {
    walk.table = t as u64;
    walk.visited = 0;
    walk.reaped = 0;
    // SAFETY: `map` is one of this object's hash maps, `visit` has the callback signature the
    // helper expects for its values, and `walk` outlives the call.
    unsafe {
        bpf_for_each_map_elem(map, visit, core::ptr::from_mut(walk).cast(), 0);
    }
}

/// Visits the record of the `i`-th listed key of table `T` (from [`Walk::listed_from`]), if
/// it is still there: what a walk's callback would do with it. A `bpf_loop` callback; its own
/// function per table, because a BPF program cannot call through a pointer.
#[inline(always)]
fn visit_listed<const T: usize>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the reaper's `Walk`, as `visit_listed_keys` passes it.
    let from = unsafe { (*ctx.cast::<Walk>()).listed_from };
    let visit: extern "C" fn(_, _, _, _) -> i64 = match T {
        table::ESTABLISHED_V4 => visit_established4,
        table::ESTABLISHED_V6 => visit_established6,
        _ => visit_half_open,
    };
    match listed_record(T, from.wrapping_add(i)) {
        Listed::End => 1,
        Listed::Gone => 0,
        Listed::Record([map, key, value]) => {
            visit(map, key, value, ctx);
            0
        }
    }
}

#[inline(never)]
extern "C" fn listed_established4(i: u64, ctx: *mut c_void) -> i64 {
    visit_listed::<{ table::ESTABLISHED_V4 }>(i, ctx)
}

#[inline(never)]
extern "C" fn listed_established6(i: u64, ctx: *mut c_void) -> i64 {
    visit_listed::<{ table::ESTABLISHED_V6 }>(i, ctx)
}

#[inline(never)]
extern "C" fn listed_half_open(i: u64, ctx: *mut c_void) -> i64 {
    visit_listed::<{ table::HALF_OPEN }>(i, ctx)
}

/// Visits table `t`'s records by their keys in LISTED slots `from..from + len`.
#[inline(always)]
fn visit_listed_keys(walk: &mut Walk, t: usize, from: u64, len: u64) {
    walk.table = t as u64;
    walk.visited = 0;
    walk.reaped = 0;
    walk.listed_from = from;
    let callback = match t {
        table::ESTABLISHED_V4 => listed_established4 as *mut c_void,
        table::ESTABLISHED_V6 => listed_established6 as *mut c_void,
        _ => listed_half_open as *mut c_void,
    };
    // At most the array's slots (a longer loop would only find none past its end).
    let n = len.min(u64::from(LISTED_SLOTS)) as u32;
    // SAFETY: `callback` has the signature `bpf_loop` expects and `walk` outlives the call.
    unsafe {
        bpf_loop(n, callback, core::ptr::from_mut(walk).cast(), 0);
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
        // SAFETY: bounds checked above.
        reconcile: unsafe { (*req).reconcile },
        listed_from: 0,
    };
    let tables: [(*mut c_void, *mut c_void, usize); 3] = [
        (
            core::ptr::from_ref(&FLOWS4).cast_mut().cast(),
            visit_established4 as *mut c_void,
            table::ESTABLISHED_V4,
        ),
        (
            core::ptr::from_ref(&FLOWS6).cast_mut().cast(),
            visit_established6 as *mut c_void,
            table::ESTABLISHED_V6,
        ),
        (
            core::ptr::from_ref(&HALF_OPEN).cast_mut().cast(),
            visit_half_open as *mut c_void,
            table::HALF_OPEN,
        ),
    ];
    // SAFETY: bounds checked above.
    let (wanted, listed) = unsafe { ((*req).tables, (*req).listed) };
    for (map, visit, t) in tables {
        if wanted & (1 << t) == 0 {
            walk.visited = 0;
            walk.reaped = 0;
        } else if listed & (1 << t) != 0 {
            // SAFETY: bounds checked above.
            let (from, len) = unsafe {
                (
                    (*req).listed_from.get(t).copied().unwrap_or(0),
                    (*req).listed_len.get(t).copied().unwrap_or(0),
                )
            };
            visit_listed_keys(&mut walk, t, from, len);
        } else {
            walk_table(map, visit, &mut walk, t);
        }
        // SAFETY: bounds checked above; `t` is below table::COUNT.
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
