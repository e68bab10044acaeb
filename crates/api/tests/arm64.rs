//! An arm64 sandbox on this (x86_64) host: a daemon with `arch = "arm64"`
//! runs `qemu-system-aarch64 -M virt` under TCG, booting Debian's arm64
//! cloud kernel with the aarch64 static lohar as PID 1 and the arm64 tiny
//! rootfs; the API creates the sandbox, execs in it, takes it cold
//! (snapshot) and wakes it with its process still running.
//!
//! Needs root, `qemu-system-aarch64` (`$BHATTI_QEMU_ARM64`) and the static
//! aarch64 lohar (`$BHATTI_LOHAR_STATIC_ARM64`, built by
//! `scripts/build-lohar.sh arm64`); otherwise `testkit::cannot_run` (a
//! failure under scripts/test.sh). Images come from testkit's cache
//! (`images/arm64/`), built on first use.

mod common;

use std::time::Instant;

use common::*;
use image::{Arch, Tier};
use reqwest::Method;

#[test]
fn an_arm64_sandbox_boots_execs_and_wakes_from_cold_under_tcg() {
    if !testkit::is_root() {
        return testkit::cannot_run("the arm64 VM test needs root (namespaces, TAPs)");
    }
    if let Err(why) = vmm::select::HostProbe::host().qemu(Arch::Arm64) {
        return testkit::cannot_run(&format!("no QEMU for arm64 guests: {why}"));
    }
    let Some(lohar) = testkit::static_lohar_for(Arch::Arm64) else {
        return testkit::cannot_run(&format!(
            "no static aarch64 lohar: set {} (scripts/build-lohar.sh arm64 builds one)",
            testkit::LOHAR_STATIC_ARM64_VAR
        ));
    };
    let started = Instant::now();
    let data = testkit::data_dir_with_images_for(Arch::Arm64, Tier::Tiny, lohar);
    println!(
        "TIMING arm64 tiny images ready: {} ms",
        started.elapsed().as_millis()
    );
    in_netns("api-arm64", || async {
        let mut config = config(data.path(), "");
        config.arch = "arm64".into();
        config.validate().expect("arm64 config");
        let d = TestDaemon::start(config).await;
        let c = d.client(&d.user("ada", 2));

        let (s, info) = c.json(Method::GET, "/health", None).await;
        if s == 200 {
            println!("engine: {info}");
        }
        let started = Instant::now();
        let sb = c.create("arm").await;
        println!(
            "TIMING arm64 create (boot under TCG to agent ready): {} ms",
            started.elapsed().as_millis()
        );
        assert_eq!(sb["status"], "running", "{sb}");

        assert_eq!(sh(&c, "arm", "uname -m").await.trim(), "aarch64");
        let release = sh(&c, "arm", "uname -r").await;
        assert!(release.trim().ends_with("-cloud-arm64"), "{release}");
        // The agent's own files, network address and user work as on amd64.
        let me = sh(
            &c,
            "arm",
            "echo hello > /workspace/f && cat /workspace/f && id -un",
        )
        .await;
        assert_eq!(me.lines().next(), Some("hello"), "{me}");
        let pid = sh(
            &c,
            "arm",
            "sleep 100000 >/dev/null 2>&1 </dev/null & echo $!",
        )
        .await;
        let pid = pid.trim().to_string();
        assert!(pid.parse::<u32>().is_ok(), "{pid}");

        // Cold (a snapshot of device state; RAM stays in its file) and back.
        let started = Instant::now();
        let (s, v) = c.json(Method::POST, "/sandboxes/arm/stop", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("cold")), "{v}");
        println!(
            "TIMING arm64 stop to cold: {} ms",
            started.elapsed().as_millis()
        );
        let started = Instant::now();
        let (s, v) = c.json(Method::POST, "/sandboxes/arm/start", None).await;
        assert_eq!((s, v["thermal"].as_str()), (200, Some("hot")), "{v}");
        println!(
            "TIMING arm64 wake from cold: {} ms",
            started.elapsed().as_millis()
        );
        // Restored, not rebooted: the process is still there.
        let alive = sh(
            &c,
            "arm",
            &format!("kill -0 {pid} && echo alive; cat /workspace/f"),
        )
        .await;
        assert_eq!(alive, "alive\nhello\n", "{alive}");
        assert_eq!(sh(&c, "arm", "uname -m").await.trim(), "aarch64");

        let (s, v) = c.json(Method::DELETE, "/sandboxes/arm", None).await;
        assert_eq!(s, 204, "{v}");
        d.stop().await;
    });
}
