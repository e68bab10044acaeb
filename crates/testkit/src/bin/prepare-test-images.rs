//! Builds the guest images the VM suites use into the test image cache
//! (`BHATTI_TEST_DATA`, default `/var/cache/bhatti-test/data`) before any
//! suite starts, so no suite spends its own deadlines on a build.
//! Usage: `prepare-test-images [[arch:]tier …]` (default: tiny minimal
//! browser docker arm64:tiny). An arm64 tier needs the static aarch64 lohar
//! (`$BHATTI_LOHAR_STATIC_ARM64`, see `testkit::static_lohar_for`).

use image::{Arch, Tier};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names = if args.is_empty() {
        vec![
            "tiny".to_string(),
            "minimal".to_string(),
            "browser".to_string(),
            "docker".to_string(),
            "arm64:tiny".to_string(),
        ]
    } else {
        args
    };
    for name in names {
        let (arch, tier_name) = match name.split_once(':') {
            Some((a, t)) => (Arch::parse(a), t),
            None => (Some(Arch::host_or_default()), name.as_str()),
        };
        let (Some(arch), Some(tier)) = (arch, Tier::from_name(tier_name)) else {
            eprintln!("prepare-test-images: unknown image '{name}' ([amd64:|arm64:]tiny|minimal|browser|docker)");
            std::process::exit(2);
        };
        let Some(lohar) = testkit::static_lohar_for(arch) else {
            eprintln!(
                "prepare-test-images: no static {arch} lohar (set {} or run scripts/build-lohar.sh {arch})",
                testkit::LOHAR_STATIC_ARM64_VAR
            );
            std::process::exit(2);
        };
        let started = std::time::Instant::now();
        let resolved = testkit::images_for(arch, tier, lohar);
        println!(
            "{name}: {} ({:.1} s)",
            resolved.rootfs.display(),
            started.elapsed().as_secs_f64()
        );
    }
}
