//! Reading Ethernet frames and their timestamps from pcap and pcapng files.

use std::{fs::File, io::BufReader, path::Path};

use anyhow::{Context as _, Result, bail};
use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{
        Block, PcapNgReader,
        blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
    },
};

/// Calls `each(timestamp_ns, frame)` for every packet of the capture, in file order.
///
/// # Errors
/// When the file cannot be read, is neither pcap nor pcapng, or holds a link type other than
/// Ethernet.
pub fn for_each_frame(path: &Path, mut each: impl FnMut(u64, &[u8])) -> Result<()> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read as _;
        File::open(path)
            .with_context(|| format!("opening {}", path.display()))?
            .read_exact(&mut magic)
            .with_context(|| format!("{}: too short for a capture file", path.display()))?;
    }
    let file =
        BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        read_pcapng(path, file, &mut each)
    } else {
        read_pcap(path, file, &mut each)
    }
}

fn read_pcap(path: &Path, file: BufReader<File>, each: &mut impl FnMut(u64, &[u8])) -> Result<()> {
    let mut reader = PcapReader::new(file)
        .with_context(|| format!("{}: not a pcap or pcapng file", path.display()))?;
    let link = reader.header().datalink;
    if link != DataLink::ETHERNET {
        bail!(
            "{}: link type {link:?} is not supported (Ethernet only)",
            path.display()
        );
    }
    while let Some(packet) = reader.next_packet() {
        let packet =
            packet.with_context(|| format!("{}: corrupt packet record", path.display()))?;
        each(duration_ns(packet.timestamp), &packet.data);
    }
    Ok(())
}

fn read_pcapng(
    path: &Path,
    file: BufReader<File>,
    each: &mut impl FnMut(u64, &[u8]),
) -> Result<()> {
    let mut reader = PcapNgReader::new(file)
        .with_context(|| format!("{}: corrupt pcapng header", path.display()))?;
    while let Some(block) = reader.next_block() {
        let block = block.with_context(|| format!("{}: corrupt pcapng block", path.display()))?;
        let Block::EnhancedPacket(packet) = block else {
            continue;
        };
        let packet = packet.into_owned();
        let Some(iface) = reader.packet_interface(&packet) else {
            bail!("{}: packet for an undeclared interface", path.display());
        };
        if iface.linktype != DataLink::ETHERNET {
            bail!(
                "{}: link type {:?} is not supported (Ethernet only)",
                path.display(),
                iface.linktype
            );
        }
        // pcap-file hands the raw timestamp units over as nanoseconds; scale them by the
        // interface's resolution (default: microseconds).
        let raw = duration_ns(packet.timestamp);
        each(scale_units(raw, ts_resolution(iface)), &packet.data);
    }
    Ok(())
}

fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The `if_tsresol` option (RFC draft pcapng §4.2): bit 7 clear, a negative power of 10;
/// set, a negative power of 2. Absent: 6 (microseconds).
fn ts_resolution(iface: &InterfaceDescriptionBlock<'_>) -> u8 {
    iface
        .options
        .iter()
        .find_map(|o| match o {
            InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
            _ => None,
        })
        .unwrap_or(6)
}

/// Converts `raw` timestamp units of resolution `resol` to nanoseconds.
fn scale_units(raw: u64, resol: u8) -> u64 {
    let exp = u32::from(resol & 0x7f);
    if resol & 0x80 == 0 {
        if exp <= 9 {
            raw.saturating_mul(10u64.pow(9 - exp))
        } else {
            raw / 10u64.saturating_pow(exp - 9)
        }
    } else {
        let units_per_s = 1u128.checked_shl(exp).unwrap_or(u128::MAX);
        u64::try_from(u128::from(raw) * 1_000_000_000 / units_per_s).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::scale_units;

    #[test]
    fn timestamp_resolutions() {
        assert_eq!(scale_units(1_500_000, 6), 1_500_000_000);
        assert_eq!(scale_units(7, 9), 7);
        assert_eq!(scale_units(12_000, 12), 12);
        assert_eq!(scale_units(1 << 20, 0x80 | 20), 1_000_000_000);
    }
}
