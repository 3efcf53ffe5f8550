//! What each hook does with a packet: parse it and account for it.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use tcp_common::{
    counters::{Counter, Hook},
    parse::{Frame, PacketClass, Parsed, parse, syn_window_scale},
    state::Side,
};

use crate::{
    maps::{COUNTERS, MIRROR, PARSED},
    tracker::track_segment,
};

/// The parser as a BPF-to-BPF call of its own: its many header temporaries then live in a
/// frame that is gone before the tracker's frame is pushed (the verifier limits the stack of
/// a whole call chain to 512 bytes).
#[inline(never)]
fn parse_frame<F: Frame>(frame: &F, out: &mut Parsed) {
    *out = parse(frame);
}

/// The SYN option walk as a BPF-to-BPF call of its own (only SYNs with options get here).
#[inline(never)]
fn window_scale<F: Frame>(frame: &F, parsed: &Parsed) -> u8 {
    syn_window_scale(frame, parsed)
}

/// Parses one packet and updates the hook's counters. Never fails: a packet that cannot be
/// parsed is counted under its class and passed.
#[inline(always)]
pub fn observe<C: EbpfContext, F: Frame>(ctx: &C, frame: &F, hook: Hook) {
    let Some(parsed) = PARSED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, used by nothing else while this program
    // runs (BPF programs are not preempted on their CPU).
    let parsed: &mut Parsed = unsafe { &mut *parsed };
    parse_frame(frame, parsed);
    if parsed.syn_options_len > 0 {
        parsed.segment.wscale = window_scale(frame, parsed);
    }
    let Some(counters) = COUNTERS.get_ptr_mut(hook as u32) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it points to
    // this CPU's value, which nothing else writes while this program runs (BPF programs are
    // not preempted on their CPU).
    let counters = unsafe { &mut *counters };
    // The class comes back through memory from the parser's call: read it as a plain byte so
    // that the compiler cannot drop the bounds check on the enum's assumed range (the
    // verifier does not share that assumption).
    // SAFETY: `PacketClass` is `repr(u8)`; reading its byte is always valid.
    let class = unsafe { core::ptr::read_volatile((&raw const parsed.class).cast::<u8>()) };
    counters.count(class, parsed);
    match parsed.class {
        PacketClass::Tcp => {
            let seg = &parsed.segment;
            let side = if MIRROR.load() != 0 {
                Side::Unknown
            } else if hook == Hook::TcEgress {
                Side::Local
            } else {
                Side::Remote
            };
            track_segment(seg, side);
        }
        PacketClass::Truncated | PacketClass::Malformed => {
            let counter = Counter::from(parsed.class);
            debug!(
                ctx,
                "{}: {} frame of {} bytes passed",
                hook.name(),
                counter.name(),
                frame.len()
            );
        }
        _ => {}
    }
}
