//! State changes for `tcpscope events`: a [`Transition`] record into the `EVENTS` ring buffer
//! for every segment or expiry that moves an endpoint to another state, only while a reader is
//! attached (`EVENTS_READER` not 0).
//!
//! Cost: the fast path never gets here (its segments change no state). Where an endpoint's
//! gauge slot changes (slow path, reaper), the reader flag is one array lookup the verifier
//! inlines: a few instructions, no helper call. Only with a reader attached does a transition
//! pay for the record: a BPF-to-BPF call and three helpers (reserve, clock, submit). A full
//! ring drops the record and counts it (`EVENTS_LOST`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use tcp_common::{
    event_counters::event_slots,
    flow::{FlowKey, FlowKey4},
    metrics::Metrics,
    transition::Transition,
};

use crate::maps::{EVENTS, EVENTS_READER};

/// Whether a `tcpscope events` process reads the ring buffer now.
#[inline(always)]
pub fn reader_attached() -> bool {
    EVENTS_READER.get(0).is_some_and(|pid| *pid != 0)
}

/// Whether the packed slots (before: the low 16 bits, after: the high 16 bits) differ.
#[inline(always)]
pub fn changed(slots: u32) -> bool {
    slots & 0xffff != slots >> 16
}

/// `info` of [`emit`]: the cause in bits 0-7, the segment's flags in bits 8-15, its sender in
/// bits 16-23, and [`COMPACT_KEY`].
#[inline(always)]
pub const fn info(cause: u8, flags: u8, sender: u32) -> u32 {
    cause as u32 | (flags as u32) << 8 | (sender & 1) << 16
}

/// Bit of [`emit`]'s `info`: `key` points to a [`FlowKey4`] (the IPv4 established table's).
pub const COMPACT_KEY: u32 = 1 << 24;

/// Writes one record: `key` (a [`FlowKey`], or a [`FlowKey4`] with [`COMPACT_KEY`] in
/// `info`), the four gauge slots packed in `slots` (endpoint 0 before, 1 before, 0 after, 1
/// after, from the low byte), `info` and the state machine's `events`. A full ring counts the
/// loss in `m`. A function of its own (a BPF-to-BPF call), so that the verifier checks it once
/// rather than on every path of its callers.
///
/// # Safety
/// `key` points to a key of the kind `info` says, readable for its whole size.
#[inline(never)]
pub unsafe fn emit(m: &mut Metrics, key: *const u8, slots: u32, info: u32, events: u32) {
    let Some(mut entry) = EVENTS.reserve::<Transition>(0) else {
        m.events.bump(event_slots::EVENTS_LOST);
        return;
    };
    let t = entry.as_mut_ptr();
    // SAFETY: `t` is the reserved record (64 bytes, 8-aligned); `key` as the caller says.
    // Field by field: no memcpy/memset.
    unsafe {
        use core::ptr::{read_unaligned, write};
        write(&raw mut (*t).ts_ns, bpf_ktime_get_ns());
        let k = &raw mut (*t).key;
        if info & COMPACT_KEY != 0 {
            let src = key.cast::<FlowKey4>();
            let words = (&raw mut (*k).addr).cast::<u64>();
            let mut i = 0;
            while i < 4 {
                write(words.add(i), 0);
                i += 1;
            }
            write(
                (&raw mut (*k).addr[0]).cast::<[u8; 4]>(),
                read_unaligned(&raw const (*src).addr[0]),
            );
            write(
                (&raw mut (*k).addr[1]).cast::<[u8; 4]>(),
                read_unaligned(&raw const (*src).addr[1]),
            );
            write(&raw mut (*k).port, read_unaligned(&raw const (*src).port));
            write(&raw mut (*k).vlan, read_unaligned(&raw const (*src).vlan));
            write(&raw mut (*k).ipv6, 0);
            write(&raw mut (*k).pad, 0);
        } else {
            const WORDS: usize = core::mem::size_of::<FlowKey>() / 8;
            let (d, s) = (k.cast::<u64>(), key.cast::<u64>());
            let mut i = 0;
            while i < WORDS {
                write(d.add(i), read_unaligned(s.add(i)));
                i += 1;
            }
        }
        write(&raw mut (*t).slots, slots.to_le_bytes());
        write(&raw mut (*t).cause, info as u8);
        write(&raw mut (*t).flags, (info >> 8) as u8);
        write(&raw mut (*t).sender, ((info >> 16) & 1) as u8);
        write(&raw mut (*t).pad, 0);
        write(&raw mut (*t).events, events);
        write(&raw mut (*t).pad2, 0);
    }
    entry.submit(0);
}

const _: () = assert!(core::mem::size_of::<FlowKey>() % 8 == 0);
