//! The walk's view: endpoints per watched port, state and side, and the age of the oldest
//! endpoint per state and side (see `WalkView`). The agent runs this program through
//! `BPF_PROG_TEST_RUN` right after each expiry walk (with the view zeroed): it walks the three
//! tables once more, without taking any lock. A program of its own rather than more work in
//! the expiry walk's callbacks: there, every branch of the expiry decision multiplied the paths
//! the verifier had to follow through the view's, past its limit.
//!
//! Records are read field by field with volatile loads, without their lock: the view counts as
//! of the walk (a record that changes during it counts in the state the walk read), which at
//! rest is exact, like the gauges.
//!
//! The walk also marks established records whose server has stayed silent since its SYN-ACK
//! while the client sent (`view_marks`), in a byte of the record that nothing else writes.

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_for_each_map_elem, bpf_ktime_get_ns, bpf_loop},
    programs::XdpContext,
};
use tcp_common::{
    event_counters::event_slots,
    flow::{Established, EstablishedEntry, Flow, HalfOpenEntry, flow_flags, view_marks},
    gauges::{NO_SLOT, endpoint_slot, established_slot},
    metrics::{WalkView, table},
    reap::{LISTED_SLOTS, ReapRequest},
    state::TcpState,
};

use crate::{
    maps::{FLOWS4, FLOWS6, HALF_OPEN, Listed, PORT_INDEX, WALK_VIEW, listed_record},
    reaper::key_ports,
    tracker::{REAPER, metrics},
};

/// What the callbacks share (on the program's stack).
#[repr(C)]
struct Walk {
    now: u64,
    table: u64,
    /// The first LISTED slot of the table visited by key.
    listed_from: u64,
}

/// The walk's view (see [`WalkView`]).
#[inline(always)]
fn view() -> Option<&'static mut WalkView> {
    // SAFETY: the single entry of an array only this program writes, and one runs at a time
    // (the agent's reaper thread).
    WALK_VIEW.get_ptr_mut(0).map(|v| unsafe { &mut *v })
}

/// Adds the endpoints of an established record to the view, read through volatile loads.
///
/// # Safety
/// `rec` points to a live established record; `key` is its key in a table of kind `table`.
#[inline(never)]
unsafe fn view_established(rec: *const Established, key: *const c_void, table: usize, now: u64) {
    // SAFETY: caller.
    let (snap, ports) = unsafe { (Established::read(rec), key_ports(key, table)) };
    let idle = now.saturating_sub(snap.last_ns(now));
    let closed = snap.closed_ns(now);
    let since_close = if closed == 0 {
        idle
    } else {
        now.saturating_sub(closed)
    };
    for (i, port) in ports.into_iter().enumerate() {
        let age = if snap.ep_state(i) == TcpState::TimeWait {
            since_close
        } else {
            idle
        };
        view_endpoint(established_slot(&snap, i), port, age);
    }
}

/// Adds the endpoints of a half-open record that stays to the walk's view (as
/// [`view_established`]).
///
/// # Safety
/// `flow` points to a live half-open record; `key` is its key.
#[inline(never)]
unsafe fn view_half_open(flow: *const Flow, key: *const c_void, now: u64) {
    use core::ptr::read_volatile as get;
    // SAFETY: caller (every field read once, volatile).
    let (ports, copy) = unsafe {
        let mut copy = Flow::EMPTY;
        copy.last_ns = get(&raw const (*flow).last_ns);
        copy.client = get(&raw const (*flow).client);
        for i in 0..2 {
            copy.ep[i].state = get(&raw const (*flow).ep[i].state);
            copy.ep[i].side = get(&raw const (*flow).ep[i].side);
        }
        (key_ports(key, table::HALF_OPEN), copy)
    };
    let idle = now.saturating_sub(copy.last_ns);
    for (i, port) in ports.into_iter().enumerate() {
        view_endpoint(endpoint_slot(&copy, i), port, idle);
    }
}

/// Adds one endpoint (its gauge slot, port and age) to the walk's view.
#[inline(always)]
fn view_endpoint(slot: u8, port: u16, age: u64) {
    if slot == NO_SLOT {
        return;
    }
    let Some(v) = view() else {
        return;
    };
    let watched = PORT_INDEX
        .get(u32::from(port))
        .and_then(|&n| (n != 0).then(|| usize::from(n) - 1));
    v.add(slot, watched, age);
}

/// Called for every record of an established table.
#[inline(never)]
extern "C" fn visit_established(
    _map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = ctx.cast::<Walk>();
    let entry = value.cast::<EstablishedEntry>();
    // SAFETY: the kernel passes the caller's context, and a live record of the walked table
    // with its key.
    unsafe {
        let flags = core::ptr::read_volatile(&raw const (*entry).rec.flags);
        if flags & flow_flags::DEAD == 0 {
            view_established(
                &raw const (*entry).rec,
                key,
                (*walk).table as usize,
                (*walk).now,
            );
            mark_silent_server(&raw mut (*entry).rec);
        }
    }
    0
}

/// Marks a record whose server has stayed silent since its SYN-ACK while its client sent
/// (see `view_marks`): suspect at one walk, silent (and counted, once) at the next. Its own
/// byte, which nothing else writes, with plain stores and no lock.
///
/// # Safety
/// `rec` points to a live established record.
#[inline(never)]
unsafe fn mark_silent_server(rec: *mut Established) {
    use core::ptr::{read_volatile, write_volatile};
    // SAFETY: caller.
    let (snap, marks) = unsafe {
        (
            Established::read(rec),
            read_volatile(&raw const (*rec).marks),
        )
    };
    let next = if !snap.server_silent_now() {
        0
    } else if marks & (view_marks::SILENT_SUSPECT | view_marks::SERVER_SILENT) != 0 {
        if marks & view_marks::SERVER_SILENT == 0
            && let Some(m) = metrics(REAPER)
        {
            m.events.bump(event_slots::SILENT_SERVERS);
        }
        view_marks::SERVER_SILENT
    } else {
        view_marks::SILENT_SUSPECT
    };
    if next != marks {
        // SAFETY: caller.
        unsafe { write_volatile(&raw mut (*rec).marks, next) };
    }
}

/// Called for every record of the half-open table.
#[inline(never)]
extern "C" fn visit_half_open(
    _map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = ctx.cast::<Walk>();
    let entry = value.cast::<HalfOpenEntry>();
    // SAFETY: as above.
    unsafe {
        let flags = core::ptr::read_volatile(&raw const (*entry).flow.flags);
        if flags & flow_flags::DEAD == 0 {
            view_half_open(&raw const (*entry).flow, key, (*walk).now);
        }
    }
    0
}

/// Views the record of the `i`-th listed key of table `T` (from [`Walk::listed_from`]), if
/// it is still there (as in the reaper; a `bpf_loop` callback per table).
#[inline(always)]
fn view_listed<const T: usize>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the view's `Walk`, as `walk` passes it.
    let from = unsafe { (*ctx.cast::<Walk>()).listed_from };
    let visit: extern "C" fn(_, _, _, _) -> i64 = match T {
        table::HALF_OPEN => visit_half_open,
        _ => visit_established,
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
    view_listed::<{ table::ESTABLISHED_V4 }>(i, ctx)
}

#[inline(never)]
extern "C" fn listed_established6(i: u64, ctx: *mut c_void) -> i64 {
    view_listed::<{ table::ESTABLISHED_V6 }>(i, ctx)
}

#[inline(never)]
extern "C" fn listed_half_open(i: u64, ctx: *mut c_void) -> i64 {
    view_listed::<{ table::HALF_OPEN }>(i, ctx)
}

/// The view program's body: walks the tables the "packet" names into the view (the packet
/// is the reaper's [`ReapRequest`]: its `tables`, and its `listed` tables visited by key).
#[inline(always)]
pub fn walk(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + core::mem::size_of::<ReapRequest>() > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let req = start as *const ReapRequest;
    // SAFETY: bounds checked above; the "packet" is the agent's request.
    let (wanted, listed) = unsafe { ((*req).tables, (*req).listed) };
    let mut walk = Walk {
        // SAFETY: no preconditions.
        now: unsafe { bpf_ktime_get_ns() },
        table: 0,
        listed_from: 0,
    };
    let established = visit_established as *mut c_void;
    let tables: [(*mut c_void, *mut c_void, *mut c_void, usize); 3] = [
        (
            core::ptr::from_ref(&FLOWS4).cast_mut().cast(),
            established,
            listed_established4 as *mut c_void,
            table::ESTABLISHED_V4,
        ),
        (
            core::ptr::from_ref(&FLOWS6).cast_mut().cast(),
            established,
            listed_established6 as *mut c_void,
            table::ESTABLISHED_V6,
        ),
        (
            core::ptr::from_ref(&HALF_OPEN).cast_mut().cast(),
            visit_half_open as *mut c_void,
            listed_half_open as *mut c_void,
            table::HALF_OPEN,
        ),
    ];
    for (map, visit, by_key, t) in tables {
        if wanted & (1 << t) == 0 {
            continue;
        }
        walk.table = t as u64;
        if listed & (1 << t) != 0 {
            // SAFETY: bounds checked above.
            let (from, len) = unsafe {
                (
                    (*req).listed_from.get(t).copied().unwrap_or(0),
                    (*req).listed_len.get(t).copied().unwrap_or(0),
                )
            };
            walk.listed_from = from;
            let walk_ptr = core::ptr::from_mut(&mut walk).cast();
            let n = len.min(u64::from(LISTED_SLOTS)) as u32;
            // SAFETY: `by_key` has the signature `bpf_loop` expects, and `walk` outlives the
            // call.
            unsafe {
                bpf_loop(n, by_key, walk_ptr, 0);
            }
        } else {
            // SAFETY: `map` is one of this object's hash maps, `visit` has the callback
            // signature the helper expects for its values, and `walk` outlives the call.
            unsafe {
                bpf_for_each_map_elem(map, visit, core::ptr::from_mut(&mut walk).cast(), 0);
            }
        }
    }
    xdp_action::XDP_PASS
}
