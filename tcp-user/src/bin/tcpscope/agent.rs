//! `tcpscope run`: loads and attaches, serves the metrics, follows interfaces, expires and
//! reconciles, and detaches on SIGTERM or SIGINT.

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use log::{debug, info, warn};
use tcp_common::{
    counters::{Counter, Hook},
    event_counters::event_slots,
    state::Side,
};
use tcp_user::{
    counters::Totals,
    error::error_chain,
    exposition::{Exposition, WalkExport},
    flood::FloodDetector,
    flows, http, iface, links,
    loader::{LoadOptions, Mode, Tracker},
    pins::{self, PinDir},
    report::Report,
    selfstats::SelfStats,
    webconfig::WebConfig,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::cli::*;

/// The pin directory of a start in progress: removes what the start created when dropped
/// before the agent tracks (emptied once it does).
pub(crate) struct StartGuard(pub(crate) Option<PinDir>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take() {
            pins.discard();
        }
    }
}

pub(crate) async fn run(args: RunArgs) -> Result<()> {
    // Handlers first: a SIGTERM that arrives while loading or attaching must still end in a
    // clean detach, not in the default action (death with programs possibly left behind).
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // SIGHUP reloads the web configuration file; without one it keeps its default action.
    let mut sighup = match args.web_config_file {
        Some(_) => Some(signal(SignalKind::hangup()).context("installing the SIGHUP handler")?),
        None => None,
    };
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
    // The server's security settings, read (certificates and hashes checked) before anything
    // is loaded or attached.
    let web = match (&args.web_config_file, args.listen.0) {
        (Some(file), Some(_)) => WebConfig::load(file)?,
        (Some(_), None) => bail!("--web.config.file needs the metrics server (--listen is off)"),
        (None, _) => WebConfig::default(),
    };
    let pin_base = match args.pin_dir {
        Some(dir) => dir,
        None => pins::default_dir()?,
    };
    if let Some(line) = tcp_user::bpffs::describe(&tcp_user::bpffs::ensure(&pin_base, true)?) {
        info!("{line}");
    }
    // Held until exit. Until the agent tracks, any failure removes the pins this start
    // created (the guard drops after the tracker, which detaches first).
    let mut pins = StartGuard(Some(PinDir::acquire(&pin_base)?));
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
        Err(e) => bail!("{}{}", error_chain(&e), e.hint()),
    };
    let mut ebpf_log = match aya_log::EbpfLogger::init(tracker.ebpf_mut()) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring buffer map fd and keeps it open, unchanged,
            // for as long as it lives, and the AsyncFd owns the logger.
            let fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
            Some(fd.context("watching the eBPF log ring buffer")?)
        }
        Err(e) => {
            warn!("eBPF-side logging unavailable: {e}");
            None
        }
    };
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<http::Request>(16);
    let web_settings = http::WebSettings::default();
    // Bound before attaching: a port in use must not cost an attach and detach.
    let server = match args.listen.0 {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let scheme = if web.tls.is_some() { "https" } else { "http" };
            info!(
                "serving /metrics and /healthz on {scheme}://{addr} ({})",
                web.describe()
            );
            web_settings.replace(web);
            Some(tokio::spawn(http::serve(
                listener,
                requests_tx,
                http::Limits::DEFAULT,
                web_settings.clone(),
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
            Err(e) => bail!("{}{}", error_chain(&e), e.hint()),
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
    let selfstats = SelfStats::new();
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
    // A `tcpscope events` reader killed before it could lower its flag is noticed here, once
    // a second, so that the programs do not write records nobody reads for long.
    let mut events_reader = match tcp_user::events::ReaderWatch::open(&pin_base) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("`tcpscope events` unavailable: {}", error_chain(&e));
            None
        }
    };
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
            _ = async { sighup.as_mut().expect("guarded").recv().await }, if sighup.is_some() => {
                reload_web_config(args.web_config_file.as_deref().expect("with SIGHUP"), &web_settings);
            }
            guard = async { ebpf_log.as_mut().expect("guarded").readable_mut().await },
                if ebpf_log.is_some() => {
                let mut guard = guard.context("reading the eBPF log ring buffer")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                followed.update(&tracker, &[]);
                watch_floods(&tracker, &mut flood);
                if let Some(watch) = events_reader.as_mut() {
                    match watch.check() {
                        Ok(Some(pid)) => info!(
                            "the `tcpscope events` reader (pid {pid}) is gone: state changes off"
                        ),
                        Ok(None) => {}
                        Err(e) => warn!("checking the events reader: {}", error_chain(&e)),
                    }
                }
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
                        exposition(&tracker, &flood, walk, &selfstats, reaper.durations())
                            .map_err(|e| format!("{e:#}")),
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
    let totals = tracker.counters()?;
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

/// SIGHUP: reads the web configuration file again; a bad file keeps the settings in force.
fn reload_web_config(file: &std::path::Path, settings: &http::WebSettings) {
    match WebConfig::load(file) {
        Ok(config) => {
            info!(
                "SIGHUP: {} reloaded ({}); new connections use it",
                file.display(),
                config.describe()
            );
            settings.replace(config);
        }
        Err(e) => warn!("SIGHUP: {e:#}; the settings in force are kept"),
    }
}

/// One `hook key=value ...` line per hook, every counter included.
pub(crate) fn summary(totals: &Totals) -> Vec<String> {
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
pub(crate) fn watch_floods(tracker: &Tracker, flood: &mut FloodDetector) {
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

/// The /metrics text, read from the kernel now; the time of reading the maps is observed into
/// `selfstats` before the text is rendered, so the scrape histogram counts this scrape too.
pub(crate) fn exposition(
    tracker: &Tracker,
    flood: &FloodDetector,
    walk: Option<WalkExport<'_>>,
    selfstats: &SelfStats,
    reap_durations: &prometheus::Histogram,
) -> Result<String> {
    let started = Instant::now();
    let totals = tracker.counters()?;
    let metrics = tracker.metrics()?;
    let report = Report::from_kernel(&metrics, *totals.hook(Hook::XdpIngress));
    let tables = tracker.tables(&metrics)?;
    selfstats.observe_scrape(started.elapsed());
    Ok(Exposition {
        report: &report,
        packets: Hook::ALL
            .iter()
            .map(|h| (h.name(), *totals.hook(*h)))
            .collect(),
        tables,
        flood_ports: flood.exposition(flows::monotonic_ns()),
        port_tallies: flood.port_tallies(flows::monotonic_ns()),
        walk,
        reconciled: Some([
            metrics.events.slots[event_slots::RECONCILED_REMOVED],
            metrics.events.slots[event_slots::RECONCILED_PICKED_UP],
        ]),
        agent: selfstats.families(Some(reap_durations)),
        events_lost: Some(metrics.events.slots[event_slots::EVENTS_LOST]),
    }
    .text())
}
