//! The command line: subcommands, flags and their parsers.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tcp_common::{state::TcpState, track::Timeouts};
use tcp_user::{
    flood::FloodRule,
    flows,
    loader::{self, Mode, XdpModeChoice},
};

/// eBPF/XDP TCP connection tracker.
#[derive(Debug, Parser)]
#[command(name = "tcpscope", version = tcp_user::selfstats::VERSION, long_about = None)]
pub(crate) struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it. At debug the
    /// eBPF programs' own log lines appear too.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub(crate) log_level: log::LevelFilter,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Attach the tracker to network interfaces and run until SIGINT or SIGTERM.
    Run(RunArgs),
    /// List the flows tracked by the running agent (read from its pinned maps), like `ss -tan`.
    Flows(FlowsArgs),
    /// Print the running agent's tallies (events and endpoints per state, from its pinned maps)
    /// with the same names and layout as `replay`.
    Stats(StatsArgs),
    /// Print every state change of every endpoint as it happens, like `conntrack -E`: read
    /// from the running agent of this network namespace (its pinned ring buffer), until
    /// SIGINT or SIGTERM. One reader at a time; the programs write changes only while one is
    /// attached. Changes the ring buffer had no room for are counted and reported on stderr.
    Events(EventsArgs),
    /// Run the state machine over a capture file (pcap or pcapng; Ethernet, or the Linux
    /// cooked headers of `tcpdump -i any`) and print the final state; packet timestamps are the
    /// clock. Needs no privileges.
    Replay(ReplayArgs),
    /// Print a completion script for a shell (bash, zsh, fish, elvish or powershell), e.g.
    /// `tcpscope completions bash > /etc/bash_completion.d/tcpscope`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of tcpscope or of one of its commands, e.g.
    /// `tcpscope man run | man -l -`.
    Man {
        /// The command (run, flows, stats, replay, ...); none: tcpscope itself.
        command: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The capture file.
    pub(crate) capture: std::path::PathBuf,
    #[command(flatten)]
    pub(crate) timeouts: TimeoutArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Prometheus)]
    pub(crate) format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Prometheus text exposition, the exporter's metric names.
    Prometheus,
    /// JSON: counters, endpoints per state, and every flow.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Interface to attach to (repeatable). Default: the interface that holds the default
    /// route.
    #[arg(short, long = "iface", value_name = "IFACE")]
    pub(crate) ifaces: Vec<String>,
    /// Start even when an --iface does not exist (yet): the agent attaches when it appears.
    /// Whatever this flag, an interface that goes away is attached again when it comes back,
    /// and /healthz answers 503 while it is away.
    #[arg(long)]
    pub(crate) allow_missing_iface: bool,
    /// Mirror mode: this long after the start, remove the records no segment has touched
    /// since (records an earlier agent left in the pins whose connections are gone). Host
    /// mode reconciles with the kernel's socket table instead (at start and every 30 s).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub(crate) stale_after_restart_secs: u64,
    /// host: XDP ingress + TC egress; mirror: XDP only, both directions arrive on ingress.
    #[arg(long, value_enum, default_value_t = Mode::Host)]
    pub(crate) mode: Mode,
    /// XDP attach mode; auto: generic (skb) on software devices such as veth (native XDP
    /// adds drops there), elsewhere native with a fall-back to generic, saying so.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
    pub(crate) xdp_mode: XdpModeChoice,
    /// Log the packet counters every SECS seconds (0: only at exit).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub(crate) report_every: u64,
    /// bpffs directory where the maps are pinned (per layout version), so that a restart
    /// keeps every tracked flow and `tcpscope flows` can read them; one agent holds it at a
    /// time. Default: /sys/fs/bpf/tcpscope/netns-INODE, INODE that of this network namespace.
    #[arg(long, value_name = "DIR")]
    pub(crate) pin_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) timeouts: TimeoutArgs,
    /// Capacity of the IPv4 established-flow table (128 bytes of kernel memory per slot).
    #[arg(long, default_value_t = tcp_common::object::DEFAULT_FLOWS_CAPACITY, value_name = "N", value_parser = capacity)]
    pub(crate) flows_capacity: u32,
    /// Capacity of the IPv6 established-flow table (152 bytes per slot).
    #[arg(long, default_value_t = tcp_common::object::DEFAULT_FLOWS6_CAPACITY, value_name = "N", value_parser = capacity)]
    pub(crate) flows6_capacity: u32,
    /// Capacity of the half-open (handshake in progress) table, both families (192 bytes per
    /// slot).
    #[arg(long, default_value_t = tcp_common::object::DEFAULT_HALF_OPEN_CAPACITY, value_name = "N", value_parser = capacity)]
    pub(crate) half_open_capacity: u32,
    /// Serve GET /metrics (Prometheus) and GET /healthz on this address; `off`: no server.
    #[arg(long, visible_alias = "web.listen-address", default_value = "0.0.0.0:9977", value_name = "ADDR:PORT|off", value_parser = parse_listen)]
    pub(crate) listen: Listen,
    /// TLS, client certificates and basic auth for the metrics server: a Prometheus
    /// exporter-toolkit web configuration file (tls_server_config, http_server_config,
    /// basic_auth_users), read at start and again on SIGHUP.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub(crate) web_config_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) flood: FloodArgs,
    /// Ports whose endpoints are exported per state and side
    /// (`tcpscope_port_endpoints{port,state,side}`), comma-separated, at most 64.
    #[arg(long, value_name = "PORT,...", value_parser = parse_ports, default_value = "", hide_default_value = true)]
    pub(crate) ports: Ports,
}

/// A table capacity: 1 to [`loader::MAX_CAPACITY`].
pub(crate) fn capacity(s: &str) -> Result<u32, String> {
    let range = format!("1 to {}", loader::MAX_CAPACITY);
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of slots ({range})"))?;
    if n == 0 || n > loader::MAX_CAPACITY {
        return Err(format!("{n} slots: the capacity must be {range}"));
    }
    Ok(n)
}

/// `--ports`: distinct ports, in the order given.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ports(pub(crate) Vec<u16>);

pub(crate) fn parse_ports(s: &str) -> Result<Ports, String> {
    let mut out: Vec<u16> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let port: u16 = part
            .parse()
            .map_err(|_| format!("{part:?} is not a port (0-65535)"))?;
        if !out.contains(&port) {
            out.push(port);
        }
    }
    if out.len() > loader::MAX_WATCHED_PORTS {
        return Err(format!(
            "{} ports given; at most {}",
            out.len(),
            loader::MAX_WATCHED_PORTS
        ));
    }
    Ok(Ports(out))
}

/// The SYN-flood rule (per listening port, over a sliding window).
#[derive(Debug, Args)]
pub(crate) struct FloodArgs {
    /// SYNs per second towards a port, averaged over the window, at or above which the port
    /// may be flagged.
    #[arg(long, default_value_t = FloodRule::DEFAULT.rate, value_name = "PER_SEC", value_parser = parse_positive)]
    pub(crate) syn_flood_rate: f64,
    /// Completed handshakes / SYNs below which a port at that rate is flagged (0 to 1).
    #[arg(long, default_value_t = FloodRule::DEFAULT.completion, value_name = "RATIO", value_parser = parse_ratio)]
    pub(crate) syn_flood_completion: f64,
    /// Length of the sliding window, seconds.
    #[arg(long, default_value_t = FloodRule::DEFAULT.window_ns / 1_000_000_000, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) syn_flood_window: u64,
}

impl FloodArgs {
    pub(crate) fn rule(&self) -> FloodRule {
        FloodRule {
            rate: self.syn_flood_rate,
            completion: self.syn_flood_completion,
            window_ns: self.syn_flood_window * 1_000_000_000,
            ..FloodRule::DEFAULT
        }
    }
}

/// Where the metrics server listens, if anywhere.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Listen(pub(crate) Option<std::net::SocketAddr>);

pub(crate) fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?} is not ADDR:PORT (e.g. 0.0.0.0:9977, [::1]:9977) or off"))
}

pub(crate) fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

pub(crate) fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1")),
    }
}

/// Record timeouts (the kernel's reaper removes records past them, once a second).
#[derive(Debug, Args)]
pub(crate) struct TimeoutArgs {
    /// Seconds an endpoint stays in TIME-WAIT (Linux: 60; at most 35183, ~9.8 h).
    #[arg(long, default_value_t = Timeouts::DEFAULT.time_wait / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_SINCE_CLOSE_SECS))]
    pub(crate) time_wait_secs: u64,
    /// Seconds a record with both endpoints CLOSED is kept (late segments of a reset
    /// connection must not start a new one; at most 35183).
    #[arg(long, default_value_t = Timeouts::DEFAULT.closed / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_SINCE_CLOSE_SECS))]
    pub(crate) closed_secs: u64,
    /// Seconds without traffic after which a handshake in progress is dropped.
    #[arg(long, default_value_t = Timeouts::DEFAULT.half_open / Timeouts::NS_PER_SEC, value_name = "SECS")]
    pub(crate) half_open_secs: u64,
    /// Seconds without traffic after which an established connection, or one whose
    /// remaining endpoint is in CLOSE-WAIT, is dropped (at most 2251799, ~26 days).
    #[arg(long, default_value_t = Timeouts::DEFAULT.established / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_IDLE_SECS))]
    pub(crate) established_secs: u64,
    /// Seconds without traffic after which a connection with a FIN awaiting its ACK
    /// (FIN-WAIT-1, CLOSING, LAST-ACK) is dropped (at most 2251799).
    #[arg(long, default_value_t = Timeouts::DEFAULT.closing / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_IDLE_SECS))]
    pub(crate) closing_secs: u64,
    /// Seconds a FIN-WAIT-2 endpoint whose peer is silent is kept before it is closed alone
    /// (Linux's `tcp_fin_timeout` for an orphaned socket: 60; at most 2251799).
    #[arg(long = "fin-wait2-secs", default_value_t = Timeouts::DEFAULT.fin_wait2 / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_IDLE_SECS))]
    pub(crate) fin_wait2_secs: u64,
}

impl TimeoutArgs {
    pub(crate) fn timeouts(&self) -> Timeouts {
        let ns = |s: u64| s.saturating_mul(Timeouts::NS_PER_SEC);
        Timeouts {
            time_wait: ns(self.time_wait_secs),
            closed: ns(self.closed_secs),
            half_open: ns(self.half_open_secs),
            established: ns(self.established_secs),
            closing: ns(self.closing_secs),
            fin_wait2: ns(self.fin_wait2_secs),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// bpffs directory the running agent pins its maps in. Default: that of an agent in this
    /// network namespace (/sys/fs/bpf/tcpscope/netns-INODE).
    #[arg(long, value_name = "DIR")]
    pub(crate) pin_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Prometheus)]
    pub(crate) format: Format,
}

#[derive(Debug, Args)]
pub(crate) struct FlowsArgs {
    /// bpffs directory the running agent pins its maps in. Default: that of an agent in this
    /// network namespace (/sys/fs/bpf/tcpscope/netns-INODE).
    #[arg(long, value_name = "DIR")]
    pub(crate) pin_dir: Option<PathBuf>,
    /// Output: a table, one JSON document, or one JSON object per line.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = FlowsFormat::Table)]
    pub(crate) output: FlowsFormat,
    /// Same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    pub(crate) json: bool,
    /// Only flows with an endpoint in this state (time_wait, time-wait, established, ...).
    /// The filters apply to one endpoint together: `--state time_wait --port 80 --side local`
    /// lists the flows whose local endpoint on port 80 is in TIME-WAIT.
    #[arg(long, value_parser = parse_state_arg)]
    pub(crate) state: Option<TcpState>,
    /// Only flows with an endpoint on this port.
    #[arg(long, value_name = "N")]
    pub(crate) port: Option<u16>,
    /// Only flows with an endpoint at this address.
    #[arg(long, value_name = "IP")]
    pub(crate) addr: Option<std::net::IpAddr>,
    /// Only flows with an endpoint on this side: local (a socket of this host) or remote.
    #[arg(long, value_enum)]
    pub(crate) side: Option<SideArg>,
}

/// `tcpscope flows -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FlowsFormat {
    /// Aligned columns, like `ss -tan`.
    Table,
    /// One JSON array.
    Json,
    /// One JSON object per flow and line.
    Ndjson,
}

/// `tcpscope flows --side`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SideArg {
    /// A socket of this host.
    Local,
    /// Its peer.
    Remote,
}

pub(crate) fn parse_state_arg(s: &str) -> Result<TcpState, String> {
    flows::parse_state(s).ok_or_else(|| {
        let names: Vec<&str> = TcpState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown state {s:?}; one of {}", names.join(", "))
    })
}

#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// bpffs directory the running agent pins its maps in. Default: that of an agent in this
    /// network namespace (/sys/fs/bpf/tcpscope/netns-INODE).
    #[arg(long, value_name = "DIR")]
    pub(crate) pin_dir: Option<PathBuf>,
    /// Output: a line per change for people, or one JSON object per change and line (keys:
    /// time, monotonic_ns, family, endpoint, peer, vlan, role, side, old, new, cause, flags,
    /// sent), flushed at once.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = EventsFormat::Text)]
    pub(crate) output: EventsFormat,
    /// Only changes of connections with N as either port (the endpoint's or its peer's).
    #[arg(long, value_name = "N")]
    pub(crate) port: Option<u16>,
    /// Only changes into or out of this state (time_wait, time-wait, TIME-WAIT, established,
    /// closed, ...): `--state time_wait` shows endpoints entering TIME-WAIT and leaving it.
    /// With --port, a change must pass both.
    #[arg(long, value_name = "S", value_parser = parse_state_arg)]
    pub(crate) state: Option<TcpState>,
}

/// `tcpscope events -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EventsFormat {
    /// `TIME ENDPOINT -> PEER ROLE SIDE OLD -> NEW (CAUSE)`; CAUSE: `sent FLAGS`,
    /// `received FLAGS`, `expired`, `reconciled` or `table full`.
    Text,
    /// One JSON object per change and line.
    Ndjson,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(args: &[&str]) -> Result<EventsArgs, clap::Error> {
        let argv = ["tcpscope", "events"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Events(a) => Ok(a),
            other => panic!("not events: {other:?}"),
        }
    }

    #[test]
    fn events_takes_both_spellings_of_output_and_every_state_name() {
        let a = events(&["-o", "ndjson", "--port", "8080", "--state", "TIME-WAIT"]).expect("parse");
        assert_eq!(a.output, EventsFormat::Ndjson);
        assert_eq!(a.port, Some(8080));
        assert_eq!(a.state, Some(TcpState::TimeWait));
        let a = events(&["--output", "ndjson", "--state", "syn_recv"]).expect("parse");
        assert_eq!(a.output, EventsFormat::Ndjson);
        assert_eq!(a.state, Some(TcpState::SynReceived));
        assert_eq!(events(&[]).expect("parse").output, EventsFormat::Text);
        let bad = events(&["--state", "half_closed"])
            .expect_err("unknown state")
            .to_string();
        let first = bad.lines().next().expect("a line");
        assert!(first.contains("unknown state \"half_closed\""), "{bad}");
        assert!(
            first.contains("time_wait") && first.contains("fin_wait_2"),
            "{bad}"
        );
        assert!(events(&["--port", "65536"]).is_err());
    }
}
