//! The one harness of tcpscope's root integration tests (`tcp-tests`) and of its benchmark
//! (`tcp-user/benches/tcpscope.rs`): network namespaces and veth pairs, commands run inside
//! them, the `tcpscope` agent as a child process (and the dist binary the deployment files
//! run), the kernel's own counters, captures, the exporter and a real Prometheus server, and the
//! prerequisites a run may go without.
//!
//! Every resource has a guard that removes it on drop, so a failing test or benchmark cleans
//! up too.
//!
//! Errors: helpers panic with a clear message, as tests want them. The benchmark must record a
//! failed item and carry on with the next, so what it uses also comes as a `Result`: where a
//! helper serves both, its `try_` form holds the logic and returns the error, and the plain
//! form panics with that error. Helpers only the benchmark uses return `Result` under their
//! plain name.

pub mod agent;
mod bed;
mod capture;
mod cmd;
pub mod dist;
mod link;
pub mod metrics;
mod netns;
mod prereq;
mod procfs;
pub mod prometheus;

pub use bed::{PREFIX, Testbed, remove_stale};
pub use capture::{Tcpdump, send_raw_frames};
pub use cmd::{RemoveOnDrop, run, sh, try_run, try_sh, unique};
pub use link::{Link, set_linger_zero};
pub use netns::{NetNs, NetnsGuard, enter_netns, nft, try_enter_netns};
pub use prereq::{ALLOW_SKIP, is_root, pcaps_dir, require_root, two_cpus};
pub use procfs::{TcpCounters, clock_ticks_per_sec, cpu_ns, cpu_ticks, net_counter, rx_packets};
