//! What the commands other than `run` print: `stats` (the exposition or JSON from the pins),
//! `flows` (a table or JSON) and `replay`.

use std::{io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};
use log::warn;
use tcp_common::{counters::Hook, state::Side};
use tcp_user::{
    flows::{self, FlowView},
    pins,
    report::Report,
};

use crate::cli::*;

/// The pin directory `flows` and `stats` read (`dir`, or this namespace's default), with a
/// warning when no agent holds it: its figures are then those the last agent left.
pub(crate) fn pinned_dir(dir: Option<&std::path::Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => pins::default_dir()?,
    };
    if let Some(line) = tcp_user::bpffs::describe(&tcp_user::bpffs::ensure(&dir, false)?) {
        log::info!("{line}");
    }
    if pins::held_by_an_agent(&dir) == Some(false) {
        warn!(
            "no agent holds {}: these are the figures the last agent left, not live ones",
            dir.display()
        );
    }
    Ok(dir)
}

pub(crate) fn stats(args: &StatsArgs) -> Result<()> {
    let pin_dir = pinned_dir(args.pin_dir.as_deref())?;
    let (totals, metrics) = tcp_user::counters::read_pinned(&pin_dir)?;
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
pub(crate) fn render_json(report: &Report, flows: &[FlowView]) -> serde_json::Result<String> {
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

pub(crate) fn list_flows(args: &FlowsArgs) -> Result<()> {
    let now = flows::monotonic_ns();
    let pin_dir = pinned_dir(args.pin_dir.as_deref())?;
    let records = flows::read_pinned(&pin_dir)?;
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

pub(crate) fn replay(args: &ReplayArgs) -> Result<()> {
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
            let now = replay.now_ns();
            let flows: Vec<_> = replay
                .records()
                .iter()
                .map(|r| FlowView::new(r, now))
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
