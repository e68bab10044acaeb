//! Piped and detached commands through a real agent.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agent_client::ExecEvent;
use common::*;
use proto::ErrorCode;

#[tokio::test]
async fn reports_exit_codes_and_signal_deaths() {
    let a = TestAgent::start();
    let out = a.client.exec(sh("exit 3")).await.unwrap();
    assert_eq!((out.exit.code, out.exit.signal), (3, None));
    let out = a.client.exec(argv(&["true"])).await.unwrap();
    assert_eq!(out.exit.code, 0);
    let out = a.client.exec(sh("kill -TERM $$")).await.unwrap();
    assert_eq!((out.exit.code, out.exit.signal), (143, Some(15)));
    let out = a.client.exec(sh("kill -KILL $$")).await.unwrap();
    assert_eq!((out.exit.code, out.exit.signal), (137, Some(9)));
}

#[tokio::test]
async fn keeps_stdout_and_stderr_apart() {
    let a = TestAgent::start();
    let out = a
        .client
        .exec(sh("echo out; echo err >&2; echo out2; echo err2 >&2"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\nerr2\n");
}

#[tokio::test]
async fn carries_megabytes_of_output_intact() {
    let a = TestAgent::start();
    let out = a
        .client
        .exec(sh("seq 1 400000; seq 1 1000 >&2"))
        .await
        .unwrap();
    let want: String = (1..=400000).map(|i| format!("{i}\n")).collect();
    assert!(want.len() > 2_500_000);
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want.as_bytes(), "stdout differs");
    assert_eq!(
        out.stderr.len(),
        (1..=1000).map(|i| format!("{i}\n").len()).sum::<usize>()
    );
}

#[tokio::test]
async fn streams_output_as_it_is_produced() {
    let a = TestAgent::start();
    let flag = a.path("go-on");
    // The command cannot finish until the test has seen its first line.
    let script = format!(
        "echo first; while [ ! -e {0} ]; do sleep 0.01; done; echo second >&2",
        flag.display()
    );
    let mut s = a.client.exec_stream(sh(&script)).await.unwrap();
    assert_eq!(
        s.next().await.unwrap(),
        ExecEvent::Stdout(b"first\n".to_vec())
    );
    std::fs::write(&flag, "").unwrap();
    assert_eq!(
        s.next().await.unwrap(),
        ExecEvent::Stderr(b"second\n".to_vec())
    );
    match s.next().await.unwrap() {
        ExecEvent::Exit(e) => assert_eq!(e.code, 0),
        other => panic!("expected exit, got {other:?}"),
    }
}

#[tokio::test]
async fn feeds_stdin_and_closes_it() {
    let a = TestAgent::start();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    let mut s = a.client.exec_stream(req).await.unwrap();
    s.send_stdin(b"hello\n").await.unwrap();
    assert_eq!(
        s.next().await.unwrap(),
        ExecEvent::Stdout(b"hello\n".to_vec())
    );
    s.close_stdin().await.unwrap();
    assert!(matches!(s.next().await.unwrap(), ExecEvent::Exit(e) if e.code == 0));

    // Without stdin the command reads /dev/null and does not hang.
    let out = a.client.exec(argv(&["cat"])).await.unwrap();
    assert_eq!((out.exit.code, out.stdout.len()), (0, 0));
}

#[tokio::test]
async fn moves_megabytes_through_stdin_and_stdout_at_once() {
    let a = TestAgent::start();
    // Output flows back while input is still being sent: neither side may
    // wait for the other.
    let mut req = argv(&["cat"]);
    req.stdin = true;
    let (mut output, mut input) = a
        .client
        .exec_stream(req)
        .await
        .unwrap()
        .into_split()
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        input.send_stdin(&sent).await.unwrap();
        input.close_stdin().await.unwrap();
    });
    let mut stdout = Vec::new();
    loop {
        match output.next().await.unwrap() {
            ExecEvent::Stdout(d) => stdout.extend(d),
            ExecEvent::Stderr(d) => panic!("unexpected stderr {d:?}"),
            ExecEvent::Exit(e) => {
                assert_eq!(e.code, 0);
                break;
            }
        }
    }
    writer.await.unwrap();
    assert_eq!(stdout.len(), data.len());
    assert!(stdout == data, "stdin came back altered");
}

#[tokio::test]
async fn timeout_kills_the_command() {
    let a = TestAgent::start();
    let mut req = sh("echo started; sleep 30");
    req.timeout_ms = Some(300);
    let out = a.client.exec(req).await.unwrap();
    assert!(out.exit.timed_out);
    assert_eq!((out.exit.code, out.exit.signal), (137, Some(9)));
    assert_eq!(out.stdout, b"started\n");
}

/// Starts `sh` with a background grandchild and returns (stream, grandchild pid).
async fn with_grandchild(a: &TestAgent) -> (agent_client::ExecStream, u32) {
    let mut s = a
        .client
        .exec_stream(sh("sleep 1000 & echo $!; wait"))
        .await
        .unwrap();
    let ExecEvent::Stdout(line) = s.next().await.unwrap() else {
        panic!("expected the grandchild pid");
    };
    let pid: u32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
    assert!(alive(pid));
    (s, pid)
}

#[tokio::test]
async fn kill_reaches_the_whole_process_group() {
    let a = TestAgent::start();
    let (mut s, grandchild) = with_grandchild(&a).await;
    s.kill(None).await.unwrap();
    match s.next().await.unwrap() {
        ExecEvent::Exit(e) => assert_eq!((e.code, e.signal), (137, Some(9))),
        other => panic!("expected exit, got {other:?}"),
    }
    wait_until("the grandchild died", Duration::from_secs(10), || {
        !alive(grandchild)
    })
    .await;
}

#[tokio::test]
async fn client_disconnect_kills_the_whole_process_group() {
    let a = TestAgent::start();
    let (s, grandchild) = with_grandchild(&a).await;
    drop(s);
    wait_until("the grandchild died", Duration::from_secs(10), || {
        !alive(grandchild)
    })
    .await;
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while a.client.activity().await.unwrap().running_execs != 0 {
        assert!(
            std::time::Instant::now() < end,
            "the exec is still counted as running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn layers_env_and_honours_cwd() {
    let a = TestAgent::start_with(serde_json::json!({
        "env": {"A": "from-config", "B": "from-config", "LANG": "xx_YY.UTF-8"}
    }));
    let mut req = sh("echo $A $B $LANG $C; pwd; env | grep -c OUTER_SECRET || true");
    req.env = BTreeMap::from([
        ("B".to_string(), "from-request".to_string()),
        ("C".to_string(), "only-request".to_string()),
    ]);
    req.cwd = Some(a.dir.path().display().to_string());
    let out = a.client.exec(req).await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "from-config from-request xx_YY.UTF-8 only-request"
    );
    let real = std::fs::canonicalize(a.dir.path()).unwrap();
    assert_eq!(lines[1], real.display().to_string());
    // The agent's own environment does not leak into commands.
    let out = a.client.exec(sh("env | cut -d= -f1 | sort")).await.unwrap();
    let names = String::from_utf8(out.stdout).unwrap();
    assert!(
        !names
            .lines()
            .any(|n| n == "CARGO_MANIFEST_DIR" || n == "RUST_TEST_THREADS"),
        "{names}"
    );
    assert!(names.lines().any(|n| n == "PATH"));
}

#[tokio::test]
async fn detached_commands_run_on_with_output_in_a_file() {
    let a = TestAgent::start();
    let started = a
        .client
        .spawn(sh("echo hello; sleep 0.2; echo bye"))
        .await
        .unwrap();
    assert!(started.pid > 0);
    let log = std::path::PathBuf::from(started.log_path.expect("log path"));
    wait_until(
        "the detached command finished",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|s| s == "hello\nbye\n"),
    )
    .await;
    wait_until(
        "the detached command was reaped",
        Duration::from_secs(10),
        || !std::path::Path::new(&format!("/proc/{}", started.pid)).exists(),
    )
    .await;
    // An explicit log path is honoured.
    let mut req = sh("echo there");
    req.log_path = Some(a.path("mine.log").display().to_string());
    a.client.spawn(req).await.unwrap();
    wait_until("the named log was written", Duration::from_secs(10), || {
        std::fs::read_to_string(a.path("mine.log")).is_ok_and(|s| s == "there\n")
    })
    .await;
}

#[tokio::test]
async fn reaps_every_child_after_many_short_execs() {
    let a = TestAgent::start();
    for i in 0..100 {
        let out = a.client.exec(sh(&format!("exit {}", i % 7))).await.unwrap();
        assert_eq!(out.exit.code, i % 7);
    }
    // Background children left by commands are reaped too.
    a.client.exec(sh("sleep 0.05 &")).await.unwrap();
    wait_until("no zombies remain", Duration::from_secs(10), || {
        zombies_of(a.pid()).is_empty()
    })
    .await;
}

#[tokio::test]
async fn bad_commands_get_clear_errors_and_the_connection_lives_on() {
    let a = TestAgent::start();
    let err = a
        .client
        .exec(argv(&["/no/such/program"]))
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::SpawnFailed));
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    let err = a.client.exec(argv(&[])).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    let mut req = argv(&["true"]);
    req.cwd = Some("/no/such/dir".into());
    let err = a.client.exec(req).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
    assert!(err.to_string().contains("/no/such/dir"));
    let mut req = argv(&["true"]);
    req.env.insert("A=B".into(), "x".into());
    assert_eq!(
        a.client.exec(req).await.unwrap_err().agent_code(),
        Some(ErrorCode::BadRequest)
    );
    // The pooled connection that carried the errors still works.
    assert_eq!(a.client.exec(argv(&["true"])).await.unwrap().exit.code, 0);
}

#[tokio::test]
async fn runs_commands_as_the_configured_user() {
    if !is_root() {
        testkit::cannot_run("runs_commands_as_the_configured_user: needs root to switch users");
        return;
    }
    let a =
        TestAgent::start_with(serde_json::json!({"run_as": {"uid": {"uid": 65534, "gid": 65534}}}));
    let out = a.client.exec(sh("id -u; id -g")).await.unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "65534\n65534\n");
    // Files the host writes belong to that user by default.
    let p = a.path("owned");
    a.client
        .write_file(&p.display().to_string(), b"x", Default::default())
        .await
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&p).unwrap().uid(), 65534);
}

#[tokio::test]
async fn activity_reflects_running_commands() {
    let a = TestAgent::start();
    let before = a.client.activity().await.unwrap();
    let mut s = a.client.exec_stream(sh("echo go; sleep 30")).await.unwrap();
    assert!(matches!(s.next().await.unwrap(), ExecEvent::Stdout(_)));
    let during = a.client.activity().await.unwrap();
    assert_eq!(during.running_execs, 1);
    assert!(during.connections >= 2);
    assert!(during.last_activity_unix_ms >= before.last_activity_unix_ms);
    s.kill(None).await.unwrap();
    assert!(matches!(s.next().await.unwrap(), ExecEvent::Exit(_)));
    assert_eq!(a.client.activity().await.unwrap().running_execs, 0);
}
