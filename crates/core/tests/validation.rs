//! Validation and the undo of a failed create, without root or a VM: the
//! network is [`net::fake::FakeNetOps`], the engine a QEMU binary that does
//! not exist, the images placeholders.

mod common;

use std::path::Path;
use std::sync::Arc;

use bhatti_core::{CoreConfig, CoreError, Limits, SandboxManager, SandboxSpec, SpecError};
use image::StoreError;
use net::fake::FakeNetOps;
use vmm::{EngineChoice, EngineKind, VmmError};

fn manager(data: &Path, ops: Arc<FakeNetOps>) -> SandboxManager {
    let mut config = CoreConfig::new(data);
    config.limits = Limits {
        max_cpus: 4,
        min_memory_mb: 128,
        max_memory_mb: 8192,
    };
    config.disk_bytes = 64 << 20;
    let engine = EngineChoice {
        kind: EngineKind::QemuTcg,
        arch: vmm::Arch::host_or_default(),
        binary: data.join("no-such-qemu"),
        reason: "test".into(),
    };
    SandboxManager::with_engine(config, engine, ops).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn bad_input_is_rejected_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    common::image_dir(dir.path(), None, "tiny", &[]);
    let ops = Arc::new(FakeNetOps::default());
    let mgr = manager(dir.path(), ops.clone());
    let setup_calls = ops.calls();

    let spec = |f: &dyn Fn(&mut SandboxSpec)| {
        let mut s = SandboxSpec::new("box", "tiny");
        f(&mut s);
        s
    };
    let cases: Vec<(SandboxSpec, &str)> = vec![
        (spec(&|s| s.cpus = 0), "cpus"),
        (spec(&|s| s.cpus = 1000), "cpus"),
        (spec(&|s| s.memory_mb = 0), "memory"),
        (spec(&|s| s.memory_mb = u32::MAX), "memory"),
        (spec(&|s| s.name = "Not A Hostname".into()), "name"),
        (spec(&|s| s.image = "gigantic".into()), "unknown image"),
        (spec(&|s| s.image = "minimal".into()), "not built"),
    ];
    rt().block_on(async {
        for (s, what) in cases {
            let e = mgr.create(s.clone()).await.unwrap_err();
            let ok = match what {
                "cpus" => matches!(e, CoreError::InvalidSpec(SpecError::Cpus { .. })),
                "memory" => matches!(e, CoreError::InvalidSpec(SpecError::Memory { .. })),
                "name" => matches!(e, CoreError::InvalidSpec(SpecError::Name { .. })),
                "unknown image" => matches!(e, CoreError::Image(StoreError::UnknownImage { .. })),
                "not built" => matches!(e, CoreError::Image(StoreError::NotBuilt { .. })),
                _ => unreachable!(),
            };
            assert!(ok, "{what}: got {e:?}");
        }
    });
    assert_eq!(ops.calls(), setup_calls, "no network operation after setup");
    assert!(common::dir_entries(&dir.path().join("sandboxes")).is_empty());
    assert!(mgr.list().is_empty());
}

#[test]
fn missing_kernel_or_rootfs_is_named() {
    for missing in ["images/kernel/vmlinux", "images/tiny/rootfs.ext4"] {
        let dir = tempfile::tempdir().unwrap();
        common::image_dir(dir.path(), None, "tiny", &[missing]);
        let ops = Arc::new(FakeNetOps::default());
        let mgr = manager(dir.path(), ops.clone());
        let e = rt()
            .block_on(mgr.create(SandboxSpec::new("box", "tiny")))
            .unwrap_err();
        match &e {
            CoreError::Image(StoreError::NotBuilt { missing: m, .. }) => {
                assert_eq!(m, &dir.path().join(missing))
            }
            other => panic!("{missing}: {other:?}"),
        }
        assert!(
            e.to_string().contains("bhatti image build --tier tiny"),
            "{e}"
        );
        assert!(!ops.calls().iter().any(|c| c.starts_with("create_tap")));
        assert!(!dir.path().join("sandboxes").exists());
    }
}

#[test]
fn a_vmm_that_cannot_start_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    common::image_dir(dir.path(), None, "tiny", &[]);
    let ops = Arc::new(FakeNetOps::default());
    let mgr = manager(dir.path(), ops.clone());
    let e = rt()
        .block_on(mgr.create(SandboxSpec::new("box", "tiny")))
        .unwrap_err();
    assert!(
        matches!(
            &e,
            CoreError::Vmm {
                source: VmmError::Spawn { .. },
                ..
            }
        ),
        "{e:?}"
    );
    // It got as far as a disk, a config drive and a TAP, and undid them.
    assert!(ops.calls().iter().any(|c| c.starts_with("create_tap")));
    assert_eq!(ops.links(), vec!["bhatti0".to_string()]);
    assert!(mgr.networks()[0].pool().is_empty());
    assert!(common::dir_entries(&dir.path().join("sandboxes")).is_empty());
    assert!(mgr.list().is_empty());
    // The name is free again.
    let e = rt()
        .block_on(mgr.create(SandboxSpec::new("box", "tiny")))
        .unwrap_err();
    assert!(matches!(e, CoreError::Vmm { .. }), "{e:?}");
}
