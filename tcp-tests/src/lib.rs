//! tcpscope's root integration tests live in `tests/`, one binary per subject (`test_run`,
//! `attach`, `ss_agreement`, `lifecycle`, …); their harness is the `tcp-testbed` crate. This
//! library is empty: cargo wants a target besides the tests.
