//! The fast path: data and ACKs of a connection whose endpoints are both ESTABLISHED, most of
//! the traffic. Such a segment changes no state, no gauge and no event: all the state machine
//! would do with it is record its sender's highest ACK, the end of its data and its window,
//! and note that the flow is alive. The fast path does exactly that, in place, with one hash
//! lookup: no lock, no clock, no atomic, no call besides the lookup.
//!
//! Race-freedom with respect to the slow path (which takes the record's lock), in short (the
//! README's "Per-packet path" has the full argument):
//! - It reads the record's state word (both endpoints' states and flags, one aligned 32-bit
//!   load) and goes on only if it matches [`fast_path_pattern`]; the slow path writes that word
//!   whole, under the lock, so the fast path never sees half a transition.
//! - It writes four fields the slow path writes only for a segment from the same sender:
//!   the sender's ACK and the end of its data (serial maxima), its window, and the "seen" mark
//!   (`last` = 0, turned into a time by the reaper). The slow path writes back only the
//!   fields its own segment changed, so it never undoes these writes.
//! - Then it reads the state word again: if the slow path changed it meanwhile, the segment
//!   goes through the slow path as well, which redoes the same writes (idempotent) and the
//!   transitions the new state calls for.
//! - A record it finds is freed only a grace period after it was marked DEAD (the mark clears
//!   the state word first), so its writes never land in an element that holds another flow.
//!   Its "seen" mark may land after the DEAD mark's time; the reaper dates it on DEAD records
//!   too, which restarts the grace period.

use tcp_common::{
    flow::{Established, EstablishedEntry, FlowKey, FlowKey4, fast_path_pattern},
    parse::{Segment, tcp_flags},
    state::{Side, seq},
};

use crate::maps::{FLOWS4, FLOWS6};

/// What the fast path did with a segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: nothing left to do.
    Done,
    /// The established table of its family holds no record of the connection (the slow path
    /// need not look again).
    Absent,
    /// Not for the fast path: its flags, or its record's state.
    Declined,
}

/// Applies `seg`, sent from `side`, to its established record if the fast path may; else the
/// caller hands the segment to the slow path.
#[inline(always)]
pub fn track(seg: &Segment, side: Side) -> Outcome {
    use tcp_flags::{ACK, FIN, RST, SYN};
    if seg.flags & (ACK | SYN | FIN | RST) != ACK {
        return Outcome::Declined;
    }
    let (entry, dir) = if seg.ipv6 {
        let (key, dir) = FlowKey::of(seg);
        (FLOWS6.get_ptr_mut(&key), dir)
    } else {
        let (key, dir) = FlowKey4::of(seg);
        (FLOWS4.get_ptr_mut(&key), dir)
    };
    let Some(entry) = entry else {
        return Outcome::Absent;
    };
    // SAFETY: `entry` comes from a successful lookup; the element stays valid while the program
    // runs (RCU) and is not reused for another flow within a grace period of its DEAD mark
    // (module docs). Every access is a single volatile load or store of its own width.
    if unsafe { apply(&raw mut (*entry).rec, seg, dir & 1, side) } {
        Outcome::Done
    } else {
        Outcome::Declined
    }
}

/// The fast path's reads and writes on a record (see the module docs).
///
/// # Safety
/// `rec` points to a live established record.
#[inline(always)]
unsafe fn apply(rec: *mut Established, seg: &Segment, d: usize, side: Side) -> bool {
    use core::ptr::{read_volatile, write_volatile};
    let (mask, expected) = fast_path_pattern(d, side);
    // SAFETY: `state` is 4-aligned and starts the record's state word (asserted in tcp-common).
    let word = unsafe { (&raw const (*rec).state).cast::<u32>() };
    // SAFETY: fields of a live record (caller).
    unsafe {
        if read_volatile(word) & mask != expected {
            return false;
        }
        let end = &raw mut (*rec).end_seq[d];
        let end_before = read_volatile(end);
        // One below the end of what it sent, with at most a byte: maybe a keepalive probe,
        // which only the slow path tells (and marks).
        if seg.payload_len <= 1 && seg.seq.wrapping_add(1) == end_before {
            return false;
        }
        let ack = &raw mut (*rec).ack[d];
        if seq::gt(seg.ack, read_volatile(ack)) {
            write_volatile(ack, seg.ack);
        }
        let sent = seg.seq.wrapping_add(seg.payload_len);
        if seq::gt(sent, end_before) {
            write_volatile(end, sent);
        }
        write_volatile(&raw mut (*rec).window[d], seg.window);
        // Seen: the reaper turns the mark into the time of its walk. Written only when not
        // already there, so that a busy flow's cache line is not dirtied for it.
        if read_volatile(&raw const (*rec).last) != 0 {
            write_volatile(&raw mut (*rec).last, 0);
        }
        read_volatile(word) & mask == expected
    }
}

const _: () = assert!(core::mem::size_of::<EstablishedEntry>() == 44);
