//! The compact record of the established tables against the full record: the state machine
//! run the kernel's way (unpack, track, pack; a new handshake moves the record back to the full
//! form) must see the same connection as when it runs on the full record all along.

use proptest::prelude::*;

use super::*;
use crate::{
    parse::tcp_flags::{ACK, FIN, PSH, RST, SYN},
    state::events as E,
    track::{Age, track},
};

const A: [u8; 16] = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const B: [u8; 16] = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn segment(
    from_a: bool,
    flags: u8,
    seq: u32,
    ack: u32,
    len: u32,
    window: u16,
    wscale: u8,
) -> Segment {
    let (src, dst, sport, dport) = if from_a {
        (A, B, 40000, 80)
    } else {
        (B, A, 80, 40000)
    };
    Segment {
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        payload_len: len,
        window,
        flags,
        ipv6: false,
        wscale,
        vlan: 0,
    }
}

/// A record as the kernel keeps it: full while its handshake is in progress, compact after.
enum Stored {
    Full(Flow),
    Compact(Established),
}

/// One endpoint as compared: ACK, FIN sequence, window, state, window scale, flags, side.
type EndpointView = (u32, u32, u16, u8, u8, u8, u8, u8);

/// What must agree between the two runs (everything but handshake times, coarse times and the
/// high bits of the ISNs).
fn view(f: &Flow) -> ([EndpointView; 2], u8, u8, bool) {
    let ep = |e: &Endpoint| {
        (
            e.ack, e.end_seq, e.window, e.state, e.wscale, e.flags, e.side, e.probes,
        )
    };
    (
        [ep(&f.ep[0]), ep(&f.ep[1])],
        f.client,
        f.flags,
        f.closed_ns != 0,
    )
}

#[test]
fn packing_keeps_what_the_state_machine_needs() {
    let mut f = Flow::EMPTY;
    let (now, dir_a) = (
        5_000_000_000_u64,
        FlowKey::of(&segment(true, 0, 0, 0, 0, 0, 0)).1,
    );
    track(
        &mut f,
        &segment(true, SYN, 100, 0, 0, 1000, 7),
        dir_a,
        Side::Remote,
        now,
    );
    track(
        &mut f,
        &segment(false, SYN | ACK, 300, 101, 0, 2000, NO_WSCALE),
        1 - dir_a,
        Side::Local,
        now,
    );
    track(
        &mut f,
        &segment(true, ACK, 101, 301, 0, 3000, 0),
        dir_a,
        Side::Remote,
        now,
    );
    let packed = Established::pack(&f);
    let seg = segment(true, ACK, 101, 301, 0, 3000, 0);
    let back = packed.unpack(&seg, dir_a, now);
    assert_eq!(view(&back), view(&f));
    assert_eq!(
        back.ep[dir_a].isn, 100,
        "the sender's ISN, its high bits from the segment"
    );
    assert_eq!(back.ep[1 - dir_a].isn & 0xffff, 300);
    assert_eq!((back.syn_ns, back.synack_ns), (0, 0));
    assert!(back.last_ns <= now && now - back.last_ns < 1 << LAST_SHIFT);
    assert_eq!(
        Established::pack(&back),
        packed,
        "pack gives the stored record back"
    );
    // The fast path's "seen" mark reads as now.
    let mut seen = packed;
    seen.last = 0;
    assert_eq!(seen.unpack(&seg, dir_a, now + 7).last_ns, now + 7);
    // The state word: both ESTABLISHED, the fast-path pattern of each direction.
    for (dir, side) in [(dir_a, Side::Remote), (1 - dir_a, Side::Local)] {
        let (mask, want) = fast_path_pattern(dir, side);
        let word = packed.state_word();
        // The server's last window came with its SYN-ACK: not yet for the fast path.
        assert_eq!(word & mask == want, dir == dir_a, "direction {dir}");
    }
}

#[test]
fn times_round_trip_through_their_ticks() {
    for now in [1u64 << 43, (1 << 52) + 12_345, u64::MAX / 3] {
        for age in [0u64, 1, 999_999_999, 60_000_000_000, 3_600_000_000_000] {
            let mut f = Flow::EMPTY;
            f.last_ns = now - age;
            f.closed_ns = now - age;
            let p = Established::pack(&f);
            let last = p.last_ns(now);
            let closed = p.closed_ns(now);
            // Never earlier than the time packed (a timeout never fires early), less than a
            // tick later (two where the tick wraps to 0, stored as the one after), never later
            // than now.
            let packed = now - age;
            assert!(
                last <= now && last >= packed && last - packed < 2 << LAST_SHIFT,
                "last {now} {age}"
            );
            assert!(
                closed <= now && closed >= packed && closed - packed < 2 << CLOSED_SHIFT,
                "closed {now} {age}"
            );
            let mut again = Flow::EMPTY;
            again.last_ns = last;
            again.closed_ns = closed;
            let q = Established::pack(&again);
            assert_eq!((q.last, q.closed), (p.last, p.closed));
        }
    }
}

#[test]
fn a_time_written_after_the_readers_clock_read_is_the_present() {
    // The reaper reads the clock once per walk; a packet on the other CPU may write a later
    // time into a record before the walk reaches it. That record is fresh, not a wrap old.
    let walk = (1u64 << 52) + 5_000_000_000;
    for later in [1u64 << LAST_SHIFT, 3 << CLOSED_SHIFT, 30_000_000_000] {
        let mut f = Flow::EMPTY;
        f.last_ns = walk + later;
        f.closed_ns = walk + later;
        let p = Established::pack(&f);
        assert_eq!(p.last_ns(walk), walk, "{later}");
        assert_eq!(p.closed_ns(walk), walk, "{later}");
        let age = Age::of_established(&p, walk);
        assert_eq!((age.idle_ns, age.since_closed_ns), (0, Some(0)));
    }
    // The longest measurable ages still read as themselves.
    let mut f = Flow::EMPTY;
    f.last_ns = walk - (MAX_IDLE_NS - (2 << LAST_SHIFT));
    f.closed_ns = walk - (MAX_CLOSED_AGE_NS - (2 << CLOSED_SHIFT));
    let p = Established::pack(&f);
    assert!(walk - p.last_ns(walk) > MAX_IDLE_NS - (4 << LAST_SHIFT));
    assert!(walk - p.closed_ns(walk) > MAX_CLOSED_AGE_NS - (4 << CLOSED_SHIFT));
}

prop_compose! {
    fn any_segment()(
        from_a in any::<bool>(),
        flags in prop::sample::select(std::vec![
            SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, FIN, 0,
        ]),
        seq in prop_oneof![90u32..320, any::<u32>()],
        ack in prop_oneof![90u32..320, any::<u32>()],
        len in prop_oneof![Just(0u32), 1u32..3000],
        window in any::<u16>(),
        wscale in prop_oneof![Just(NO_WSCALE), 0u8..15],
    ) -> Segment {
        segment(from_a, flags, seq, ack, len, window, wscale)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Random conversations: the kernel's way and the full record all along give the same
    /// events and the same connection after every segment.
    #[test]
    fn compact_records_follow_the_same_connection(script in prop::collection::vec(any_segment(), 1..48)) {
        let mut full = Flow::EMPTY;
        let mut stored = Stored::Full(Flow::EMPTY);
        let mut now = 1_000_000_000u64;
        for seg in script {
            now += 1_000_000;
            let (_, dir) = FlowKey::of(&seg);
            let side = if seg.sport == 80 { Side::Local } else { Side::Remote };
            let want = track(&mut full, &seg, dir, side, now);
            let (got, after) = match stored {
                Stored::Full(mut f) => {
                    let e = track(&mut f, &seg, dir, side, now);
                    (e, f)
                }
                Stored::Compact(c) => {
                    let mut f = c.unpack(&seg, dir, now);
                    // 16 bits of an ISN: a claim that differs only above them passes for a
                    // copy of the SYN (1 in 65,536 for a random claim); the runs part there.
                    let claims = [(dir, seg.seq), (1 - dir, seg.ack.wrapping_sub(1))];
                    if claims.iter().any(|&(i, claim)| f.ep[i].isn == claim && full.ep[i].isn != claim) {
                        return Ok(());
                    }
                    (track(&mut f, &seg, dir, side, now), f)
                }
            };
            prop_assert_eq!(got, want, "events of {:?}", seg);
            if got & E::UNTRACKED != 0 && !after.has(flow_flags::SEEN) {
                stored = Stored::Full(after);
                continue;
            }
            prop_assert_eq!(view(&after), view(&full), "after {:?}", seg);
            stored = if after.is_half_open() {
                Stored::Full(after)
            } else {
                Stored::Compact(Established::pack(&after))
            };
        }
    }
}

#[test]
fn a_server_silent_since_its_synack_is_told_apart() {
    let mut flow = Flow::EMPTY;
    let mut send = |from_a: bool, flags: u8, seq: u32, ack: u32, len: u32| {
        let seg = segment(from_a, flags, seq, ack, len, 1000, 7);
        let (_, dir) = crate::flow::FlowKey::of(&seg);
        track(&mut flow, &seg, dir, Side::Unknown, 1);
        Established::pack(&flow)
    };
    send(true, SYN, 100, 0, 0);
    send(false, SYN | ACK, 70_000, 101, 0);
    // The completing ACK alone: nothing sent yet.
    assert!(!send(true, ACK, 101, 70_001, 0).server_silent_now());
    // The client's data, not acknowledged: silent; its FIN too.
    assert!(send(true, ACK | PSH, 101, 70_001, 10).server_silent_now());
    assert!(send(true, FIN | ACK, 111, 70_001, 0).server_silent_now());
    // The server acknowledges: not silent.
    assert!(!send(false, ACK, 70_001, 112, 0).server_silent_now());
}
