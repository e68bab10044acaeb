//! A writer for the "newc" cpio format (`070701`), the format the kernel
//! unpacks an initramfs from. Entries are written as given; timestamps are 0
//! so the same input produces the same archive.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc cpio archive to `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

/// Device numbers of a character device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNumber {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        self.out.write_all(&[0u8; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: DeviceNumber) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "invalid cpio path",
            ));
        }
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large for newc"))?;
        let namesize = u32::try_from(path.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path too long"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        self.header(ino, mode, nlink, size, rdev, namesize)?;
        self.out.write_all(path.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += u64::from(namesize);
        self.pad()?;
        self.out.write_all(data)?;
        self.written += u64::from(size);
        self.pad()
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: DeviceNumber,
        namesize: u32,
    ) -> io::Result<()> {
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.major, rdev.minor, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.written += header.len() as u64;
        Ok(())
    }

    /// Adds a directory (`perm` like `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(
            path,
            S_IFDIR | (perm & 0o7777),
            &[],
            DeviceNumber { major: 0, minor: 0 },
        )
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(
            path,
            S_IFREG | (perm & 0o7777),
            data,
            DeviceNumber { major: 0, minor: 0 },
        )
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(
            path,
            S_IFLNK | 0o777,
            target.as_bytes(),
            DeviceNumber { major: 0, minor: 0 },
        )
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, dev: DeviceNumber) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), &[], dev)
    }

    /// Writes the trailer and returns the sink and the archive's length.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.header(0, 0, 1, 0, DeviceNumber { major: 0, minor: 0 }, 11)?;
        self.out.write_all(b"TRAILER!!!\0")?;
        self.written += 11;
        self.pad()?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn header_layout_and_alignment() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"hello").unwrap();
        let (buf, len) = w.finish().unwrap();
        assert_eq!(len as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        assert_eq!(&buf[..6], b"070701");
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(1), 0o100_755);
        assert_eq!(field(6), 5);
        assert_eq!(field(11), 5); // "init\0"
        assert_eq!(&buf[110..115], b"init\0");
        assert_eq!(&buf[116..121], b"hello"); // name padded to 116
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn rejects_empty_paths() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.dir("/", 0o755).is_err());
    }

    #[test]
    fn system_cpio_reads_it_back() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/x", 0o644, b"abc").unwrap();
        w.symlink("link", "etc/x").unwrap();
        w.char_device("console", 0o600, DeviceNumber { major: 5, minor: 1 })
            .unwrap();
        w.file("odd", 0o600, &[7u8; 7]).unwrap();
        let (buf, _) = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, &buf).unwrap();
        let out = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&path)
            .output()
            .expect("cpio is installed (apt-get install cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        for needle in ["etc/x", "link -> etc/x", "5,", "odd", "crw-------"] {
            assert!(listing.contains(needle), "{needle} missing in:\n{listing}");
        }
    }
}
