//! Golden encodings of every message. Any change to the wire shows up as a
//! diff of `tests/golden/messages.txt`; re-bless deliberately with
//! `BLESS=1 cargo test -p bhatti-proto --test golden`.

use std::collections::BTreeMap;

use proto::*;

/// One sample of every message. `variant` below has no wildcard arm, so a
/// new message does not compile until it has a sample here.
fn samples() -> Vec<Message> {
    let info = SessionInfo {
        session: "init".into(),
        pid: 42,
        argv: vec!["bash".into(), "-l".into()],
        attached: true,
        size: WindowSize {
            rows: 40,
            cols: 120,
        },
        created_unix_ms: 1_700_000_000_000,
        last_activity_unix_ms: 1_700_000_000_500,
        scrollback_bytes: 1024,
    };
    let stat = FileStat {
        name: "héllo.txt".into(),
        kind: FileKind::File,
        size: 12,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_unix_ms: 1_700_000_000_000,
        symlink_target: None,
    };
    vec![
        Message::LegacyAuth(LegacyAuth { version: 1 }),
        Message::Challenge(Challenge {
            version: 2,
            nonce: Nonce([0xa1; auth::NONCE_LEN]),
        }),
        Message::Auth(Auth {
            version: 2,
            nonce: Nonce([0xb2; auth::NONCE_LEN]),
            proof: Proof([0xc3; auth::PROOF_LEN]),
        }),
        Message::AuthOk(AuthOk {
            version: 2,
            agent_version: "0.1.0".into(),
            proof: Proof([0xd4; auth::PROOF_LEN]),
        }),
        Message::error(ErrorCode::NotFound, "no such file: /nope"),
        Message::Ok,
        Message::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo $X".into()],
            env: BTreeMap::from([("X".into(), "1".into())]),
            cwd: Some("/workspace".into()),
            stdin: true,
            tty: false,
            size: None,
            session: None,
            detach: false,
            log_path: None,
            timeout_ms: Some(30_000),
        }),
        Message::Started(Started {
            pid: 1234,
            session: Some("s1".into()),
            log_path: None,
        }),
        Message::Stdin(b"input\n".to_vec()),
        Message::StdinEof,
        Message::Stdout(vec![0, 159, 146, 150, 255]),
        Message::Stderr(b"oops\n".to_vec()),
        Message::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }),
        Message::Exit(Exit {
            code: 137,
            signal: Some(9),
            timed_out: true,
        }),
        Message::Kill(Kill { signal: Some(15) }),
        Message::Detach,
        Message::SessionAttach(SessionAttach {
            session: "init".into(),
            steal: true,
            size: Some(WindowSize { rows: 24, cols: 80 }),
        }),
        Message::SessionList,
        Message::Sessions(Sessions {
            sessions: vec![info.clone()],
        }),
        Message::SessionKill(SessionRef {
            session: "s1".into(),
        }),
        Message::SessionQuery(SessionRef {
            session: "s1".into(),
        }),
        Message::Session(info),
        Message::ActivityQuery,
        Message::Activity(Activity {
            last_activity_unix_ms: 1_700_000_000_000,
            sessions: 2,
            attached: 1,
            running_execs: 3,
            connections: 4,
            uptime_ms: 5000,
        }),
        Message::FileRead(FileRead {
            path: "/etc/hostname".into(),
            offset: Some(10),
            limit: Some(20),
            max_bytes: Some(4096),
        }),
        Message::FileReadStart(FileReadStart {
            total_size: 100_000,
            mode: 0o100644,
        }),
        Message::Data(b"\x00binary\xff".to_vec()),
        Message::DataEnd,
        Message::FileReadEnd(FileReadEnd {
            bytes: 4096,
            truncated: true,
        }),
        Message::FileWrite(FileWrite {
            path: "/workspace/a.bin".into(),
            size: 5,
            mode: Some(0o600),
            uid: Some(1000),
            gid: Some(1000),
            create_dirs: true,
        }),
        Message::FileWritten(FileWritten { bytes: 5 }),
        Message::Stat(Stat {
            path: "/workspace".into(),
        }),
        Message::StatResult(stat.clone()),
        Message::Ls(Ls {
            path: "/workspace".into(),
        }),
        Message::LsChunk(LsChunk {
            entries: vec![stat],
        }),
        Message::LsEnd(LsEnd {
            total: 10_001,
            truncated: true,
        }),
        Message::Tunnel(Tunnel { port: 3000 }),
        Message::TunnelOk,
        Message::SetTime(SetTime {
            unix_ms: 1_700_000_000_123,
        }),
        Message::ListPorts,
        Message::PortList(PortList {
            ports: vec![
                ListeningPort {
                    port: 22,
                    address: "0.0.0.0".into(),
                    protocol: "tcp".into(),
                },
                ListeningPort {
                    port: 3000,
                    address: "::1".into(),
                    protocol: "tcp".into(),
                },
            ],
        }),
    ]
}

fn variant(m: &Message) -> usize {
    match m {
        Message::LegacyAuth(_) => 39,
        Message::Challenge(_) => 40,
        Message::Auth(_) => 0,
        Message::AuthOk(_) => 1,
        Message::Error(_) => 2,
        Message::Ok => 3,
        Message::Exec(_) => 4,
        Message::Started(_) => 5,
        Message::Stdin(_) => 6,
        Message::StdinEof => 7,
        Message::Stdout(_) => 8,
        Message::Stderr(_) => 9,
        Message::Resize(_) => 10,
        Message::Exit(_) => 11,
        Message::Kill(_) => 12,
        Message::Detach => 13,
        Message::SessionAttach(_) => 14,
        Message::SessionList => 15,
        Message::Sessions(_) => 16,
        Message::SessionKill(_) => 17,
        Message::SessionQuery(_) => 18,
        Message::Session(_) => 19,
        Message::ActivityQuery => 20,
        Message::Activity(_) => 21,
        Message::FileRead(_) => 22,
        Message::FileReadStart(_) => 23,
        Message::Data(_) => 24,
        Message::DataEnd => 25,
        Message::FileReadEnd(_) => 26,
        Message::FileWrite(_) => 27,
        Message::FileWritten(_) => 28,
        Message::Stat(_) => 29,
        Message::StatResult(_) => 30,
        Message::Ls(_) => 31,
        Message::LsChunk(_) => 32,
        Message::LsEnd(_) => 33,
        Message::Tunnel(_) => 34,
        Message::TunnelOk => 35,
        Message::SetTime(_) => 36,
        Message::ListPorts => 37,
        Message::PortList(_) => 38,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn render() -> String {
    let mut out = String::from("# name frame-bytes-in-hex (generated; see tests/golden.rs)\n");
    for m in samples() {
        out.push_str(&format!("{} {}\n", m.name(), hex(&encode(&m).unwrap())));
    }
    out
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/messages.txt");

#[test]
fn every_message_has_a_sample() {
    let mut seen: Vec<usize> = samples().iter().map(variant).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (0..41).collect::<Vec<_>>());
}

#[test]
fn encodings_match_the_golden_file() {
    let rendered = render();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(GOLDEN, &rendered).unwrap();
    }
    let golden = std::fs::read_to_string(GOLDEN).expect("golden file (BLESS=1 to create)");
    assert_eq!(
        golden, rendered,
        "wire encoding changed; re-bless deliberately"
    );
}

#[test]
fn golden_frames_decode_to_their_samples() {
    let golden = std::fs::read_to_string(GOLDEN).unwrap();
    let lines: Vec<&str> = golden.lines().filter(|l| !l.starts_with('#')).collect();
    let samples = samples();
    assert_eq!(lines.len(), samples.len());
    for (line, sample) in lines.iter().zip(samples) {
        let (name, hexed) = line.split_once(' ').unwrap();
        assert_eq!(name, sample.name());
        let bytes = unhex(hexed);
        let Decoded::Frame { frame, consumed } = decode_frame(&bytes).unwrap() else {
            panic!("{name}: incomplete frame");
        };
        assert_eq!(consumed, bytes.len(), "{name}");
        assert_eq!(Message::from_frame(frame).unwrap(), Some(sample), "{name}");
    }
}

#[test]
fn a_protocol_1_token_frame_decodes_as_legacy_auth() {
    // Protocol 1's first frame, `{"token": …, "version": 1}` at 0x01, as
    // clients of that version sent it: recognised (to refuse it clearly),
    // its token dropped unparsed.
    let bytes = unhex(
        "00000038017b22746f6b656e223a2230313233343536373839616263646566303132\
         33343536373839616263646566222c2276657273696f6e223a317d",
    );
    let Decoded::Frame { frame, .. } = decode_frame(&bytes).unwrap() else {
        panic!("incomplete frame");
    };
    assert_eq!(
        Message::from_frame(frame).unwrap(),
        Some(Message::LegacyAuth(LegacyAuth { version: 1 }))
    );
}
