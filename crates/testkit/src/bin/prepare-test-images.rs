//! Builds the guest images the VM suites use into the test image cache
//! (`BHATTI_TEST_DATA`, default `/var/cache/bhatti-test/data`) before any
//! suite starts, so no suite spends its own deadlines on a build.
//! Usage: `prepare-test-images [tier …]` (default: tiny minimal).

use image::Tier;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names = if args.is_empty() {
        vec!["tiny".to_string(), "minimal".to_string()]
    } else {
        args
    };
    for name in names {
        let Some(tier) = Tier::from_name(&name) else {
            eprintln!("prepare-test-images: unknown tier '{name}'");
            std::process::exit(2);
        };
        let started = std::time::Instant::now();
        let resolved = testkit::images(tier);
        println!(
            "{name}: {} ({:.1} s)",
            resolved.rootfs.display(),
            started.elapsed().as_secs_f64()
        );
    }
}
