//! What each hook does with a packet: parse it, account for it, track it: the hot path, and
//! the slow path it hands everything else to.

use aya_ebpf::EbpfContext;
use aya_ebpf::maps::ProgramArray;
use aya_log_ebpf::debug;
use tcp_common::{
    counters::{Counter, Hook, HookCounters},
    parse::{Frame, PacketClass, Parsed, parse, parse_plain, syn_window_scale},
    state::Side,
};

use crate::{
    fast,
    maps::{COUNTERS, Handoff, MIRROR, PARSED},
    tracker::{emit_segment, track_segment},
};

/// The parser as a BPF-to-BPF call of its own: its many header temporaries then live in a
/// frame that is gone before the tracker's frame is pushed (the verifier limits the stack of
/// a whole call chain to 512 bytes). Returns the class's byte: a function returning nothing
/// leaves whatever register r0 held, which the verifier refuses when it is a stack pointer.
#[inline(never)]
fn parse_frame<F: Frame>(frame: &F, out: &mut Parsed) -> u8 {
    *out = parse(frame);
    out.class as u8
}

/// The SYN option walk (only SYNs with options get here), inline in the slow program: a call
/// costs more than the few options of a SYN.
#[inline(always)]
fn window_scale<F: Frame>(frame: &F, parsed: &Parsed) -> u8 {
    syn_window_scale(frame, parsed)
}

/// The side of the endpoint that sent a packet seen by `hook`.
#[inline(always)]
fn side_of(hook: Hook) -> Side {
    if MIRROR.load() != 0 {
        Side::Unknown
    } else if hook == Hook::TcEgress {
        Side::Local
    } else {
        Side::Remote
    }
}

/// This CPU's handoff slot and the hook's counters.
#[inline(always)]
fn slots(hook: Hook) -> Option<(&'static mut Handoff, &'static mut HookCounters)> {
    let handoff = PARSED.get_ptr_mut(0)?;
    let counters = COUNTERS.get_ptr_mut(hook as u32)?;
    // SAFETY: this CPU's values of per-CPU arrays (successful lookups), which nothing else uses
    // while this program runs (BPF programs are not preempted on their CPU; the tail call
    // continues on the same CPU).
    Some(unsafe { (&mut *handoff, &mut *counters) })
}

/// The hot path of a hook: the common frame (untagged, IPv4 without options or IPv6 without
/// extension headers, TCP, not a SYN) is parsed inline in a few loads, counted, and, when it is
/// data or an ACK of a connection whose endpoints are both ESTABLISHED, tracked by the fast
/// path: no function call but the hash lookup. Anything else continues in the hook's slow path
/// (`slow`), by a tail call. Never fails; the packet is always passed.
#[inline(always)]
pub fn hot<C: EbpfContext, F: Frame>(ctx: &C, frame: &F, hook: Hook, slow: &ProgramArray) {
    let Some((handoff, counters)) = slots(hook) else {
        return;
    };
    if parse_plain(frame, &mut handoff.parsed) {
        let seg = &handoff.parsed.segment;
        // Class TCP, no notes (what `count` would find).
        counters.bump(Counter::Tcp);
        counters.count_segment(seg);
        let outcome = fast::track(seg, side_of(hook));
        if outcome == fast::Outcome::Done {
            counters.bump(Counter::FastPath);
            return;
        }
        handoff.ready = 1;
        handoff.absent = u8::from(outcome == fast::Outcome::Absent);
    } else {
        handoff.ready = 0;
        handoff.absent = 0;
    }
    // SAFETY: `ctx` is this program's context; on success the call does not return. It fails
    // only while the agent has not yet set the slow path, before anything is attached.
    unsafe { slow.tail_call(ctx, 0) };
}

/// The slow path of a hook: the general parser and counters for a frame the hot path did not
/// parse, then the state machine on the flow tables (`track_segment`). Never fails: a packet
/// that cannot be parsed is counted under its class and passed.
#[inline(always)]
pub fn slow<C: EbpfContext, F: Frame>(ctx: &C, frame: &F, hook: Hook) {
    let Some((handoff, counters)) = slots(hook) else {
        return;
    };
    let parsed = &mut handoff.parsed;
    if handoff.ready == 0 {
        // The class as a plain byte, so that the compiler cannot drop the bounds check on the
        // enum's assumed range (the verifier does not share that assumption).
        let class = parse_frame(frame, parsed);
        counters.count(class, parsed);
        match parsed.class {
            PacketClass::Tcp => {}
            PacketClass::Truncated | PacketClass::Malformed => {
                let counter = Counter::from(parsed.class);
                debug!(
                    ctx,
                    "{}: {} frame of {} bytes passed",
                    hook.name(),
                    counter.name(),
                    frame.len()
                );
                return;
            }
            _ => return,
        }
    }
    if parsed.syn_options_len > 0 {
        parsed.segment.wscale = window_scale(frame, parsed);
    }
    if track_segment(&parsed.segment, side_of(hook), handoff.absent != 0) {
        emit_segment(parsed.segment.flags);
    }
}
