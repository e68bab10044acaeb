//! A minimal, bounds-checked ELF64 little-endian reader: just enough to
//! validate an extracted `vmlinux` (machine, loadable segments, PVH entry
//! note, file extent) and to read a kernel module's `.modinfo` section.

/// `e_machine` value of x86-64.
pub const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const SHT_NOBITS: u32 = 8;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point QEMU microvm and
/// Firecracker jump to when booting an uncompressed kernel.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why bytes are not a usable ELF64 file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// No `\x7fELF` magic.
    #[error("Not an ELF file")]
    BadMagic,
    /// Not 64-bit little-endian.
    #[error("Not a 64-bit little-endian ELF file (class {class}, data {data})")]
    UnsupportedClass {
        /// `EI_CLASS`.
        class: u8,
        /// `EI_DATA`.
        data: u8,
    },
    /// A header or table points outside the file.
    #[error("ELF {what} lies outside the file")]
    OutOfBounds {
        /// Which structure.
        what: &'static str,
    },
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(d: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(off..off + 8)?.try_into().ok()?))
}

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    /// `p_type`.
    pub kind: u32,
    /// `p_offset`.
    pub offset: u64,
    /// `p_filesz`.
    pub file_size: u64,
}

/// One section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionHeader {
    /// Offset of the name in the section-name string table.
    pub name: u32,
    /// `sh_type`.
    pub kind: u32,
    /// `sh_offset`.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
}

/// A parsed view over ELF64 bytes.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    data: &'a [u8],
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// Program headers.
    pub programs: Vec<ProgramHeader>,
    /// Section headers.
    pub sections: Vec<SectionHeader>,
    shstrndx: usize,
    tables_end: u64,
}

fn table(d: &[u8], off: u64, num: u16, entsize: u16, what: &'static str) -> Result<u64, ElfError> {
    let end = off
        .checked_add(u64::from(num) * u64::from(entsize))
        .ok_or(ElfError::OutOfBounds { what })?;
    if num > 0 && end > d.len() as u64 {
        return Err(ElfError::OutOfBounds { what });
    }
    Ok(if num > 0 { end } else { 0 })
}

impl<'a> Elf<'a> {
    /// Parses the ELF header, program headers and section headers.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err(ElfError::BadMagic);
        }
        let oob = |what| ElfError::OutOfBounds { what };
        let (class, endian) = (data.get(4).copied(), data.get(5).copied());
        if class != Some(2) || endian != Some(1) {
            return Err(ElfError::UnsupportedClass {
                class: class.unwrap_or(0),
                data: endian.unwrap_or(0),
            });
        }
        let hdr = |off| u64_at(data, off).ok_or(oob("header"));
        let hdr16 = |off| u16_at(data, off).ok_or(oob("header"));
        let machine = hdr16(18)?;
        let entry = hdr(24)?;
        let (phoff, shoff) = (hdr(32)?, hdr(40)?);
        let (phentsize, phnum) = (hdr16(54)?, hdr16(56)?);
        let (shentsize, shnum, shstrndx) = (hdr16(58)?, hdr16(60)?, hdr16(62)?);
        if (phnum > 0 && phentsize < 56) || (shnum > 0 && shentsize < 64) {
            return Err(oob("header"));
        }
        let ph_end = table(data, phoff, phnum, phentsize, "program header table")?;
        let sh_end = table(data, shoff, shnum, shentsize, "section header table")?;
        let mut programs = Vec::with_capacity(usize::from(phnum));
        for i in 0..u64::from(phnum) {
            let base = usize::try_from(phoff + i * u64::from(phentsize))
                .map_err(|_| oob("program header"))?;
            let ph = |off| u64_at(data, base + off).ok_or(oob("program header"));
            programs.push(ProgramHeader {
                kind: u32_at(data, base).ok_or(oob("program header"))?,
                offset: ph(8)?,
                file_size: ph(32)?,
            });
        }
        let mut sections = Vec::with_capacity(usize::from(shnum));
        for i in 0..u64::from(shnum) {
            let base = usize::try_from(shoff + i * u64::from(shentsize))
                .map_err(|_| oob("section header"))?;
            let sh32 = |off| u32_at(data, base + off).ok_or(oob("section header"));
            let sh64 = |off| u64_at(data, base + off).ok_or(oob("section header"));
            sections.push(SectionHeader {
                name: sh32(0)?,
                kind: sh32(4)?,
                offset: sh64(24)?,
                size: sh64(32)?,
            });
        }
        Ok(Self {
            data,
            machine,
            entry,
            programs,
            sections,
            shstrndx: usize::from(shstrndx),
            tables_end: ph_end.max(sh_end),
        })
    }

    fn slice(&self, offset: u64, size: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
        let start = usize::try_from(offset).map_err(|_| ElfError::OutOfBounds { what })?;
        let len = usize::try_from(size).map_err(|_| ElfError::OutOfBounds { what })?;
        let end = start
            .checked_add(len)
            .ok_or(ElfError::OutOfBounds { what })?;
        self.data
            .get(start..end)
            .ok_or(ElfError::OutOfBounds { what })
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let Some(strtab) = self.sections.get(self.shstrndx) else {
            return Ok(None);
        };
        let names = self.slice(strtab.offset, strtab.size, "section name table")?;
        for sh in &self.sections {
            let Some(rest) = names.get(sh.name as usize..) else {
                continue;
            };
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                if sh.kind == SHT_NOBITS {
                    return Ok(Some(&[]));
                }
                return self.slice(sh.offset, sh.size, "section").map(Some);
            }
        }
        Ok(None)
    }

    /// Number of `PT_LOAD` segments.
    pub fn load_segments(&self) -> usize {
        self.programs.iter().filter(|p| p.kind == PT_LOAD).count()
    }

    /// The byte length the ELF structures actually cover: headers, tables,
    /// segments and sections. Bytes past it (the bzImage payload appends the
    /// relocation table to `vmlinux`) are not part of the ELF file.
    pub fn extent(&self) -> u64 {
        let segs = self
            .programs
            .iter()
            .map(|p| p.offset.saturating_add(p.file_size));
        let secs = self
            .sections
            .iter()
            .filter(|s| s.kind != SHT_NOBITS)
            .map(|s| s.offset.saturating_add(s.size));
        segs.chain(secs)
            .fold(self.tables_end.max(64), u64::max)
            .min(self.data.len() as u64)
    }

    /// The PVH entry point from the `Xen` `PHYS32_ENTRY` note, if present.
    pub fn pvh_entry(&self) -> Result<Option<u64>, ElfError> {
        for ph in self.programs.iter().filter(|p| p.kind == PT_NOTE) {
            let notes = self.slice(ph.offset, ph.file_size, "note segment")?;
            let mut pos = 0usize;
            while pos + 12 <= notes.len() {
                let oob = ElfError::OutOfBounds { what: "note" };
                let namesz = u32_at(notes, pos).ok_or(oob.clone())? as usize;
                let descsz = u32_at(notes, pos + 4).ok_or(oob.clone())? as usize;
                let kind = u32_at(notes, pos + 8).ok_or(oob.clone())?;
                let name_start = pos + 12;
                let desc_start = name_start + namesz.next_multiple_of(4);
                let next = desc_start + descsz.next_multiple_of(4);
                let name = notes
                    .get(name_start..name_start + namesz)
                    .ok_or(oob.clone())?;
                let desc = notes.get(desc_start..desc_start + descsz).ok_or(oob)?;
                if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                    return Ok(match descsz {
                        4 => u32_at(desc, 0).map(u64::from),
                        8 => u64_at(desc, 0),
                        _ => None,
                    });
                }
                pos = next;
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a small ELF64 file: one PT_LOAD, one PT_NOTE with a PVH note,
    /// and sections `.text`, `.modinfo` and `.shstrtab`.
    pub(crate) fn sample_elf(modinfo: &[u8], pvh: Option<u64>) -> Vec<u8> {
        let mut note = Vec::new();
        if let Some(entry) = pvh {
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&8u32.to_le_bytes());
            note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let text = [0x90u8; 16];
        let shstrtab = b"\0.text\0.modinfo\0.shstrtab\0";
        let mut body = Vec::new();
        let base = 64 + 2 * 56;
        let text_off = base;
        body.extend_from_slice(&text);
        let note_off = base + body.len();
        body.extend_from_slice(&note);
        let modinfo_off = base + body.len();
        body.extend_from_slice(modinfo);
        let strtab_off = base + body.len();
        body.extend_from_slice(shstrtab);
        while (base + body.len()) % 8 != 0 {
            body.push(0);
        }
        let shoff = base + body.len();
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // e_type
        f.extend_from_slice(&EM_X86_64.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&0x1000u64.to_le_bytes()); // entry
        f.extend_from_slice(&64u64.to_le_bytes()); // phoff
        f.extend_from_slice(&(shoff as u64).to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 2, 64, 4, 3] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        for (kind, off, size) in [
            (PT_LOAD, text_off, text.len()),
            (PT_NOTE, note_off, note.len()),
        ] {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&(off as u64).to_le_bytes());
            f.extend_from_slice(&[0u8; 16]);
            f.extend_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&0u64.to_le_bytes());
        }
        f.extend_from_slice(&body);
        let mut sh = |name: u32, kind: u32, off: usize, size: usize| {
            f.extend_from_slice(&name.to_le_bytes());
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&[0u8; 16]);
            f.extend_from_slice(&(off as u64).to_le_bytes());
            f.extend_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&[0u8; 24]);
        };
        sh(0, 0, 0, 0);
        sh(1, 1, text_off, text.len());
        sh(7, 1, modinfo_off, modinfo.len());
        sh(16, 3, strtab_off, shstrtab.len());
        f
    }

    #[test]
    fn parses_sample() {
        let bytes = sample_elf(b"name=foo\0", Some(0x1234));
        let elf = Elf::parse(&bytes).expect("parses");
        assert_eq!(elf.machine, EM_X86_64);
        assert_eq!(elf.load_segments(), 1);
        assert_eq!(
            elf.section(".modinfo").unwrap(),
            Some(b"name=foo\0".as_slice())
        );
        assert_eq!(elf.section(".missing").unwrap(), None);
        assert_eq!(elf.pvh_entry().unwrap(), Some(0x1234));
        assert_eq!(elf.extent(), bytes.len() as u64);
    }

    #[test]
    fn extent_ignores_trailing_bytes() {
        let mut bytes = sample_elf(b"", None);
        let len = bytes.len() as u64;
        bytes.extend_from_slice(&[0xAA; 100]);
        let elf = Elf::parse(&bytes).expect("parses");
        assert_eq!(elf.extent(), len);
        assert_eq!(elf.pvh_entry().unwrap(), None);
    }

    #[test]
    fn rejects_non_elf_and_32_bit() {
        assert_eq!(Elf::parse(b"MZ\0\0").unwrap_err(), ElfError::BadMagic);
        let mut bytes = sample_elf(b"", None);
        bytes[4] = 1;
        assert!(matches!(
            Elf::parse(&bytes),
            Err(ElfError::UnsupportedClass { class: 1, .. })
        ));
    }

    #[test]
    fn truncated_tables_are_errors() {
        let bytes = sample_elf(b"x\0", Some(1));
        let cut = &bytes[..bytes.len() - 10];
        assert!(matches!(Elf::parse(cut), Err(ElfError::OutOfBounds { .. })));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut bytes = sample_elf(b"depends=a\0", Some(7));
            let n = data.len().min(bytes.len());
            bytes[..n].copy_from_slice(&data[..n]);
            bytes[..4].copy_from_slice(b"\x7fELF");
            bytes[4] = 2;
            bytes[5] = 1;
            if let Ok(elf) = Elf::parse(&bytes) {
                let _ = elf.section(".modinfo");
                let _ = elf.pvh_entry();
                let _ = elf.extent();
            }
        }
    }
}
