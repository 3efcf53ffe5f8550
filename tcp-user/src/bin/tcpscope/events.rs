//! `tcpscope events`: the running agent's state changes, as they happen.

use std::{io, time::Duration};

use anyhow::{Context as _, Result, bail};
use log::{debug, info, warn};
use tcp_user::{
    error::{Error, error_chain},
    events::{self, EventView, Filter, Reader},
    pins,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::cli::*;

/// What one drain of the ring buffer ended with.
enum Drained {
    /// Read to the end.
    More,
    /// Stdout is closed (`| head`): stop.
    Closed,
}

pub(crate) async fn events(args: &EventsArgs) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let base = match &args.pin_dir {
        Some(d) => d.clone(),
        None => pins::default_dir()?,
    };
    tcp_user::bpffs::ensure(&base, false)?;
    if pins::held_by_an_agent(&base) != Some(true) {
        bail!(
            "no tcpscope agent is running with its pins in {} (start `tcpscope run` in this \
             network namespace, or name its --pin-dir)",
            base.display()
        );
    }
    let reader = match Reader::attach(&base) {
        Ok(r) => r,
        Err(Error::NotPinned { path, .. }) => bail!(
            "the agent holding {} has no event stream ({} is missing): it runs an older \
             build; restart it with this one",
            base.display(),
            path.display()
        ),
        Err(e) => bail!("{}{}", error_chain(&e), e.hint()),
    };
    let lost_at_start = events::lost(&base)?;
    let offset = events::realtime_offset_ns();
    let filter = Filter {
        port: args.port,
        state: args.state,
    };
    // SAFETY: the reader owns the ring buffer's descriptor and keeps it open, unchanged, for as
    // long as it lives, and the AsyncFd owns the reader.
    let mut ring = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .context("watching the event ring buffer")?;
    info!(
        "reading the state changes of the agent at {}; stop with SIGINT or SIGTERM",
        base.display()
    );
    let mut out = io::stdout().lock();
    let mut shown: u64 = 0;
    let mut lost_seen = lost_at_start;
    let mut agent_present = true;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let drained = tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for the event ring buffer")?;
                let drained = drain(guard.get_inner_mut(), &filter, offset, args.output, &mut out, &mut shown)?;
                guard.clear_ready();
                drained
            }
            _ = ticker.tick() => {
                let drained = drain(ring.get_mut(), &filter, offset, args.output, &mut out, &mut shown)?;
                match events::lost(&base) {
                    Ok(lost) if lost > lost_seen => {
                        warn!(
                            "{} records of state changes lost: the ring buffer was full (this \
                             reader fell behind); {} lost since it started",
                            lost - lost_seen,
                            lost - lost_at_start
                        );
                        lost_seen = lost;
                    }
                    Ok(_) => {}
                    Err(e) => debug!("reading the lost count: {}", error_chain(&e)),
                }
                match ring.get_mut().raise() {
                    Ok(true) => debug!("the reader flag was cleared meanwhile: raised again"),
                    Ok(false) => {}
                    Err(e) => warn!("raising the reader flag: {}", error_chain(&e)),
                }
                let present = pins::held_by_an_agent(&base) == Some(true);
                if present != agent_present {
                    if present {
                        info!("an agent holds {} again: its state changes follow", base.display());
                    } else {
                        warn!(
                            "no agent holds {} any more: waiting for one (the pins keep the stream)",
                            base.display()
                        );
                    }
                    agent_present = present;
                }
                drained
            }
        };
        if matches!(drained, Drained::Closed) {
            break;
        }
    }
    // The flag comes down with the reader (its Drop), then the last count.
    drop(ring);
    let lost = events::lost(&base).map_or(lost_seen, |l| l.max(lost_seen)) - lost_at_start;
    eprintln!("tcpscope events: {shown} state changes shown, {lost} records lost");
    Ok(())
}

/// Prints every record the ring holds that passes the filter, one line each, flushed.
fn drain(
    reader: &mut Reader,
    filter: &Filter,
    offset: i128,
    format: EventsFormat,
    out: &mut impl io::Write,
    shown: &mut u64,
) -> Result<Drained> {
    while let Some(t) = reader.next_record() {
        for view in EventView::of(&t, offset) {
            if !filter.matches(&view) {
                continue;
            }
            let line = match format {
                EventsFormat::Text => view.human(),
                EventsFormat::Ndjson => serde_json::to_string(&view).context("rendering JSON")?,
            };
            match writeln!(out, "{line}").and_then(|()| out.flush()) {
                Ok(()) => *shown += 1,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(Drained::Closed),
                Err(e) => return Err(e).context("writing the events"),
            }
        }
    }
    Ok(Drained::More)
}
