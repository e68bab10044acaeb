//! The host's TSC frequency, for the guest's `tsc_early_khz=`.
//!
//! QEMU's microvm has no PIT or HPET, so the guest kernel's early TSC
//! calibration has no reference clock and about 30% of boots hang (see
//! `shared/MEASURED.md`). Telling the guest the frequency skips calibration.

use std::io::Read;
use std::path::Path;

/// The host TSC frequency in kHz, from the best source available:
/// `/sys/devices/system/cpu/cpu0/tsc_freq_khz` (some kernels), the kernel
/// log (`tsc: Refined TSC clocksource calibration` / `tsc: Detected … MHz`,
/// via `/dev/kmsg`), then `cpu MHz` in `/proc/cpuinfo` if the CPU has a
/// constant TSC.
pub fn host_tsc_khz() -> Option<u64> {
    if let Some(khz) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&k| k > 0)
    {
        return Some(khz);
    }
    if let Some(khz) = read_kmsg().and_then(|log| parse_kernel_log(&log)) {
        return Some(khz);
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| parse_cpuinfo(&s))
}

/// Everything currently in the kernel ring buffer, read without blocking.
fn read_kmsg() -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(Path::new("/dev/kmsg"))
        .ok()?;
    let mut out = String::new();
    let mut buf = vec![0u8; 8192];
    loop {
        // Each read returns one record; EAGAIN marks the end, EPIPE a record
        // overwritten while we read (skip it).
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    Some(out)
}

fn mhz_to_khz(s: &str) -> Option<u64> {
    let mhz: f64 = s.trim().parse().ok()?;
    if mhz.is_finite() && mhz > 0.0 {
        Some((mhz * 1000.0).round() as u64)
    } else {
        None
    }
}

/// Parses the kernel log: the refined calibration wins over the first
/// detection.
pub fn parse_kernel_log(log: &str) -> Option<u64> {
    let find = |marker: &str| {
        log.lines().rev().find_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            mhz_to_khz(rest.split_whitespace().next()?)
        })
    };
    find("tsc: Refined TSC clocksource calibration:").or_else(|| find("tsc: Detected"))
}

/// Parses `/proc/cpuinfo`: the first `cpu MHz`, only if the flags show a
/// constant (invariant) TSC, since otherwise that number is the current
/// core clock rather than the TSC rate.
pub fn parse_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let flags = field("flags")?;
    if !flags.split_whitespace().any(|f| f == "constant_tsc") {
        return None;
    }
    mhz_to_khz(&field("cpu MHz")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_log_prefers_the_refined_value() {
        let log = "6,100,59,-;tsc: Detected 2596.092 MHz processor\n\
                   6,200,385562,-;tsc: Refined TSC clocksource calibration: 2596.099 MHz\n";
        assert_eq!(parse_kernel_log(log), Some(2_596_099));
        let dmesg = "[    0.000059] tsc: Detected 2596.092 MHz processor\n";
        assert_eq!(parse_kernel_log(dmesg), Some(2_596_092));
        assert_eq!(parse_kernel_log("[ 0.1] tsc: Detected garbage MHz\n"), None);
        assert_eq!(parse_kernel_log(""), None);
    }

    #[test]
    fn cpuinfo_needs_a_constant_tsc() {
        let good = "processor\t: 0\ncpu MHz\t\t: 2596.092\nflags\t\t: fpu tsc constant_tsc nopl\n";
        assert_eq!(parse_cpuinfo(good), Some(2_596_092));
        let variable = "cpu MHz\t\t: 1200.000\nflags\t\t: fpu tsc\n";
        assert_eq!(parse_cpuinfo(variable), None);
        assert_eq!(parse_cpuinfo("flags: constant_tsc\n"), None);
    }

    #[test]
    fn this_host_has_a_tsc_frequency() {
        // Every x86 Linux host we run on exposes one of the three sources.
        if cfg!(target_arch = "x86_64") {
            let khz = host_tsc_khz().expect("no TSC frequency found on this host");
            assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        }
    }
}
