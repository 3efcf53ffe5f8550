//! Tier 2: the real programs, loaded into the kernel, fed crafted frames through
//! `BPF_PROG_TEST_RUN`. Each frame must come back unchanged with XDP_PASS / TC_ACT_OK, and
//! be counted exactly once under the class and notes the catalogue expects.

use aya::{
    TestRun as _,
    programs::{SchedClassifier, TestRunOptions, Xdp},
};
use tcp_common::object::{TC_PROGRAM, XDP_PROGRAM};
use tcp_common::{
    counters::{Counter, Hook},
    frames::catalogue,
    parse::{PacketClass, notes, tcp_flags},
};
use tcp_user::loader::{LoadOptions, Tracker};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// The counters a frame of this case must add one to, on any hook.
fn expected_counters(case: &tcp_common::frames::Case) -> Vec<Counter> {
    let mut want = vec![Counter::from(case.class)];
    for (bit, counter) in [
        (notes::VLAN_SINGLE, Counter::VlanSingle),
        (notes::VLAN_DOUBLE, Counter::VlanDouble),
        (notes::IPV4_OPTIONS, Counter::Ipv4Options),
        (notes::IPV6_EXT_HEADERS, Counter::Ipv6ExtHeaders),
    ] {
        if case.notes & bit != 0 {
            want.push(counter);
        }
    }
    if case.class == PacketClass::Tcp {
        want.push(if case.ipv6 {
            Counter::TcpV6
        } else {
            Counter::TcpV4
        });
        let f = case.flags;
        if f & tcp_flags::SYN != 0 {
            want.push(if f & tcp_flags::ACK != 0 {
                Counter::SynAck
            } else {
                Counter::Syn
            });
        }
        if f & tcp_flags::FIN != 0 {
            want.push(Counter::Fin);
        }
        if f & tcp_flags::RST != 0 {
            want.push(Counter::Rst);
        }
    }
    want
}

/// Frames that no driver delivers and that a kernel's test harness may refuse before the
/// program runs: anything shorter than an Ethernet header (every kernel refuses those), and,
/// for skb programs, an untagged IPv4/IPv6 header shorter than its fixed part, which
/// `bpf_prog_test_run_skb` pulls first on some builds (6.1.0-57, 6.18) and not on others
/// (6.1.0-48). Whether it does is the harness's business; tcpscope's is what happens when the
/// program runs, which the test checks whenever it does.
fn harness_may_refuse(frame: &[u8], hook: Hook) -> bool {
    let cut_ip = match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() < 14 + 20,
        Some([0x86, 0xdd]) => frame.len() < 14 + 40,
        _ => false,
    };
    frame.len() < 14 || (hook == Hook::TcEgress && cut_ip)
}

#[test]
fn every_crafted_frame_passes_unchanged_and_is_counted_once() {
    tcp_testbed::require_root();
    let tracker = Tracker::load(&LoadOptions::default()).expect("the programs pass the verifier");
    let ebpf = tracker.ebpf();
    let xdp: &Xdp = ebpf
        .program(XDP_PROGRAM)
        .expect("xdp program")
        .try_into()
        .expect("xdp");
    let tc: &SchedClassifier = ebpf
        .program(TC_PROGRAM)
        .expect("tc program")
        .try_into()
        .expect("tc");
    let cases = catalogue();
    assert!(
        cases.len() >= 20,
        "the catalogue covers every parser branch"
    );
    for case in &cases {
        for hook in Hook::ALL {
            let before = tracker.counters().expect("counters");
            let mut out = vec![0u8; case.frame.len() + 64];
            let opts = TestRunOptions {
                data_in: Some(&case.frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            };
            let (result, pass) = match hook {
                Hook::XdpIngress => (xdp.test_run(opts), XDP_PASS),
                Hook::TcEgress => (tc.test_run(opts), TC_ACT_OK),
            };
            let result = match result {
                Ok(r) => r,
                Err(e) if harness_may_refuse(&case.frame, hook) => {
                    // The program did not run: it must not have counted anything.
                    assert_eq!(
                        tracker.counters().expect("counters"),
                        before,
                        "{}: the harness refused the frame on {} ({e}), yet something counted",
                        case.name,
                        hook.name()
                    );
                    continue;
                }
                Err(e) => panic!("{}: test_run on {}: {e}", case.name, hook.name()),
            };
            assert_eq!(
                result.return_value,
                pass,
                "{} on {} must pass",
                case.name,
                hook.name()
            );
            let out_len = result.data_size_out as usize;
            assert_eq!(
                &out[..out_len],
                case.frame.as_slice(),
                "{} on {}: frame modified",
                case.name,
                hook.name()
            );

            let after = tracker.counters().expect("counters");
            let want = expected_counters(case);
            for counter in Counter::ALL {
                let delta = after.hook(hook).get(counter) - before.hook(hook).get(counter);
                let expected = u64::from(want.contains(&counter));
                assert_eq!(
                    delta,
                    expected,
                    "{} on {}: counter {}",
                    case.name,
                    hook.name(),
                    counter.name()
                );
            }
            let other = match hook {
                Hook::XdpIngress => Hook::TcEgress,
                Hook::TcEgress => Hook::XdpIngress,
            };
            assert_eq!(
                after.hook(other),
                before.hook(other),
                "{}: {} must not count",
                case.name,
                other.name()
            );
        }
    }
}

#[test]
fn every_parse_result_is_exercised() {
    // The catalogue must reach every class, so the test above covers every counter slot
    // that a parse result can bump.
    let cases = catalogue();
    for class in PacketClass::ALL {
        assert!(
            cases.iter().any(|c| c.class == class),
            "no case of {class:?}"
        );
    }
}
