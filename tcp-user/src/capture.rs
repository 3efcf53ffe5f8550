//! Reading frames and their timestamps from pcap and pcapng files: Ethernet, and the Linux
//! "cooked" headers (`LINUX_SLL`, `LINUX_SLL2`) that `tcpdump -i any` writes, rewritten as
//! Ethernet frames for the parser.

use std::{
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
};

use pcap_file::{
    DataLink, PcapError,
    pcap::PcapReader,
    pcapng::{
        Block, PcapNgReader,
        blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
    },
};

/// What can fail while reading a capture: the file, and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file cannot be opened.
    #[error("opening {}", path.display())]
    Open {
        /// The capture.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than any capture header.
    #[error("{}: too short for a capture file", path.display())]
    TooShort {
        /// The capture.
        path: PathBuf,
        /// The read that came short.
        #[source]
        source: std::io::Error,
    },
    /// A link layer other than those read.
    #[error(
        "{}: link type {link:?} is not supported (Ethernet, LINUX_SLL and LINUX_SLL2 are)",
        path.display()
    )]
    LinkType {
        /// The capture.
        path: PathBuf,
        /// Its link type.
        link: DataLink,
    },
    /// A header, record or block that cannot be parsed (other than cut short at the end).
    #[error("{}: {what}", path.display())]
    Corrupt {
        /// The capture.
        path: PathBuf,
        /// What could not be read, e.g. "corrupt packet record".
        what: &'static str,
        /// The parser's complaint.
        #[source]
        source: PcapError,
    },
    /// A pcapng packet that names an interface no block declared.
    #[error("{}: packet for an undeclared interface", path.display())]
    UndeclaredInterface {
        /// The capture.
        path: PathBuf,
    },
}

/// Results of reading a capture.
pub type Result<T, E = CaptureError> = std::result::Result<T, E>;

fn corrupt(path: &Path, what: &'static str) -> impl FnOnce(PcapError) -> CaptureError {
    let path = path.to_owned();
    move |source| CaptureError::Corrupt { path, what, source }
}

/// How a capture file ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// After its last complete record.
    Complete,
    /// In the middle of a record (a capture cut short: a full disk, a killed writer, a copy
    /// in progress), after `frames` complete packets, which were all read. tshark reads the
    /// same packets and warns the same way. In a pcap file only a record that the end of the
    /// file cuts counts (a corrupt length in the middle is an error); in pcapng, any block
    /// that the reader finds running past the end of the file.
    CutShort {
        /// Complete packets read before the cut.
        frames: u64,
    },
}

/// Calls `each(timestamp_ns, frame)` for every packet of the capture, in file order, each
/// frame as Ethernet.
///
/// # Errors
/// When the file cannot be read, is neither pcap nor pcapng, holds a link type other than
/// Ethernet, `LINUX_SLL` or `LINUX_SLL2`, or a record is corrupt (other than cut short at the
/// end of the file, which is [`Ending::CutShort`]).
pub fn for_each_frame(path: &Path, mut each: impl FnMut(u64, &[u8])) -> Result<Ending> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read as _;
        File::open(path)
            .map_err(|source| CaptureError::Open {
                path: path.to_owned(),
                source,
            })?
            .read_exact(&mut magic)
            .map_err(|source| CaptureError::TooShort {
                path: path.to_owned(),
                source,
            })?;
    }
    let file = BufReader::new(File::open(path).map_err(|source| CaptureError::Open {
        path: path.to_owned(),
        source,
    })?);
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        read_pcapng(path, file, &mut each)
    } else {
        read_pcap(path, file, &mut each)
    }
}

/// The link layers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Ethernet,
    /// `LINUX_SLL`: a 16-byte header whose last two bytes are the EtherType.
    Sll,
    /// `LINUX_SLL2`: a 20-byte header whose first two bytes are the EtherType.
    Sll2,
}

impl Link {
    fn of(path: &Path, link: DataLink) -> Result<Self> {
        Ok(match link {
            DataLink::ETHERNET => Self::Ethernet,
            DataLink::LINUX_SLL => Self::Sll,
            DataLink::LINUX_SLL2 => Self::Sll2,
            other => {
                return Err(CaptureError::LinkType {
                    path: path.to_owned(),
                    link: other,
                });
            }
        })
    }

    /// `data` as an Ethernet frame: itself, or its payload behind a header of zero addresses
    /// and the cooked header's EtherType, built in `buf`. A cooked frame too short for its
    /// header becomes an empty frame (counted as malformed, like a runt Ethernet frame).
    fn ethernet<'a>(self, data: &'a [u8], buf: &'a mut Vec<u8>) -> &'a [u8] {
        let (header, ethertype_at) = match self {
            Self::Ethernet => return data,
            Self::Sll => (16, 14),
            Self::Sll2 => (20, 0),
        };
        if data.len() < header {
            return &[];
        }
        buf.clear();
        buf.extend_from_slice(&[0; 12]);
        buf.extend_from_slice(&data[ethertype_at..ethertype_at + 2]);
        buf.extend_from_slice(&data[header..]);
        buf
    }
}

/// Whether a read error is the end of the file inside a record.
fn cut_short(e: &PcapError) -> bool {
    matches!(e, PcapError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof)
}

fn read_pcap(
    path: &Path,
    file: BufReader<File>,
    each: &mut impl FnMut(u64, &[u8]),
) -> Result<Ending> {
    let mut reader = PcapReader::new(file).map_err(corrupt(path, "not a pcap or pcapng file"))?;
    let header = reader.header();
    let link = Link::of(path, header.datalink)?;
    let (mut buf, mut frames) = (Vec::new(), 0u64);
    // Where the next record starts: the file header is 24 bytes, each record header 16.
    let mut offset = 24u64;
    while let Some(packet) = reader.next_packet() {
        let packet = match packet {
            Ok(p) => p,
            Err(e) if cut_short(&e) && pcap_record_cut(path, offset, &header) => {
                return Ok(Ending::CutShort { frames });
            }
            Err(e) => {
                return Err(corrupt(path, "corrupt packet record")(e));
            }
        };
        offset += 16 + packet.data.len() as u64;
        each(
            duration_ns(packet.timestamp),
            link.ethernet(&packet.data, &mut buf),
        );
        frames += 1;
    }
    Ok(Ending::Complete)
}

/// Whether the pcap record at `offset` is one the end of the file cut: its header cut, or its
/// declared length (a plausible one: at most the snapshot length, or 256 KiB) running past
/// the end. A record whose length field is corrupt in the middle of a file is not.
fn pcap_record_cut(path: &Path, offset: u64, header: &pcap_file::pcap::PcapHeader) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    if len.saturating_sub(offset) < 16 {
        return true;
    }
    let mut record = [0u8; 16];
    if f.seek(SeekFrom::Start(offset)).is_err() || f.read_exact(&mut record).is_err() {
        return false;
    }
    let field = [record[8], record[9], record[10], record[11]];
    let included = u64::from(match header.endianness {
        pcap_file::Endianness::Big => u32::from_be_bytes(field),
        pcap_file::Endianness::Little => u32::from_le_bytes(field),
    });
    let plausible = included <= u64::from(header.snaplen).max(256 * 1024);
    plausible && offset + 16 + included > len
}

fn read_pcapng(
    path: &Path,
    file: BufReader<File>,
    each: &mut impl FnMut(u64, &[u8]),
) -> Result<Ending> {
    let mut reader = PcapNgReader::new(file).map_err(corrupt(path, "corrupt pcapng header"))?;
    let (mut buf, mut frames) = (Vec::new(), 0u64);
    while let Some(block) = reader.next_block() {
        let block = match block {
            Ok(b) => b,
            Err(e) if cut_short(&e) => return Ok(Ending::CutShort { frames }),
            Err(e) => {
                return Err(corrupt(path, "corrupt pcapng block")(e));
            }
        };
        let Block::EnhancedPacket(packet) = block else {
            continue;
        };
        let packet = packet.into_owned();
        let Some(iface) = reader.packet_interface(&packet) else {
            return Err(CaptureError::UndeclaredInterface {
                path: path.to_owned(),
            });
        };
        let link = Link::of(path, iface.linktype)?;
        // pcap-file hands the raw timestamp units over as nanoseconds; scale them by the
        // interface's resolution (default: microseconds).
        let raw = duration_ns(packet.timestamp);
        each(
            scale_units(raw, ts_resolution(iface)),
            link.ethernet(&packet.data, &mut buf),
        );
        frames += 1;
    }
    Ok(Ending::Complete)
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
    use super::{Link, scale_units};

    #[test]
    fn cooked_headers_become_ethernet() {
        let payload = [0x45u8, 0, 0, 20];
        let mut sll = vec![0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00];
        sll.extend_from_slice(&payload);
        let mut sll2 = vec![
            0x86, 0xdd, 0, 0, 0, 0, 0, 2, 0, 1, 4, 6, 1, 2, 3, 4, 5, 6, 0, 0,
        ];
        sll2.extend_from_slice(&payload);
        let mut buf = Vec::new();
        let eth = Link::Sll.ethernet(&sll, &mut buf).to_vec();
        assert_eq!(&eth[12..14], &[0x08, 0x00]);
        assert_eq!(&eth[14..], &payload);
        let eth = Link::Sll2.ethernet(&sll2, &mut buf).to_vec();
        assert_eq!(&eth[12..14], &[0x86, 0xdd]);
        assert_eq!(&eth[14..], &payload);
        assert!(Link::Sll2.ethernet(&sll2[..19], &mut buf).is_empty());
        assert_eq!(Link::Ethernet.ethernet(&sll, &mut buf), &sll[..]);
    }

    #[test]
    fn timestamp_resolutions() {
        assert_eq!(scale_units(1_500_000, 6), 1_500_000_000);
        assert_eq!(scale_units(7, 9), 7);
        assert_eq!(scale_units(12_000, 12), 12);
        assert_eq!(scale_units(1 << 20, 0x80 | 20), 1_000_000_000);
    }
}
