//! The cold path a new machine takes: guest images built from an empty
//! cache by a test thread that has already entered its own network
//! namespace (which has no way out). The build must run outside it.

use std::net::TcpStream;
use std::time::Duration;

use image::Tier;

#[test]
fn tiny_builds_from_an_empty_cache_inside_a_test_namespace() {
    assert!(
        testkit::is_root(),
        "this test creates a network namespace: run it as root (scripts/test.sh does)"
    );
    let cache = tempfile::tempdir().expect("temp dir");
    let _ns = testkit::Netns::enter("cold");
    // Positive control for "this thread has no way out": nothing but
    // loopback exists here, so even a connection to an address outside
    // the namespace fails at once (no route), without sending a packet.
    let no_route =
        TcpStream::connect_timeout(&"192.0.2.1:9".parse().unwrap(), Duration::from_secs(1));
    assert!(
        no_route.is_err(),
        "the test namespace should have no route out"
    );

    let resolved = testkit::images_in(cache.path(), Tier::Tiny);
    for (what, path) in [
        ("kernel", &resolved.vmlinux),
        ("initramfs", &resolved.initramfs),
        ("rootfs", &resolved.rootfs),
    ] {
        let meta =
            std::fs::metadata(path).unwrap_or_else(|e| panic!("{what} {}: {e}", path.display()));
        assert!(meta.len() > 0, "{what} {} is empty", path.display());
        assert!(
            path.starts_with(cache.path()),
            "{what} was not built into the empty cache"
        );
    }
}
