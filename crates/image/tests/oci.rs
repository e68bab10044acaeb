//! OCI images end to end, with real tools: `umoci` makes an image from a
//! rootfs tar this test writes, `skopeo` turns it into a docker-archive and
//! pushes it to Debian's `docker-registry`, which listens on 127.0.0.1
//! inside a network namespace this test creates (nothing else can reach it,
//! and the client reaches nothing else). The client pulls from a thread
//! that entered that namespace. Imports, pulls, the cache, the typed
//! errors, and hostile layers arriving through an archive.
//!
//! Needs root and umoci, skopeo, docker-registry, curl, mkfs.ext4,
//! debugfs; without them it prints `SKIP` (and fails under
//! `scripts/test.sh`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::oci::registry::PullEvent;
use image::oci::{
    import_archive, AddressPolicy, Credentials, Limits, OciError, OciImages, PullOptions, Puller,
    Reference,
};
use image::{Arch, Layout};

const TOOLS: &[&str] = &[
    "umoci",
    "skopeo",
    "docker-registry",
    "curl",
    "mkfs.ext4",
    "debugfs",
    "ip",
];

fn cannot_run(reason: &str) {
    if std::env::var_os("BHATTI_TESTS_MUST_RUN").is_some_and(|v| v == "1") {
        panic!("{reason} (BHATTI_TESTS_MUST_RUN=1: a test that cannot run fails here)");
    }
    println!("SKIP {reason}");
}

fn ready() -> bool {
    if !nix_is_root() {
        cannot_run("oci tests need root (ownership in layers, network namespaces)");
        return false;
    }
    for t in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            cannot_run(&format!("oci tests need `{t}`"));
            return false;
        }
    }
    true
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn arch() -> &'static str {
    Arch::host_or_default().name()
}

/// An OCI layout `dir/lay` holding `lay:<tag>`: a few files, an
/// /etc/passwd with user 1000, Env/WorkingDir/User set.
fn make_layout(dir: &Path, tag: &str, marker: &str) -> PathBuf {
    let root = dir.join(format!("rootfs-{tag}"));
    for d in ["etc", "srv/app", "home/app", "usr/bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::write(root.join("srv/app/hello.txt"), format!("hello {marker}\n")).unwrap();
    std::os::unix::fs::chown(root.join("home/app"), Some(1000), Some(1000)).unwrap();
    std::fs::write(root.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    let tar = dir.join(format!("rootfs-{tag}.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    let lay = dir.join("lay");
    if !lay.exists() {
        run(Command::new("umoci").args(["init", "--layout"]).arg(&lay));
    }
    let img = format!("{}:{tag}", lay.display());
    run(Command::new("umoci").args(["new", "--image", &img]));
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", &img])
        .arg(&tar));
    // A second layer deleting a file of the first (a whiteout).
    let l2 = dir.join(format!("l2-{tag}"));
    std::fs::create_dir_all(l2.join("usr/bin")).unwrap();
    std::fs::write(l2.join("usr/bin/.wh.tool"), "").unwrap();
    std::fs::write(l2.join("usr/bin/tool2"), "2").unwrap();
    let l2tar = dir.join(format!("l2-{tag}.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&l2)
        .arg("-cf")
        .arg(&l2tar)
        .arg("."));
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", &img])
        .arg(&l2tar));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.env",
        "GREETING=hi there",
        "--config.env",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "--config.workingdir",
        "/srv/app",
        "--config.user",
        "1000",
        "--config.cmd",
        "/bin/sh",
        "--architecture",
        arch(),
        "--os",
        "linux",
    ]));
    lay
}

fn debugfs(img: &Path, req: &str) -> String {
    run(Command::new("debugfs").args(["-R", req]).arg(img))
}

/// The built image has the layers' files, ownership, the whiteout
/// applied, and the config.
fn check_image(images: &OciImages, name: &str, marker: &str) {
    let img = images.get(name).expect("image listed");
    assert_eq!(img.name, name);
    assert_eq!(img.architecture, arch());
    let c = &img.config;
    assert_eq!(c.working_dir.as_deref(), Some("/srv/app"));
    assert_eq!(c.user.as_deref(), Some("1000"));
    assert!(c
        .env
        .as_ref()
        .unwrap()
        .contains(&"GREETING=hi there".to_string()));
    assert_eq!(c.cmd.as_deref(), Some(&["/bin/sh".to_string()][..]));
    let rootfs = images.rootfs(name);
    assert_eq!(
        debugfs(&rootfs, "cat /srv/app/hello.txt"),
        format!("hello {marker}\n")
    );
    assert!(debugfs(&rootfs, "cat /etc/passwd").contains("app:x:1000:1000"));
    let home = debugfs(&rootfs, "stat /home/app");
    assert!(
        home.contains("User:  1000") && home.contains("Group:  1000"),
        "{home}"
    );
    let ls = debugfs(&rootfs, "ls -l /usr/bin");
    assert!(
        ls.contains("tool2") && !ls.contains(" tool\n") && !ls.contains(".wh."),
        "{ls}"
    );
    // lohar's mount points exist even though the image has none.
    let root = debugfs(&rootfs, "ls /");
    for d in ["proc", "sys", "dev", "run", "tmp"] {
        assert!(root.contains(d), "{d} missing: {root}");
    }
    // The label lohar takes as the base.
    let label = run(Command::new("e2label").arg(&rootfs));
    assert_eq!(label.trim(), "bhatti-oci");
}

#[test]
fn import_oci_layout_and_docker_archive() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = make_layout(dir.path(), "v1", "import");
    let data = dir.path().join("data");
    let images = OciImages::new(Layout::new(&data));

    // OCI layout, as a tar.
    let lay_tar = dir.path().join("lay.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&lay)
        .arg("-cf")
        .arg(&lay_tar)
        .arg("."));
    let img = import_archive(&images, &lay_tar, "from-layout", Limits::default()).unwrap();
    assert!(img.source.starts_with("import:"));
    check_image(&images, "from-layout", "import");

    // docker-archive (`docker save` format), written by skopeo.
    let da = dir.path().join("da.tar");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q"])
        .arg(format!("oci:{}:v1", lay.display()))
        .arg(format!("docker-archive:{}:test/img:v1", da.display())));
    import_archive(&images, &da, "from-archive", Limits::default()).unwrap();
    check_image(&images, "from-archive", "import");
    let names: Vec<_> = images.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["from-archive", "from-layout"]);

    // Re-import replaces.
    import_archive(&images, &da, "from-archive", Limits::default()).unwrap();
    check_image(&images, "from-archive", "import");

    // Budgets.
    let err = import_archive(
        &images,
        &da,
        "small",
        Limits {
            download_bytes: 1000,
            unpacked_bytes: 1 << 30,
        },
    )
    .unwrap_err();
    assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
    assert!(images.get("small").is_none());

    // Not an image archive; a bad name.
    let junk = dir.path().join("junk.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-cf")
        .arg(&junk)
        .arg("rootfs-v1.tar"));
    let err = import_archive(&images, &junk, "junk", Limits::default()).unwrap_err();
    assert!(matches!(err, OciError::BadArchive { .. }), "{err}");
    let err = import_archive(&images, &da, "tiny", Limits::default()).unwrap_err();
    assert!(matches!(err, OciError::BadName { .. }), "{err}");
    let err = import_archive(&images, &da, "../x", Limits::default()).unwrap_err();
    assert!(matches!(err, OciError::BadName { .. }), "{err}");
}

/// A raw tar entry (the tar crate's builder refuses `..`; a hostile
/// archive does not).
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn docker_archive(path: &Path, layers: &[Vec<u8>]) {
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{}}}}"#,
        arch()
    );
    let mut b = tar::Builder::new(Vec::new());
    let mut names = vec![];
    for (i, l) in layers.iter().enumerate() {
        let n = format!("l{i}/layer.tar");
        let mut h = tar::Header::new_gnu();
        h.set_size(l.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, &n, &l[..]).unwrap();
        names.push(format!("\"{n}\""));
    }
    let manifest = format!(
        r#"[{{"Config":"config.json","RepoTags":["evil:1"],"Layers":[{}]}}]"#,
        names.join(",")
    );
    for (n, d) in [
        ("config.json", config.as_bytes()),
        ("manifest.json", manifest.as_bytes()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, n, d).unwrap();
    }
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

#[test]
fn hostile_layers_in_an_archive_write_nothing_outside() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let images = OciImages::new(Layout::new(&data));
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("canary"), "intact").unwrap();
    let v = victim.to_str().unwrap().to_owned();
    let layer = |f: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    };
    use tar::EntryType as T;
    let cases: Vec<Vec<Vec<u8>>> = vec![
        vec![layer(&|b| {
            raw_entry(b, "../../../../victim/pwned", T::Regular, "", b"x")
        })],
        vec![layer(&|b| {
            raw_entry(b, &format!("{v}/pwned"), T::Regular, "", b"x")
        })],
        vec![
            layer(&|b| raw_entry(b, "esc", T::Symlink, &v, b"")),
            layer(&|b| raw_entry(b, "esc/pwned", T::Regular, "", b"x")),
        ],
        vec![
            layer(&|b| raw_entry(b, "esc", T::Symlink, &v, b"")),
            layer(&|b| raw_entry(b, "esc/.wh.canary", T::Regular, "", b"")),
        ],
        vec![layer(&|b| {
            raw_entry(b, "h", T::Link, &format!("{v}/canary"), b"")
        })],
    ];
    for (i, layers) in cases.iter().enumerate() {
        let a = dir.path().join(format!("evil{i}.tar"));
        docker_archive(&a, layers);
        let err = import_archive(&images, &a, "evil", Limits::default()).unwrap_err();
        assert!(
            matches!(err, OciError::UnsafeEntry { .. }),
            "case {i}: {err}"
        );
        let names: Vec<_> = std::fs::read_dir(&victim)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["canary"], "case {i}");
        assert_eq!(
            std::fs::read_to_string(victim.join("canary")).unwrap(),
            "intact"
        );
        assert!(images.get("evil").is_none());
    }
    // Positive control: the same archive shape with a harmless layer
    // imports.
    let a = dir.path().join("good.tar");
    docker_archive(
        &a,
        &[layer(&|b| raw_entry(b, "etc/ok", T::Regular, "", b"fine"))],
    );
    import_archive(&images, &a, "good", Limits::default()).unwrap();
    assert_eq!(debugfs(&images.rootfs("good"), "cat /etc/ok"), "fine");
}

/// A network namespace with only loopback, removed on drop.
struct Netns(String);
impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("bhoci-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Self(name)
    }
    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }
    /// Runs `f` on a thread inside the namespace (its sockets are made
    /// there; so are those of threads it starts).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = std::fs::File::open(&path).unwrap();
                use std::os::fd::AsRawFd;
                // SAFETY: a valid namespace fd; affects only this thread.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const REGISTRY: &str = "127.0.0.1:5000";

/// Starts docker-registry on 127.0.0.1:5000 inside `ns`, storing in
/// `regdata`, with the `auth:` section `auth` (YAML, may be empty).
/// Returns once it answers.
fn start_registry(ns: &Netns, dir: &Path, regdata: &Path, auth: &str) -> Killed {
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n{auth}http:\n  addr: {REGISTRY}\n",
            regdata.display()
        ),
    )
    .unwrap();
    let registry = Killed(
        ns.exec()
            .args(["docker-registry", "serve"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Ready when it answers /v2/ inside the namespace (401 counts).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ns
            .exec()
            .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{REGISTRY}/v2/"))
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        if code == "200" || code == "401" {
            break;
        }
        assert!(Instant::now() < deadline, "docker-registry did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    registry
}

fn pull(
    images: &OciImages,
    reference: &str,
    name: &str,
    opts: PullOptions,
) -> (Result<image::oci::OciImage, OciError>, Vec<PullEvent>, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = vec![];
    let r = Reference::parse(reference).unwrap();
    let mut puller = Puller::new(images.clone(), opts).unwrap();
    let result = rt.block_on(puller.pull(&r, name, &mut |e| events.push(e)));
    (result, events, puller.downloaded_bytes)
}

fn insecure() -> PullOptions {
    PullOptions {
        insecure: true,
        ..Default::default()
    }
}

#[test]
fn pull_from_a_registry_in_a_namespace() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = make_layout(dir.path(), "v1", "registry");
    make_layout(dir.path(), "tamper", "tampered");
    let ns = Netns::new("anon");
    let regdata = dir.path().join("registry");
    let _registry = start_registry(&ns, dir.path(), &regdata, "");
    // It is not reachable from the host's namespace.
    assert!(!Command::new("curl")
        .args([
            "-sf",
            "-m",
            "2",
            "-o",
            "/dev/null",
            &format!("http://{REGISTRY}/v2/")
        ])
        .status()
        .unwrap()
        .success());
    let push = |tag: &str, dest_tag: &str, format: &[&str]| {
        run(ns
            .exec()
            .args([
                "skopeo",
                "--insecure-policy",
                "copy",
                "-q",
                "--dest-tls-verify=false",
            ])
            .args(format)
            .arg(format!("oci:{}:{tag}", lay.display()))
            .arg(format!("docker://{REGISTRY}/test/img:{dest_tag}")));
    };
    push("v1", "v1", &[]);
    push("v1", "docker", &["--format", "v2s2"]);
    push("tamper", "tamper", &[]);
    // Indexes: one with this host's arch among others, one without.
    let manifest_digest = run(ns
        .exec()
        .args([
            "skopeo",
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
        ])
        .arg(format!("docker://{REGISTRY}/test/img:v1")))
    .trim()
    .to_owned();
    let size = run(ns
        .exec()
        .args([
            "curl",
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg(format!("http://{REGISTRY}/v2/test/img/manifests/v1")))
    .len();
    let other = if arch() == "amd64" { "arm64" } else { "amd64" };
    let put_index = |tag: &str, arches: &[&str]| {
        let entries: Vec<String> = arches
            .iter()
            .map(|a| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{size},"platform":{{"architecture":"{a}","os":"linux"}}}}"#
                )
            })
            .collect();
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        );
        run(ns.exec().args([
            "curl",
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
            "--data-binary",
            &body,
            &format!("http://{REGISTRY}/v2/test/img/manifests/{tag}"),
        ]));
    };
    put_index("multi", &[other, arch()]);
    put_index("otherarch", &[other]);
    // Corrupt the stored layer of :tamper (the registry serves it as is).
    let tampered_layer = {
        let m = run(ns
            .exec()
            .args([
                "curl",
                "-sf",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
            ])
            .arg(format!("http://{REGISTRY}/v2/test/img/manifests/tamper")));
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        v["layers"][0]["digest"].as_str().unwrap().to_owned()
    };
    let hex = &tampered_layer["sha256:".len()..];
    let data_file = regdata.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data_file, bytes).unwrap();

    let data = dir.path().join("data");
    let images = OciImages::new(Layout::new(&data));
    let r = |t: &str| format!("{REGISTRY}/test/img:{t}");
    ns.run(|| {
        // First pull downloads config and layers.
        let (res, events, bytes) = pull(&images, &r("v1"), "app", insecure());
        let img = res.unwrap();
        assert_eq!(img.digest, manifest_digest);
        assert_eq!(img.source, format!("{REGISTRY}/test/img:v1"));
        let downloaded = events
            .iter()
            .filter(|e| matches!(e, PullEvent::Downloaded { .. }))
            .count();
        assert_eq!(downloaded, 3, "{events:?}");
        assert!(bytes > 0);
        check_image(&images, "app", "registry");

        // Second pull: served from the cache.
        let (res, events, bytes) = pull(&images, &r("v1"), "app2", insecure());
        res.unwrap();
        assert_eq!(bytes, 0, "{events:?}");
        assert!(!events
            .iter()
            .any(|e| matches!(e, PullEvent::Downloaded { .. })));
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, PullEvent::Cached { .. }))
                .count(),
            3
        );
        check_image(&images, "app2", "registry");

        // Docker v2 media types; by digest; through an index.
        pull(&images, &r("docker"), "dock", insecure()).0.unwrap();
        check_image(&images, "dock", "registry");
        let by_digest = format!("{REGISTRY}/test/img@{manifest_digest}");
        pull(&images, &by_digest, "bydigest", insecure()).0.unwrap();
        let (res, ..) = pull(&images, &r("multi"), "multi", insecure());
        assert_eq!(res.unwrap().digest, manifest_digest);
        check_image(&images, "multi", "registry");

        // Typed errors.
        let err = pull(&images, &r("otherarch"), "x", insecure())
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::NoPlatform { .. }), "{err}");
        assert!(err.to_string().contains(&format!("linux/{other}")), "{err}");
        let err = pull(&images, &r("nope"), "x", insecure()).0.unwrap_err();
        assert!(matches!(err, OciError::NotFound { .. }), "{err}");
        let err = pull(&images, &format!("{REGISTRY}/no/such:v1"), "x", insecure())
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::NotFound { .. }), "{err}");
        let err = pull(&images, "127.0.0.1:5999/test/img:v1", "x", insecure())
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1:5999"), "{err}");
        // An address policy (a tenant's pull through the daemon): a literal
        // address, a name and a redirect to a refused address fail as
        // AddressRefused before any request reaches them; the positive
        // controls are the same pulls without the refusal.
        let refusing = |bad: fn(std::net::IpAddr) -> bool| PullOptions {
            addresses: Some(AddressPolicy::new(move |ip| {
                if bad(ip) {
                    Err("refused by the test".into())
                } else {
                    Ok(())
                }
            })),
            ..insecure()
        };
        let loopback = |ip: std::net::IpAddr| ip.is_loopback();
        let err = pull(&images, &r("v1"), "p1", refusing(loopback))
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::AddressRefused { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        let by_name = "localhost:5000/test/img:v1".to_string();
        let err = pull(&images, &by_name, "p2", refusing(loopback))
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::AddressRefused { .. }), "{err}");
        assert!(err.to_string().contains("localhost resolves to"), "{err}");
        let only_other = |ip: std::net::IpAddr| ip == std::net::Ipv4Addr::new(127, 0, 0, 2);
        pull(&images, &by_name, "p2", refusing(only_other))
            .0
            .unwrap();
        assert!(images.get("p1").is_none());
        assert!(images.remove("p2").unwrap());
        // A registry whose every answer redirects to 127.0.0.2.
        let redirector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = redirector.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for conn in redirector.incoming().flatten() {
                let mut reader = std::io::BufReader::new(&conn);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = (&conn).write_all(
                    b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:5000/v2/test/img/manifests/v1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        let redirecting = format!("127.0.0.1:{port}/test/img:v1");
        let err = pull(&images, &redirecting, "p3", refusing(only_other))
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::AddressRefused { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.2"), "{err}");
        let err = pull(&images, &redirecting, "p3", insecure())
            .0
            .unwrap_err();
        assert!(!matches!(err, OciError::AddressRefused { .. }), "{err}");
        // Without `insecure` the client speaks only HTTPS.
        let err = pull(&images, &r("v1"), "x", PullOptions::default())
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::Unreachable { .. }), "{err}");
        // A corrupted blob fails its digest and stays out of the cache.
        let err = pull(&images, &r("tamper"), "tamper", insecure())
            .0
            .unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
        assert!(images.blobs().get(&tampered_layer, None).unwrap().is_none());
        assert!(images.get("tamper").is_none());
        // Byte budget.
        let small = PullOptions {
            insecure: true,
            credentials: Credentials::Anonymous,
            limits: Limits {
                download_bytes: 10,
                unpacked_bytes: 1 << 30,
            },
            addresses: None,
        };
        std::fs::remove_dir_all(images.dir().join("blobs")).unwrap();
        let err = pull(&images, &r("v1"), "x", small).0.unwrap_err();
        assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
        assert!(images.get("x").is_none());
    });
    // Malformed references never reach the network.
    for bad in ["", "Bad/Ref", "host:port/x", "a@sha256:12"] {
        assert!(Reference::parse(bad).is_err(), "{bad}");
    }
    let names: Vec<_> = images.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["app", "app2", "bydigest", "dock", "multi"]);
    // The images tree holds only the blob cache and the images.
    let mut tree: Vec<_> = std::fs::read_dir(images.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    tree.sort();
    assert_eq!(tree, ["app", "app2", "blobs", "bydigest", "dock", "multi"]);
    let _ = std::fs::metadata(&data).unwrap().mode();
}

#[test]
fn pull_with_basic_auth() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = make_layout(dir.path(), "v1", "private");
    let ns = Netns::new("auth");
    // A bcrypt htpasswd entry (what docker-registry takes).
    let hash = run(Command::new("python3").args([
        "-W",
        "ignore",
        "-c",
        "import crypt; print(crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH)))",
    ]));
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("me:{}", hash.trim())).unwrap();
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: bhatti-test\n    path: {}\n",
        htpasswd.display()
    );
    let _registry = start_registry(&ns, dir.path(), &dir.path().join("registry"), &auth);
    run(ns
        .exec()
        .args([
            "skopeo",
            "--insecure-policy",
            "copy",
            "-q",
            "--dest-tls-verify=false",
        ])
        .args(["--dest-creds", "me:s3cret"])
        .arg(format!("oci:{}:v1", lay.display()))
        .arg(format!("docker://{REGISTRY}/private/img:v1")));
    let data = dir.path().join("data");
    let images = OciImages::new(Layout::new(&data));
    let r = format!("{REGISTRY}/private/img:v1");
    let basic = |password: &str| PullOptions {
        insecure: true,
        credentials: Credentials::Basic {
            username: "me".into(),
            password: password.into(),
        },
        limits: Limits::default(),
        addresses: None,
    };
    ns.run(|| {
        let err = pull(&images, &r, "p", insecure()).0.unwrap_err();
        assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
        assert!(err.to_string().contains("authentication required"), "{err}");
        let err = pull(&images, &r, "p", basic("wrong")).0.unwrap_err();
        assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
        assert!(images.get("p").is_none());
        // Positive control: the right password pulls.
        let (res, _, bytes) = pull(&images, &r, "p", basic("s3cret"));
        res.unwrap();
        assert!(bytes > 0);
        check_image(&images, "p", "private");
    });
}

/// The bearer-token flow against docker-registry's token auth: the
/// registry answers 401 with `WWW-Authenticate: Bearer realm=…`, the client
/// gets a JWT from the realm (a token server this test runs beside it,
/// which wants Basic credentials) and retries with it.
#[test]
fn pull_with_a_bearer_token() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lay = make_layout(dir.path(), "v1", "bearer");
    let ns = Netns::new("token");
    let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=bhatti-token", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let script = dir.path().join("token_server.py");
    std::fs::write(&script, include_str!("fixtures/token_server.py")).unwrap();
    let _tokens = Killed(
        ns.exec()
            .arg("python3")
            .arg(&script)
            .arg(&key)
            .arg(&cert)
            .args(["5001", "me", "s3cret"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let auth = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:5001/token\n    service: bhatti-test\n    issuer: bhatti-test-issuer\n    rootcertbundle: {}\n",
        cert.display()
    );
    let _registry = start_registry(&ns, dir.path(), &dir.path().join("registry"), &auth);
    // skopeo pushes through the same flow (retried until the token server
    // listens).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = ns
            .exec()
            .args([
                "skopeo",
                "--insecure-policy",
                "copy",
                "-q",
                "--dest-tls-verify=false",
            ])
            .args(["--dest-creds", "me:s3cret"])
            .arg(format!("oci:{}:v1", lay.display()))
            .arg(format!("docker://{REGISTRY}/team/img:v1"))
            .status()
            .unwrap()
            .success();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "skopeo could not push");
        std::thread::sleep(Duration::from_millis(200));
    }
    let data = dir.path().join("data");
    let images = OciImages::new(Layout::new(&data));
    let r = format!("{REGISTRY}/team/img:v1");
    let basic = |password: &str| PullOptions {
        insecure: true,
        credentials: Credentials::Basic {
            username: "me".into(),
            password: password.into(),
        },
        limits: Limits::default(),
        addresses: None,
    };
    ns.run(|| {
        // The token server refuses: no token, Unauthorized.
        let err = pull(&images, &r, "t", insecure()).0.unwrap_err();
        assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
        assert!(
            err.to_string().contains("token endpoint answered 401"),
            "{err}"
        );
        let err = pull(&images, &r, "t", basic("wrong")).0.unwrap_err();
        assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
        // A made-up bearer token is refused by the registry and no other
        // is obtained.
        let bogus = PullOptions {
            insecure: true,
            credentials: Credentials::Token("not-a-jwt".into()),
            limits: Limits::default(),
            addresses: None,
        };
        let err = pull(&images, &r, "t", bogus).0.unwrap_err();
        assert!(matches!(err, OciError::Unauthorized { .. }), "{err}");
        assert!(images.get("t").is_none());
        // Positive control: with the credentials the token flow pulls.
        let (res, events, bytes) = pull(&images, &r, "t", basic("s3cret"));
        res.unwrap();
        assert!(bytes > 0, "{events:?}");
        check_image(&images, "t", "bearer");
    });
}

/// Older `docker save` archives link a repeated layer to its first copy;
/// a link out of the archive finds nothing.
#[test]
fn docker_archive_layer_symlinks() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = OciImages::new(Layout::new(dir.path().join("data")));
    let archive = |link: &str| {
        let mut l = tar::Builder::new(Vec::new());
        raw_entry(&mut l, "etc/ok", tar::EntryType::Regular, "", b"linked");
        let layer = l.into_inner().unwrap();
        let config = format!(r#"{{"architecture":"{}","os":"linux"}}"#, arch());
        let manifest =
            r#"[{"Config":"c.json","Layers":["l0/layer.tar","l1/layer.tar"]}]"#.to_string();
        let mut b = tar::Builder::new(Vec::new());
        for (n, d) in [
            ("c.json", config.as_bytes()),
            ("manifest.json", manifest.as_bytes()),
            ("l0/layer.tar", &layer[..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, n, d).unwrap();
        }
        raw_entry(&mut b, "l1/layer.tar", tar::EntryType::Symlink, link, b"");
        let p = dir.path().join("a.tar");
        std::fs::write(&p, b.into_inner().unwrap()).unwrap();
        p
    };
    let img = import_archive(
        &images,
        &archive("../l0/layer.tar"),
        "linked",
        Limits::default(),
    )
    .unwrap();
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0], img.layers[1]);
    assert_eq!(debugfs(&images.rootfs("linked"), "cat /etc/ok"), "linked");
    let err = import_archive(
        &images,
        &archive("../../../../etc/passwd"),
        "outside",
        Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, OciError::BadArchive { .. }), "{err}");
}
