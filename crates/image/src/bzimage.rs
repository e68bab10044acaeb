//! Reading an x86 `bzImage` (`vmlinuz`): the boot-protocol setup header, the
//! compressed payload it points at, and turning that payload back into the
//! ELF `vmlinux` that Firecracker and QEMU's PVH loader need.
//!
//! Debian's 6.1 cloud kernel is compressed with LZ4 in the *legacy* frame
//! format (`CONFIG_KERNEL_LZ4`, magic `02 21 4c 18`), which this module decodes
//! in-process. gzip, xz and zstd payloads (other kernels) go through the
//! system decompressors.

use std::process::Command;

use crate::cmd::{run_with_input, CommandError};
use crate::elf::{Elf, ElfError, EM_X86_64};

/// Legacy LZ4 frame magic (`lz4 -l`, what the kernel build uses).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Legacy LZ4 frames hold blocks of at most 8 MiB uncompressed.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Why a `vmlinuz` could not be turned into a `vmlinux`.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// No `HdrS` setup header.
    #[error("Not a bzImage (no HdrS setup header)")]
    NotBzImage,
    /// Boot protocol too old to describe its payload.
    #[error("Boot protocol {0:#06x} predates payload_offset (2.08)")]
    OldProtocol(u16),
    /// The payload offset/length point outside the file.
    #[error("bzImage payload lies outside the file")]
    PayloadOutOfBounds,
    /// The payload starts with no compression magic we know.
    #[error("Unknown compression (payload starts with {0})")]
    UnknownCompression(String),
    /// A compression that is known but not handled (bzip2, lzma, lzo).
    #[error("{0:?}-compressed kernels are not supported")]
    UnsupportedCompression(Compression),
    /// The LZ4 stream is malformed.
    #[error("Corrupt LZ4 payload: {0}")]
    Lz4(String),
    /// The decompressed size disagrees with the size the build appended.
    #[error("Decompressed {actual} bytes but the payload trailer says {expected}")]
    SizeMismatch {
        /// Size recorded in the payload's last four bytes.
        expected: u64,
        /// Size produced.
        actual: u64,
    },
    /// The system decompressor failed.
    #[error("Decompressing the payload")]
    Tool(#[from] CommandError),
    /// The decompressed payload is not a valid x86-64 ELF kernel.
    #[error("Decompressed payload is not an ELF kernel")]
    Elf(#[from] ElfError),
    /// The ELF is for another machine, or loads nothing.
    #[error("vmlinux is not a loadable x86-64 kernel (machine {machine}, {segments} PT_LOAD)")]
    NotLoadable {
        /// `e_machine`.
        machine: u16,
        /// Number of loadable segments.
        segments: usize,
    },
}

/// Compression formats the kernel build can use for its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `1f 8b`.
    Gzip,
    /// `BZh`.
    Bzip2,
    /// `5d 00 00`.
    Lzma,
    /// `fd 37 7a 58 5a 00`.
    Xz,
    /// `89 4c 5a 4f`.
    Lzo,
    /// Legacy LZ4 frame `02 21 4c 18`.
    Lz4,
    /// `28 b5 2f fd`.
    Zstd,
}

impl Compression {
    /// Identifies the compression from the first bytes of a stream.
    pub fn detect(data: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], Compression); 7] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0, 0], Compression::Lzma),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map(|(_, c)| *c)
    }
}

/// The parts of a bzImage this pipeline needs.
#[derive(Debug, Clone)]
pub struct BzImage<'a> {
    /// Boot protocol version (e.g. `0x20f`).
    pub protocol: u16,
    /// The kernel's version string (`6.1.0-… (builder) #1 SMP …`).
    pub version: Option<String>,
    /// The compressed payload, including the 4-byte size the build appends.
    pub payload: &'a [u8],
}

impl<'a> BzImage<'a> {
    /// Parses the setup header of a bzImage.
    pub fn parse(data: &'a [u8]) -> Result<Self, BzImageError> {
        if data.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
            return Err(BzImageError::NotBzImage);
        }
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let protocol = u16_at(0x206).ok_or(BzImageError::NotBzImage)?;
        if protocol < 0x208 {
            return Err(BzImageError::OldProtocol(protocol));
        }
        let setup_sects = match data.get(0x1f1).copied() {
            Some(0) => 4,
            Some(n) => usize::from(n),
            None => return Err(BzImageError::NotBzImage),
        };
        let offset = u32_at(0x248).ok_or(BzImageError::PayloadOutOfBounds)? as usize;
        let length = u32_at(0x24c).ok_or(BzImageError::PayloadOutOfBounds)? as usize;
        let start = (setup_sects + 1) * 512 + offset;
        let payload = data
            .get(start..start + length)
            .ok_or(BzImageError::PayloadOutOfBounds)?;
        let version = u16_at(0x20e)
            .filter(|p| *p != 0)
            .and_then(|p| data.get(usize::from(p) + 0x200..))
            .map(|s| {
                let end = s.iter().take(512).position(|b| *b == 0).unwrap_or(0);
                String::from_utf8_lossy(&s[..end]).into_owned()
            })
            .filter(|s| !s.is_empty());
        Ok(Self {
            protocol,
            version,
            payload,
        })
    }

    /// The kernel release (`uname -r`): the first word of the version string.
    pub fn release(&self) -> Option<&str> {
        self.version.as_deref()?.split_whitespace().next()
    }

    /// The payload's compression.
    pub fn compression(&self) -> Result<Compression, BzImageError> {
        Compression::detect(self.payload).ok_or_else(|| {
            let head: Vec<String> = self
                .payload
                .iter()
                .take(6)
                .map(|b| format!("{b:02x}"))
                .collect();
            BzImageError::UnknownCompression(head.join(" "))
        })
    }
}

/// Decodes a legacy LZ4 frame (a magic, then blocks each prefixed by their
/// compressed length). The kernel build appends the uncompressed size as a
/// final 4-byte word; when present it is checked.
pub fn decode_lz4_legacy(input: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let word = |pos: usize| {
        input
            .get(pos..pos + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if word(0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(BzImageError::Lz4("missing legacy frame magic".into()));
    }
    let mut pos = 4;
    let mut out = Vec::new();
    let mut trailer = None;
    while pos < input.len() {
        let Some(n) = word(pos) else {
            return Err(BzImageError::Lz4(format!(
                "truncated block header at {pos}"
            )));
        };
        if n == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        if pos + 4 == input.len() {
            // Exactly one word left: the size appended by the kernel build.
            trailer = Some(n);
            break;
        }
        pos += 4;
        let block = input.get(pos..pos + n as usize).ok_or_else(|| {
            BzImageError::Lz4(format!("block of {n} bytes at {pos} is truncated"))
        })?;
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let len = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| BzImageError::Lz4(format!("block at {pos}: {e}")))?;
        out.truncate(start + len);
        pos += n as usize;
    }
    if let Some(expected) = trailer {
        if u64::from(expected) != out.len() as u64 {
            return Err(BzImageError::SizeMismatch {
                expected: u64::from(expected),
                actual: out.len() as u64,
            });
        }
    }
    Ok(out)
}

/// Decompresses a kernel payload of the given format.
pub fn decompress(payload: &[u8], compression: Compression) -> Result<Vec<u8>, BzImageError> {
    // Every format but gzip gets the uncompressed size appended by the kernel
    // build (`size_append`); the standalone tools would call it garbage.
    let without_size = || {
        payload
            .get(..payload.len().saturating_sub(4))
            .unwrap_or(&[])
    };
    let tool = |program: &str, args: &[&str], input: &[u8]| {
        run_with_input(Command::new(program).args(args), input).map_err(BzImageError::from)
    };
    match compression {
        Compression::Lz4 => decode_lz4_legacy(payload),
        Compression::Gzip => tool("gzip", &["-dc"], payload),
        Compression::Xz => tool("xz", &["-dc", "--single-stream"], without_size()),
        Compression::Zstd => tool("zstd", &["-dcq"], without_size()),
        other => Err(BzImageError::UnsupportedCompression(other)),
    }
}

/// What [`extract_vmlinux`] produced.
#[derive(Debug, Clone)]
pub struct Vmlinux {
    /// The ELF bytes, trimmed to the ELF's own extent.
    pub elf: Vec<u8>,
    /// Payload compression found in the bzImage.
    pub compression: Compression,
    /// PVH entry point (present on kernels with `CONFIG_PVH`).
    pub pvh_entry: Option<u64>,
    /// Kernel release from the setup header.
    pub release: Option<String>,
}

/// Extracts and validates the ELF `vmlinux` inside a `vmlinuz`.
pub fn extract_vmlinux(vmlinuz: &[u8]) -> Result<Vmlinux, BzImageError> {
    let bz = BzImage::parse(vmlinuz)?;
    let compression = bz.compression()?;
    let mut elf_bytes = decompress(bz.payload, compression)?;
    let (extent, pvh_entry) = {
        let elf = Elf::parse(&elf_bytes)?;
        if elf.machine != EM_X86_64 || elf.load_segments() == 0 {
            return Err(BzImageError::NotLoadable {
                machine: elf.machine,
                segments: elf.load_segments(),
            });
        }
        (elf.extent(), elf.pvh_entry()?)
    };
    // The payload is `vmlinux.bin` followed by the relocation table; the
    // latter is for the decompressor only.
    elf_bytes.truncate(usize::try_from(extent).unwrap_or(elf_bytes.len()));
    Ok(Vmlinux {
        elf: elf_bytes,
        compression,
        pvh_entry,
        release: bz.release().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::sample_elf;

    fn lz4_legacy(data: &[u8], append_size: bool) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        if append_size {
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        out
    }

    /// A fake bzImage: 2 setup sectors, protocol 2.15, payload at offset 16.
    fn bzimage(payload: &[u8], version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 3 * 512 + 16];
        img[0x1f1] = 2;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img[0x20e..0x210].copy_from_slice(&(0x300u16 - 0x200).to_le_bytes());
        img[0x300..0x300 + version.len()].copy_from_slice(version.as_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn detects_magics() {
        assert_eq!(
            Compression::detect(&[0x02, 0x21, 0x4c, 0x18, 9]),
            Some(Compression::Lz4)
        );
        assert_eq!(
            Compression::detect(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::detect(b"\xfd7zXZ\0.."), Some(Compression::Xz));
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::detect(b"ELF"), None);
    }

    #[test]
    fn lz4_legacy_roundtrip_multi_block_with_trailer() {
        let data: Vec<u8> = (0..(LZ4_LEGACY_BLOCK + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        let enc = lz4_legacy(&data, true);
        assert_eq!(decode_lz4_legacy(&enc).expect("decodes"), data);
        let enc = lz4_legacy(&data, false);
        assert_eq!(decode_lz4_legacy(&enc).expect("decodes"), data);
    }

    #[test]
    fn lz4_legacy_rejects_wrong_trailer_and_truncation() {
        let mut enc = lz4_legacy(b"hello hello hello hello", true);
        let n = enc.len();
        enc[n - 4..].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            decode_lz4_legacy(&enc),
            Err(BzImageError::SizeMismatch {
                expected: 99,
                actual: 23
            })
        ));
        let enc = lz4_legacy(b"hello hello hello hello", false);
        assert!(matches!(
            decode_lz4_legacy(&enc[..enc.len() - 3]),
            Err(BzImageError::Lz4(_))
        ));
    }

    #[test]
    fn extracts_lz4_kernel_and_trims_relocs() {
        let elf = sample_elf(b"", Some(0x100_0000));
        let mut payload_plain = elf.clone();
        payload_plain.extend_from_slice(&[0xEE; 64]); // relocation table
        let img = bzimage(
            &lz4_legacy(&payload_plain, true),
            "6.1.0-9-cloud-amd64 (x@y) #1 SMP",
        );
        let v = extract_vmlinux(&img).expect("extracts");
        assert_eq!(v.elf, elf);
        assert_eq!(v.compression, Compression::Lz4);
        assert_eq!(v.pvh_entry, Some(0x100_0000));
        assert_eq!(v.release.as_deref(), Some("6.1.0-9-cloud-amd64"));
    }

    fn with_size(mut compressed: Vec<u8>, plain_len: usize) -> Vec<u8> {
        compressed.extend_from_slice(&(plain_len as u32).to_le_bytes());
        compressed
    }

    #[test]
    fn extracts_tool_compressed_kernels() {
        let elf = sample_elf(b"", None);
        for (tool, args, compression, appended) in [
            ("gzip", ["-c", "-9"], Compression::Gzip, false),
            ("xz", ["-c", "--check=crc32"], Compression::Xz, true),
            ("zstd", ["-c", "-q"], Compression::Zstd, true),
        ] {
            let c = run_with_input(Command::new(tool).args(args), &elf).expect("compressor");
            let payload = if appended { with_size(c, elf.len()) } else { c };
            let v = extract_vmlinux(&bzimage(&payload, "6.1.0-x")).expect("extracts");
            assert_eq!(v.elf, elf, "{tool}");
            assert_eq!(v.compression, compression);
        }
    }

    #[test]
    fn rejects_non_kernels() {
        assert!(matches!(
            extract_vmlinux(b"nope"),
            Err(BzImageError::NotBzImage)
        ));
        let img = bzimage(&lz4_legacy(b"not an elf at all", true), "v");
        assert!(matches!(
            extract_vmlinux(&img),
            Err(BzImageError::Elf(ElfError::BadMagic))
        ));
        let mut img = bzimage(b"\x02\x21\x4c\x18", "v");
        img[0x24c..0x250].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(
            BzImage::parse(&img),
            Err(BzImageError::PayloadOutOfBounds)
        ));
    }
}
