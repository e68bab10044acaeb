//! [`Arch`]: the CPU architecture of a guest. The host picks the kernel,
//! the initramfs (with a lohar built for that architecture), the rootfs and
//! the VMM binary by it; guest and host share the names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A guest CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86-64 (Debian `amd64`, Rust `x86_64`).
    Amd64,
    /// 64-bit ARM (Debian `arm64`, Rust `aarch64`).
    Arm64,
}

impl Arch {
    /// Every architecture.
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// The architecture this program was built for (`None` on others).
    pub const fn host() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::Amd64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Arm64)
        } else {
            None
        }
    }

    /// The host's architecture, or amd64 on a host that is neither.
    pub const fn host_or_default() -> Arch {
        match Arch::host() {
            Some(a) => a,
            None => Arch::Amd64,
        }
    }

    /// Whether this is the host's architecture (guests of another one run
    /// only emulated).
    pub fn is_host(self) -> bool {
        Arch::host() == Some(self)
    }

    /// Debian's name (`amd64`, `arm64`): what `--arch` and the config take.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The kernel's name (`uname -m`), also Rust's target prefix.
    pub const fn uname(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The Rust target the static lohar is built for.
    pub const fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Parses `amd64`/`x86_64` or `arm64`/`aarch64`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "amd64" | "x86_64" | "x86-64" => Some(Arch::Amd64),
            "arm64" | "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Arch::parse(s).ok_or_else(|| {
            format!("unknown architecture {s:?} (amd64 or x86_64, arm64 or aarch64)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.name()), Some(a));
            assert_eq!(Arch::parse(a.uname()), Some(a));
            assert!(a.rust_target().starts_with(a.uname()));
        }
        assert_eq!("aarch64".parse::<Arch>(), Ok(Arch::Arm64));
        assert!("riscv64".parse::<Arch>().unwrap_err().contains("riscv64"));
        assert_eq!(serde_json::to_string(&Arch::Arm64).unwrap(), "\"arm64\"");
        assert!(Arch::host_or_default().is_host() || Arch::host().is_none());
    }
}
