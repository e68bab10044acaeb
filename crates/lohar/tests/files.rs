//! Files through a real agent.

mod common;

use std::time::Duration;

use agent_client::WriteOptions;
use common::*;
use proto::{ErrorCode, FileKind, FileRead, FileWrite, Message, MAX_FILE_WRITE, MAX_LS_ENTRIES};

fn read_req(path: &str) -> FileRead {
    FileRead {
        path: path.to_string(),
        ..Default::default()
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn binary_files_round_trip_with_unicode_names() {
    let a = TestAgent::start();
    let data = pseudo_random(5 * 1024 * 1024 + 7, 42);
    let path = a.path("dä 文件 🚀.bin").display().to_string();
    let n = a
        .client
        .write_file(&path, &data, WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "file on disk differs"
    );
    let back = a.client.read_file(read_req(&path)).await.unwrap();
    assert_eq!(back.total_size, data.len() as u64);
    assert!(!back.truncated);
    assert!(back.data == data, "read back differs");
    let empty = a.path("empty").display().to_string();
    a.client
        .write_file(&empty, b"", WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        a.client.read_file(read_req(&empty)).await.unwrap().data,
        b""
    );
}

#[tokio::test]
async fn reads_honour_offset_limit_and_max_bytes() {
    let a = TestAgent::start();
    let path = a.path("lines.txt");
    let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&path, &text).unwrap();
    let p = path.display().to_string();
    let r = |offset, limit, max_bytes| FileRead {
        path: p.clone(),
        offset,
        limit,
        max_bytes,
    };
    let got = a
        .client
        .read_file(r(Some(10), Some(3), None))
        .await
        .unwrap();
    assert_eq!(got.data, b"line 10\nline 11\nline 12\n");
    assert!(got.truncated);
    assert_eq!(got.total_size, text.len() as u64);
    let got = a.client.read_file(r(None, None, Some(12))).await.unwrap();
    assert_eq!(got.data, b"line 0\nline ");
    assert!(got.truncated);
    // Whichever limit hits first ends the read.
    let got = a
        .client
        .read_file(r(Some(998), Some(100), Some(1000)))
        .await
        .unwrap();
    assert_eq!(
        (got.data.as_slice(), got.truncated),
        (&b"line 998\nline 999\n"[..], false)
    );
    let got = a
        .client
        .read_file(r(Some(5), Some(100), Some(20)))
        .await
        .unwrap();
    assert_eq!(
        (got.data.as_slice(), got.truncated),
        (&b"line 5\nline 6\nline 7\n"[..20], true)
    );
    let got = a.client.read_file(r(Some(5000), None, None)).await.unwrap();
    assert_eq!((got.data.len(), got.truncated), (0, false));
}

#[tokio::test]
async fn writes_set_mode_and_keep_a_replaced_files_mode() {
    let a = TestAgent::start();
    use std::os::unix::fs::PermissionsExt;
    let p = a.path("script.sh");
    let s = p.display().to_string();
    let opts = WriteOptions {
        mode: Some(0o750),
        ..Default::default()
    };
    a.client
        .write_file(&s, b"#!/bin/sh\necho hi\n", opts)
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    a.client
        .write_file(&s, b"#!/bin/sh\necho bye\n", WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    let out = a.client.exec(argv(&[&s])).await.unwrap();
    assert_eq!(out.stdout, b"bye\n");
    let fresh = a.path("fresh.txt");
    a.client
        .write_file(&fresh.display().to_string(), b"x", WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    // Parents are created only when asked.
    let deep = a.path("a/b/c.txt").display().to_string();
    let err = a
        .client
        .write_file(&deep, b"x", WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
    let opts = WriteOptions {
        create_dirs: true,
        ..Default::default()
    };
    a.client.write_file(&deep, b"x", opts).await.unwrap();
    assert_eq!(std::fs::read(&deep).unwrap(), b"x");
    // No temp files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(a.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".lohar-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn readers_never_see_a_partial_file_during_writes() {
    let a = TestAgent::start();
    let p = a.path("hot.bin");
    let s = p.display().to_string();
    let size = 1024 * 1024;
    a.client
        .write_file(&s, &vec![b'a'; size], WriteOptions::default())
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let data = std::fs::read(&p).expect("the file always exists");
                    assert_eq!(data.len(), size, "a reader saw a partial file");
                    let first = data[0];
                    assert!(
                        data.iter().all(|&b| b == first),
                        "a reader saw mixed content"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 0..30 {
        let fill = if i % 2 == 0 { b'b' } else { b'a' };
        a.client
            .write_file(&s, &vec![fill; size], WriteOptions::default())
            .await
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader thread") > 0);
    }
}

#[tokio::test]
async fn stat_describes_files_dirs_and_symlinks() {
    let a = TestAgent::start();
    std::fs::write(a.path("f"), b"12345").unwrap();
    std::os::unix::fs::symlink("f", a.path("link")).unwrap();
    let st = a
        .client
        .stat(&a.path("f").display().to_string())
        .await
        .unwrap();
    assert_eq!((st.kind, st.size), (FileKind::File, 5));
    let st = a
        .client
        .stat(&a.path("link").display().to_string())
        .await
        .unwrap();
    assert_eq!(
        (st.kind, st.symlink_target.as_deref()),
        (FileKind::Symlink, Some("f"))
    );
    let st = a
        .client
        .stat(&a.dir.path().display().to_string())
        .await
        .unwrap();
    assert_eq!(st.kind, FileKind::Dir);
    let err = a
        .client
        .stat(&a.path("missing").display().to_string())
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn listings_are_sorted_and_capped() {
    let a = TestAgent::start();
    let dir = a.path("many");
    std::fs::create_dir(&dir).unwrap();
    let n = MAX_LS_ENTRIES + 50;
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:05}-ü")), b"").unwrap();
    }
    let listing = a.client.ls(&dir.display().to_string()).await.unwrap();
    assert_eq!(listing.total, n as u64);
    assert!(listing.truncated);
    assert_eq!(listing.entries.len(), MAX_LS_ENTRIES);
    assert!(listing.entries.windows(2).all(|w| w[0].name < w[1].name));
    let small = a.path("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("b"), b"").unwrap();
    std::fs::create_dir(small.join("a")).unwrap();
    let listing = a.client.ls(&small.display().to_string()).await.unwrap();
    let names: Vec<(&str, FileKind)> = listing
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind))
        .collect();
    assert_eq!(names, vec![("a", FileKind::Dir), ("b", FileKind::File)]);
    assert!(!listing.truncated);
    let err = a
        .client
        .ls(&a.path("nope").display().to_string())
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn bad_file_requests_get_clear_errors() {
    let a = TestAgent::start();
    let dir = a.dir.path().display().to_string();
    let err = a.client.read_file(read_req(&dir)).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    assert!(err.to_string().contains("directory"), "{err}");
    let err = a.client.read_file(read_req("")).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    let err = a
        .client
        .read_file(read_req(&a.path("missing").display().to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
    let err = a
        .client
        .write_file(&dir, b"x", WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    let opts = WriteOptions {
        mode: Some(0o170000),
        ..Default::default()
    };
    let err = a
        .client
        .write_file(&a.path("m").display().to_string(), b"x", opts)
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    // The client refuses oversize writes before sending anything.
    let err = a
        .client
        .write_file_from(
            &a.path("huge").display().to_string(),
            MAX_FILE_WRITE + 1,
            tokio::io::empty(),
            WriteOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, agent_client::ClientError::InvalidRequest(_)),
        "{err}"
    );
}

#[tokio::test]
async fn the_agent_enforces_the_write_limit_and_declared_sizes() {
    let a = TestAgent::start();
    let mut raw = a.raw_authed().await;
    let target = a.path("big").display().to_string();
    raw.send(Message::FileWrite(FileWrite {
        path: target.clone(),
        size: MAX_FILE_WRITE + 1,
        ..Default::default()
    }))
    .await;
    raw.send(Message::Data(vec![0; 1000])).await;
    raw.send(Message::DataEnd).await;
    match raw.recv().await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::FileTooLarge, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // More data than declared.
    raw.send(Message::FileWrite(FileWrite {
        path: target.clone(),
        size: 3,
        ..Default::default()
    }))
    .await;
    raw.send(Message::Data(b"abcdef".to_vec())).await;
    raw.send(Message::DataEnd).await;
    match raw.recv().await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // Less data than declared.
    raw.send(Message::FileWrite(FileWrite {
        path: target.clone(),
        size: 10,
        ..Default::default()
    }))
    .await;
    raw.send(Message::Data(b"abc".to_vec())).await;
    raw.send(Message::DataEnd).await;
    match raw.recv().await {
        Some(Message::Error(e)) => assert!(e.message.contains("declared"), "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(
        !std::path::Path::new(&target).exists(),
        "a refused write must leave nothing"
    );
    // The connection is still in step.
    raw.send(Message::ActivityQuery).await;
    assert!(matches!(raw.recv().await, Some(Message::Activity(_))));
    // A client that vanishes mid-write leaves no temp file behind.
    raw.send(Message::FileWrite(FileWrite {
        path: target.clone(),
        size: 100,
        ..Default::default()
    }))
    .await;
    raw.send(Message::Data(vec![1; 10])).await;
    drop(raw);
    wait_until(
        "the abandoned temp file is removed",
        Duration::from_secs(10),
        || {
            std::fs::read_dir(a.dir.path())
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().contains(".lohar-"))
        },
    )
    .await;
    assert!(!std::path::Path::new(&target).exists());
}
