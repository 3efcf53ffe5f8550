//! `tcpscope`: the agent's command line.

use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use log::{debug, info, warn};
use tcp_common::{
    counters::{Counter, Hook, event_slots},
    state::{Side, TcpState},
    track::Timeouts,
};
use tcp_user::{
    counters::Totals,
    error::error_chain,
    flood::{FloodDetector, FloodRule},
    flows::{self, FlowView},
    http, iface, links,
    loader::{self, LoadOptions, Mode, Tracker, XdpModeChoice},
    pins::{self, PinDir},
    report::{Exposition, Report, WalkExport},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

/// eBPF/XDP TCP connection tracker.
#[derive(Debug, Parser)]
#[command(name = "tcpscope", version, about, long_about = None)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it. At debug the
    /// eBPF programs' own log lines appear too.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the tracker to network interfaces and run until SIGINT or SIGTERM.
    Run(RunArgs),
    /// List the flows tracked by the running agent (read from its pinned maps), like `ss -tan`.
    Flows(FlowsArgs),
    /// Print the running agent's tallies (events and endpoints per state, from its pinned maps)
    /// with the same names and layout as `replay`.
    Stats(StatsArgs),
    /// Run the state machine over a capture file (pcap or pcapng; Ethernet, or the Linux
    /// cooked headers of `tcpdump -i any`) and print the final state; packet timestamps are the
    /// clock. Needs no privileges.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The capture file.
    capture: std::path::PathBuf,
    #[command(flatten)]
    timeouts: TimeoutArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Prometheus)]
    format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Prometheus text exposition, the exporter's metric names.
    Prometheus,
    /// JSON: counters, endpoints per state, and every flow.
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Interface to attach to (repeatable). Default: the interface that holds the default
    /// route.
    #[arg(short, long = "iface", value_name = "IFACE")]
    ifaces: Vec<String>,
    /// Start even when an --iface does not exist (yet): the agent attaches when it appears.
    /// Whatever this flag, an interface that goes away is attached again when it comes back,
    /// and /healthz answers 503 while it is away.
    #[arg(long)]
    allow_missing_iface: bool,
    /// Mirror mode: this long after the start, remove the records no segment has touched
    /// since (records an earlier agent left in the pins whose connections are gone). Host
    /// mode reconciles with the kernel's socket table instead (at start and every 30 s).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    stale_after_restart_secs: u64,
    /// host: XDP ingress + TC egress; mirror: XDP only, both directions arrive on ingress.
    #[arg(long, value_enum, default_value_t = Mode::Host)]
    mode: Mode,
    /// XDP attach mode; auto: generic (skb) on software devices such as veth (native XDP
    /// adds drops there), elsewhere native with a fall-back to generic, saying so.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
    xdp_mode: XdpModeChoice,
    /// Log the packet counters every SECS seconds (0: only at exit).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    report_every: u64,
    /// bpffs directory where the maps are pinned (per layout version), so that a restart
    /// keeps every tracked flow and `tcpscope flows` can read them; one agent holds it at a
    /// time. Default: /sys/fs/bpf/tcpscope/netns-INODE, INODE that of this network namespace.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    #[command(flatten)]
    timeouts: TimeoutArgs,
    /// Capacity of the IPv4 established-flow table (128 bytes of kernel memory per slot).
    #[arg(long, default_value_t = tcp_common::object::DEFAULT_FLOWS_CAPACITY, value_name = "N", value_parser = capacity)]
    flows_capacity: u32,
    /// Capacity of the IPv6 established-flow table (152 bytes per slot).
    #[arg(long, default_value_t = tcp_common::object::DEFAULT_FLOWS6_CAPACITY, value_name = "N", value_parser = capacity)]
    flows6_capacity: u32,
    /// Capacity of the half-open (handshake in progress) table, both families (192 bytes per
    /// slot).
    #[arg(long, default_value_t = tcp_common::object::DEFAULT_HALF_OPEN_CAPACITY, value_name = "N", value_parser = capacity)]
    half_open_capacity: u32,
    /// Serve GET /metrics (Prometheus) and GET /healthz on this address; `off`: no server.
    #[arg(long, default_value = "0.0.0.0:9977", value_name = "ADDR:PORT|off", value_parser = parse_listen)]
    listen: Listen,
    #[command(flatten)]
    flood: FloodArgs,
    /// Ports whose endpoints are exported per state and side
    /// (`tcpscope_port_endpoints{port,state,side}`), comma-separated, at most 64.
    #[arg(long, value_name = "PORT,...", value_parser = parse_ports, default_value = "", hide_default_value = true)]
    ports: Ports,
}

/// A table capacity: 1 to [`loader::MAX_CAPACITY`].
fn capacity(s: &str) -> Result<u32, String> {
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
struct Ports(Vec<u16>);

fn parse_ports(s: &str) -> Result<Ports, String> {
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
struct FloodArgs {
    /// SYNs per second towards a port, averaged over the window, at or above which the port
    /// may be flagged.
    #[arg(long, default_value_t = FloodRule::DEFAULT.rate, value_name = "PER_SEC", value_parser = parse_positive)]
    syn_flood_rate: f64,
    /// Completed handshakes / SYNs below which a port at that rate is flagged (0 to 1).
    #[arg(long, default_value_t = FloodRule::DEFAULT.completion, value_name = "RATIO", value_parser = parse_ratio)]
    syn_flood_completion: f64,
    /// Length of the sliding window, seconds.
    #[arg(long, default_value_t = FloodRule::DEFAULT.window_ns / 1_000_000_000, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    syn_flood_window: u64,
}

impl FloodArgs {
    fn rule(&self) -> FloodRule {
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
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?} is not ADDR:PORT (e.g. 0.0.0.0:9977, [::1]:9977) or off"))
}

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1")),
    }
}

/// Record timeouts (the kernel's reaper removes records past them, once a second).
#[derive(Debug, Args)]
struct TimeoutArgs {
    /// Seconds an endpoint stays in TIME-WAIT (Linux: 60; at most 35183, ~9.8 h).
    #[arg(long, default_value_t = Timeouts::DEFAULT.time_wait / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_SINCE_CLOSE_SECS))]
    time_wait_secs: u64,
    /// Seconds a record with both endpoints CLOSED is kept (late segments of a reset
    /// connection must not start a new one; at most 35183).
    #[arg(long, default_value_t = Timeouts::DEFAULT.closed / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_SINCE_CLOSE_SECS))]
    closed_secs: u64,
    /// Seconds without traffic after which a handshake in progress is dropped.
    #[arg(long, default_value_t = Timeouts::DEFAULT.half_open / Timeouts::NS_PER_SEC, value_name = "SECS")]
    half_open_secs: u64,
    /// Seconds without traffic after which an established connection, or one whose
    /// remaining endpoint is in CLOSE-WAIT, is dropped (at most 2251799, ~26 days).
    #[arg(long, default_value_t = Timeouts::DEFAULT.established / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_IDLE_SECS))]
    established_secs: u64,
    /// Seconds without traffic after which a connection with a FIN awaiting its ACK
    /// (FIN-WAIT-1, CLOSING, LAST-ACK) is dropped (at most 2251799).
    #[arg(long, default_value_t = Timeouts::DEFAULT.closing / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_IDLE_SECS))]
    closing_secs: u64,
    /// Seconds a FIN-WAIT-2 endpoint whose peer is silent is kept before it is closed alone
    /// (Linux's `tcp_fin_timeout` for an orphaned socket: 60; at most 2251799).
    #[arg(long = "fin-wait2-secs", default_value_t = Timeouts::DEFAULT.fin_wait2 / Timeouts::NS_PER_SEC, value_name = "SECS", value_parser = clap::value_parser!(u64).range(..=Timeouts::MAX_IDLE_SECS))]
    fin_wait2_secs: u64,
}

impl TimeoutArgs {
    fn timeouts(&self) -> Timeouts {
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
struct StatsArgs {
    /// bpffs directory the running agent pins its maps in. Default: that of an agent in this
    /// network namespace (/sys/fs/bpf/tcpscope/netns-INODE).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Prometheus)]
    format: Format,
}

#[derive(Debug, Args)]
struct FlowsArgs {
    /// bpffs directory the running agent pins its maps in. Default: that of an agent in this
    /// network namespace (/sys/fs/bpf/tcpscope/netns-INODE).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Output: a table, one JSON document, or one JSON object per line.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = FlowsFormat::Table)]
    output: FlowsFormat,
    /// Same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
    /// Only flows with an endpoint in this state (time_wait, time-wait, established, ...).
    /// The filters apply to one endpoint together: `--state time_wait --port 80 --side local`
    /// lists the flows whose local endpoint on port 80 is in TIME-WAIT.
    #[arg(long, value_parser = parse_state_arg)]
    state: Option<TcpState>,
    /// Only flows with an endpoint on this port.
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Only flows with an endpoint at this address.
    #[arg(long, value_name = "IP")]
    addr: Option<std::net::IpAddr>,
    /// Only flows with an endpoint on this side: local (a socket of this host) or remote.
    #[arg(long, value_enum)]
    side: Option<SideArg>,
}

/// `tcpscope flows -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum FlowsFormat {
    /// Aligned columns, like `ss -tan`.
    Table,
    /// One JSON array.
    Json,
    /// One JSON object per flow and line.
    Ndjson,
}

/// `tcpscope flows --side`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SideArg {
    /// A socket of this host.
    Local,
    /// Its peer.
    Remote,
}

fn parse_state_arg(s: &str) -> Result<TcpState, String> {
    flows::parse_state(s).ok_or_else(|| {
        let names: Vec<&str> = TcpState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown state {s:?}; one of {}", names.join(", "))
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loader_level = if cli.log_level == log::LevelFilter::Trace {
        log::LevelFilter::Trace
    } else {
        cli.log_level.min(log::LevelFilter::Info)
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        // aya's loader narrates every relocation at debug: keep that for trace.
        .filter_module("aya", loader_level)
        .filter_module("aya_obj", loader_level)
        .parse_env("RUST_LOG")
        .format_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Replay(args) => replay(&args),
            Command::Flows(args) => list_flows(&args),
            Command::Stats(args) => stats(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The pin directory of a start in progress: removes what the start created when dropped
/// before the agent tracks (emptied once it does).
struct StartGuard(Option<PinDir>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take() {
            pins.discard();
        }
    }
}

/// A hint for errors whose usual cause is known.
fn hint(e: &tcp_user::error::Error) -> &'static str {
    let chain = error_chain(e);
    if chain.contains("Operation not permitted") || chain.contains("EPERM") {
        " (run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    } else if matches!(e, tcp_user::error::Error::Attach { .. })
        && (chain.contains("Device or resource busy") || chain.contains("File exists"))
    {
        " (another XDP program, perhaps another tcpscope agent's, is attached to this \
         interface: `ip link show` names it)"
    } else if chain.contains("XDP (native)") {
        " (the driver may lack native XDP: try --xdp-mode skb)"
    } else {
        ""
    }
}

async fn run(args: RunArgs) -> Result<()> {
    // Handlers first: a SIGTERM that arrives while loading or attaching must still end in a
    // clean detach, not in the default action (death with programs possibly left behind).
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let ifaces = if args.ifaces.is_empty() {
        let Some(iface) = iface::default_route_interface() else {
            bail!("no --iface given and no default route to pick an interface from");
        };
        info!("no --iface given: using {iface}, which holds the default route");
        vec![iface]
    } else {
        args.ifaces
    };
    // Check the interfaces before loading anything: a typo must not cost a program load.
    for (i, iface) in ifaces.iter().enumerate() {
        if ifaces[..i].contains(iface) {
            bail!("--iface {iface} is given twice");
        }
        if !iface::exists(iface) && !args.allow_missing_iface {
            bail!(
                "no network interface named {iface:?} in this network namespace \
                 (--allow-missing-iface to start anyway and attach when it appears)"
            );
        }
    }
    let pin_base = match args.pin_dir {
        Some(dir) => dir,
        None => pins::default_dir().map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
    };
    // Held until exit; released by the kernel however the agent exits.
    // Held until exit. Until the agent tracks, any failure removes the pins this start
    // created (the guard drops after the tracker, which detaches first).
    let mut pins = StartGuard(Some(
        PinDir::acquire(&pin_base).map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
    ));
    let options = LoadOptions {
        mode: args.mode,
        pin_dir: Some(pin_base.clone()),
        flows_capacity: args.flows_capacity,
        flows6_capacity: args.flows6_capacity,
        half_open_capacity: args.half_open_capacity,
        ports: args.ports.0.clone(),
    };
    let timeouts = args.timeouts.timeouts();
    let mut tracker = match Tracker::load(&options) {
        Ok(t) => t,
        Err(e) => bail!("{}{}", error_chain(&e), hint(&e)),
    };
    let mut ebpf_log = match aya_log::EbpfLogger::init(tracker.ebpf_mut()) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring buffer map fd and keeps it open, unchanged,
            // for as long as it lives, and the AsyncFd owns the logger.
            let fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
            Some(fd.map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?)
        }
        Err(e) => {
            warn!("eBPF-side logging unavailable: {e}");
            None
        }
    };
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<http::Request>(16);
    // Bound before attaching: a port in use must not cost an attach and detach.
    let server = match args.listen.0 {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            info!("serving /metrics and /healthz on http://{addr}");
            Some(tokio::spawn(http::serve(
                listener,
                requests_tx,
                http::Limits::DEFAULT,
            )))
        }
        None => {
            drop(requests_tx);
            None
        }
    };
    let mut followed = links::Interfaces::new(&ifaces, args.mode, args.xdp_mode);
    for iface in &ifaces {
        if !iface::exists(iface) {
            warn!("{iface}: no such interface yet: attaching when it appears");
            continue;
        }
        match tracker.attach(iface, args.mode, args.xdp_mode) {
            Ok(attachment) => {
                info!("attached {attachment}");
                followed.attached(attachment);
            }
            Err(e) => bail!("{}{}", error_chain(&e), hint(&e)),
        }
    }
    // Link events wake the interface check at once; without them it runs once a second.
    let mut link_events = match links::LinkEvents::open().and_then(|l| {
        // SAFETY: the socket owns its descriptor and keeps it open, unchanged, for as long as
        // it lives, and the AsyncFd owns the socket.
        unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))
    }) {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!("link events unavailable ({e}): interfaces are checked once a second");
            None
        }
    };
    // From here on the tracker is shared: the reaper thread runs the expiry program while the
    // main loop serves scrapes.
    let tracker = std::sync::Arc::new(tracker);
    let reconcile = match args.mode {
        Mode::Host => tcp_user::reconcile::Policy::Host,
        Mode::Mirror => tcp_user::reconcile::Policy::Mirror {
            stale_after: Duration::from_secs(args.stale_after_restart_secs),
        },
    };
    let reaper =
        tcp_user::reaper::Reaper::start(std::sync::Arc::clone(&tracker), timeouts, Some(reconcile))
            .context("starting the reaper thread")?;
    // The sides an endpoint can have in this mode, for the walk's views.
    let sides: &[Side] = match args.mode {
        Mode::Host => &[Side::Local, Side::Remote],
        Mode::Mirror => &[Side::Unknown],
    };
    let rule = args.flood.rule();
    let mut flood = FloodDetector::new(rule);
    info!(
        "SYN-flood rule: >= {} SYN/s per port over {} s with < {:.0}% completed",
        rule.rate,
        rule.window_ns / 1_000_000_000,
        rule.completion * 100.0
    );
    let _pins = pins.0.take();
    info!("tracking; stop with SIGINT or SIGTERM");

    let mut report = (args.report_every > 0)
        .then(|| tokio::time::interval(Duration::from_secs(args.report_every)));
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    // After a stall, one tick rather than a burst (the flood window counts real seconds).
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            guard = async { ebpf_log.as_mut().expect("guarded").readable_mut().await },
                if ebpf_log.is_some() => {
                let mut guard = guard.context("reading the eBPF log ring buffer")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                followed.update(&tracker, &[]);
                watch_floods(&tracker, &mut flood);
            }
            guard = async { link_events.as_mut().expect("guarded").readable_mut().await },
                if link_events.is_some() => {
                let mut guard = guard.context("waiting for link events")?;
                match guard.get_inner().drain() {
                    Ok(events) => followed.update(&tracker, events.as_slice()),
                    Err(e) => {
                        warn!("reading link events: {e}: interfaces are checked once a second");
                        drop(guard);
                        link_events = None;
                        continue;
                    }
                }
                guard.clear_ready();
            }
            Some(request) = requests.recv() => match request {
                http::Request::Metrics(answer) => {
                    let walk = reaper.view();
                    let walk = walk.as_ref().map(|view| WalkExport {
                        ports: &args.ports.0,
                        sides,
                        view,
                    });
                    let _ = answer.send(
                        exposition(&tracker, &flood, walk).map_err(|e| format!("{e:#}")),
                    );
                }
                http::Request::Health(answer) => {
                    let _ = answer.send(followed.health());
                }
            },
            _ = async { report.as_mut().expect("guarded").tick().await }, if report.is_some() => {
                match tracker.counters() {
                    Ok(totals) => for line in summary(&totals) { info!("{line}") },
                    Err(e) => warn!("reading counters: {}", error_chain(&e)),
                }
            }
        }
    }
    if let Some(server) = server {
        server.abort();
    }
    reaper.stop();
    if let Some(log) = ebpf_log.as_mut() {
        log.get_mut().flush();
    }
    let totals = tracker
        .counters()
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let attached: Vec<String> = tracker
        .attachments()
        .iter()
        .map(|a| a.iface.clone())
        .collect();
    drop(tracker);
    debug!("programs unloaded");
    info!("detached from {}", attached.join(", "));
    let mut out = std::io::stdout().lock();
    for line in summary(&totals) {
        writeln!(out, "{line}").context("writing the summary")?;
    }
    Ok(())
}

/// One `hook key=value ...` line per hook, every counter included.
fn summary(totals: &Totals) -> Vec<String> {
    Hook::ALL
        .iter()
        .map(|hook| {
            let c = totals.hook(*hook);
            let mut line = format!("{} packets={}", hook.name(), c.packets());
            for counter in Counter::ALL {
                line.push_str(&format!(" {}={}", counter.name(), c.get(counter)));
            }
            line
        })
        .collect()
}

/// Samples the per-port SYN tallies and logs ports whose flood flag changed.
fn watch_floods(tracker: &Tracker, flood: &mut FloodDetector) {
    let ports = match tracker.port_stats() {
        Ok(p) => p,
        Err(e) => {
            warn!("reading the SYN tallies: {}", error_chain(&e));
            return;
        }
    };
    for change in flood.update(flows::monotonic_ns(), &ports) {
        let w = change.window;
        if w.flooded {
            warn!(
                "SYN flood on port {}: {:.0} SYN/s, {:.1}% of handshakes completed",
                change.port,
                w.syn_rate,
                w.completion * 100.0
            );
        } else {
            info!(
                "SYN flood on port {} over: {:.0} SYN/s, {:.1}% completed",
                change.port,
                w.syn_rate,
                w.completion * 100.0
            );
        }
    }
}

/// The /metrics text, read from the kernel now.
fn exposition(
    tracker: &Tracker,
    flood: &FloodDetector,
    walk: Option<WalkExport<'_>>,
) -> Result<String> {
    let err = |e: tcp_user::error::Error| anyhow::anyhow!(error_chain(&e));
    let totals = tracker.counters().map_err(err)?;
    let metrics = tracker.metrics().map_err(err)?;
    let report = Report::from_kernel(&metrics, *totals.hook(Hook::XdpIngress));
    Ok(Exposition {
        report: &report,
        packets: Hook::ALL
            .iter()
            .map(|h| (h.name(), *totals.hook(*h)))
            .collect(),
        tables: tracker.tables(&metrics).map_err(err)?,
        flood_ports: flood.exposition(flows::monotonic_ns()),
        port_tallies: flood.port_tallies(flows::monotonic_ns()),
        walk,
        reconciled: Some([
            metrics.events.slots[event_slots::RECONCILED_REMOVED],
            metrics.events.slots[event_slots::RECONCILED_PICKED_UP],
        ]),
    }
    .text())
}

/// The pin directory `flows` and `stats` read (`dir`, or this namespace's default), with a
/// warning when no agent holds it: its figures are then those the last agent left.
fn pinned_dir(dir: Option<&std::path::Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => pins::default_dir().map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
    };
    if pins::held_by_an_agent(&dir) == Some(false) {
        warn!(
            "no agent holds {}: these are the figures the last agent left, not live ones",
            dir.display()
        );
    }
    Ok(dir)
}

fn stats(args: &StatsArgs) -> Result<()> {
    let err = |e: tcp_user::error::Error| anyhow::anyhow!(error_chain(&e));
    let pin_dir = pinned_dir(args.pin_dir.as_deref())?;
    let (totals, metrics) = tcp_user::counters::read_pinned(&pin_dir).map_err(err)?;
    let report = Report::from_kernel(&metrics, *totals.hook(Hook::XdpIngress));
    let text = match args.format {
        Format::Prometheus => report.prometheus_text(Hook::XdpIngress.name()),
        Format::Json => render_json(&report, &[]).context("rendering JSON")?,
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the report")?;
    Ok(())
}

/// The JSON document of `replay --format json` and `stats --format json`.
fn render_json(
    report: &Report,
    flows: &[tcp_user::replay::FlowJson],
) -> serde_json::Result<String> {
    let endpoints: Vec<_> = report
        .endpoints
        .iter()
        .map(|((state, role, side), n)| {
            serde_json::json!({"state": state.name(), "role": role.name(), "side": side.name(), "count": n})
        })
        .collect();
    let doc = serde_json::json!({
        "packets": report.packets.packets(),
        "counters": report,
        "endpoints": endpoints,
        "flows": flows,
    });
    Ok(serde_json::to_string_pretty(&doc)? + "\n")
}

fn list_flows(args: &FlowsArgs) -> Result<()> {
    let now = flows::monotonic_ns();
    let pin_dir = pinned_dir(args.pin_dir.as_deref())?;
    let records = flows::read_pinned(&pin_dir).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let filter = flows::Filter {
        state: args.state,
        port: args.port,
        addr: args.addr,
        side: args.side.map(|s| match s {
            SideArg::Local => Side::Local,
            SideArg::Remote => Side::Remote,
        }),
    };
    let views: Vec<FlowView> = records
        .iter()
        .map(|r| FlowView::new(r, now))
        .filter(|v| v.matches(&filter))
        .collect();
    let mut out = std::io::stdout().lock();
    let format = if args.json {
        FlowsFormat::Json
    } else {
        args.output
    };
    match format {
        FlowsFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &views).context("writing JSON")?;
            writeln!(out).context("writing JSON")?;
            return Ok(());
        }
        FlowsFormat::Ndjson => {
            for v in &views {
                serde_json::to_writer(&mut out, v).context("writing JSON")?;
                writeln!(out).context("writing JSON")?;
            }
            return Ok(());
        }
        FlowsFormat::Table => {}
    }
    writeln!(
        out,
        "{:<12} {:<7} {:<7} {:<46} {:<12} {:<7} {:<7} {:<46} {:>9} {:>9} TABLE",
        "STATE",
        "ROLE",
        "SIDE",
        "ENDPOINT",
        "PEER-STATE",
        "ROLE",
        "SIDE",
        "PEER",
        "IDLE",
        "KA-PROBES"
    )
    .context("writing")?;
    for v in &views {
        let [a, b] = &v.endpoints;
        writeln!(
            out,
            "{:<12} {:<7} {:<7} {:<46} {:<12} {:<7} {:<7} {:<46} {:>8.1}s {:>9} {}",
            a.state,
            a.role,
            a.side,
            a.address,
            b.state,
            b.role,
            b.side,
            b.address,
            v.idle_ms as f64 / 1000.0,
            format!("{}/{}", a.keepalive_probes, b.keepalive_probes),
            v.table.name()
        )
        .context("writing")?;
    }
    Ok(())
}

fn replay(args: &ReplayArgs) -> Result<()> {
    let timeouts = args.timeouts.timeouts();
    let replay = tcp_user::replay::replay_file(&args.capture, timeouts)?;
    if let tcp_user::capture::Ending::CutShort { frames } = replay.ending {
        warn!(
            "{}: the capture was cut short in the middle of a packet; replayed the {frames} \
             complete packets before it",
            args.capture.display()
        );
    }
    let text = match args.format {
        Format::Prometheus => replay.report.prometheus_text("replay"),
        Format::Json => {
            let flows: Vec<_> = replay
                .flows()
                .iter()
                .map(|(k, f)| tcp_user::replay::FlowJson::new(k, f))
                .collect();
            render_json(&replay.report, &flows).context("rendering JSON")?
        }
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the report")?;
    Ok(())
}
