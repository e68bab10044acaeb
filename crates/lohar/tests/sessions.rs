//! PTY sessions through a real agent.

mod common;

use std::time::Duration;

use agent_client::{SessionEvent, SessionStream};
use common::*;
use proto::{ErrorCode, ExecRequest, WindowSize, MAX_SESSIONS};

fn shell(name: Option<&str>) -> ExecRequest {
    let mut req = argv(&["sh"]);
    req.session = name.map(String::from);
    req.env.insert("PS1".into(), "$ ".into());
    req
}

/// Reads output until `needle` has appeared; returns everything read.
async fn read_until(s: &mut SessionStream, needle: &str) -> String {
    let mut seen = String::new();
    let fut = async {
        while !seen.contains(needle) {
            match s.next().await.unwrap() {
                SessionEvent::Output(d) => seen.push_str(&String::from_utf8_lossy(&d)),
                other => panic!("expected output, got {other:?} after {seen:?}"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .is_err()
    {
        panic!("never saw {needle:?}; saw {seen:?}");
    }
    seen
}

#[tokio::test]
async fn runs_a_shell_in_a_terminal_and_resizes_it() {
    let a = TestAgent::start();
    let mut s = a.client.open_session(shell(Some("main"))).await.unwrap();
    assert_eq!(s.name, "main");
    s.write(b"tty; echo $TERM\n").await.unwrap();
    let out = read_until(&mut s, "xterm-256color").await;
    assert!(out.contains("/dev/pts/"), "{out}");
    s.resize(WindowSize {
        rows: 50,
        cols: 132,
    })
    .await
    .unwrap();
    s.write(b"stty size\n").await.unwrap();
    read_until(&mut s, "50 132").await;
    s.write(b"exit 7\n").await.unwrap();
    loop {
        match s.next().await.unwrap() {
            SessionEvent::Output(_) => continue,
            SessionEvent::Exit(e) => {
                assert_eq!(e.code, 7);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(a.client.sessions().await.unwrap().is_empty());
}

#[tokio::test]
async fn detach_keeps_the_session_and_reattach_replays_scrollback() {
    let a = TestAgent::start();
    let mut s = a.client.open_session(shell(Some("work"))).await.unwrap();
    s.write(b"echo marker-$((40+2))\n").await.unwrap();
    read_until(&mut s, "marker-42").await;
    s.detach().await.unwrap();

    let list = a.client.sessions().await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(!list[0].attached);
    assert!(list[0].scrollback_bytes > 0);

    let mut s = a.client.attach("work", false, None).await.unwrap();
    let replay = read_until(&mut s, "marker-42").await;
    assert!(replay.contains("echo marker-$((40+2))"), "{replay}");
    s.write(b"echo live-$((1+1))\n").await.unwrap();
    read_until(&mut s, "live-2").await;

    // Dropping the connection detaches without killing.
    drop(s);
    let mut ok = false;
    for _ in 0..100 {
        let l = a.client.sessions().await.unwrap();
        if l.len() == 1 && !l[0].attached {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "session should survive a dropped connection, detached");
    let mut s = a
        .client
        .attach("work", false, Some(WindowSize { rows: 30, cols: 90 }))
        .await
        .unwrap();
    read_until(&mut s, "live-2").await;
    s.write(b"stty size\n").await.unwrap();
    read_until(&mut s, "30 90").await;
}

#[tokio::test]
async fn scrollback_is_capped_at_64_kib() {
    let a = TestAgent::start();
    let mut s = a.client.open_session(shell(Some("big"))).await.unwrap();
    s.write(b"i=0; while [ $i -lt 3000 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done; echo done-$((1+1))\n")
        .await
        .unwrap();
    read_until(&mut s, "done-2").await;
    s.detach().await.unwrap();
    let info = a.client.session("big").await.unwrap();
    assert_eq!(info.scrollback_bytes, 64 * 1024);
    let mut s = a.client.attach("big", false, None).await.unwrap();
    let replay = read_until(&mut s, "done-2").await;
    assert!(
        !replay.contains("line-0-"),
        "oldest output must have been dropped"
    );
    assert!(replay.contains("line-2999-"));
}

#[tokio::test]
async fn refuses_to_steal_an_attached_session_unless_asked() {
    let a = TestAgent::start();
    let mut first = a.client.open_session(shell(Some("shared"))).await.unwrap();
    first.write(b"echo one\n").await.unwrap();
    read_until(&mut first, "one").await;
    let err = a.client.attach("shared", false, None).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::SessionAttached));
    let mut second = a.client.attach("shared", true, None).await.unwrap();
    // The first client is told, and its attachment ends.
    loop {
        match first.next().await.unwrap() {
            SessionEvent::Output(_) => continue,
            SessionEvent::TakenOver(msg) => {
                assert!(msg.contains("shared"));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    second.write(b"echo two\n").await.unwrap();
    read_until(&mut second, "two").await;
}

#[tokio::test]
async fn lists_queries_and_kills_sessions() {
    let a = TestAgent::start();
    let s1 = a.client.open_session(shell(Some("a1"))).await.unwrap();
    let mut req = argv(&["sleep", "1000"]);
    req.session = None;
    let s2 = a.client.open_session(req).await.unwrap();
    assert!(s2.name.starts_with('s'), "generated name {}", s2.name);
    let names: Vec<String> = a
        .client
        .sessions()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session)
        .collect();
    assert_eq!(names, vec!["a1".to_string(), s2.name.clone()]);
    let info = a.client.session("a1").await.unwrap();
    assert!(info.attached);
    assert_eq!(info.pid, s1.pid);
    assert_eq!(info.argv, vec!["sh"]);
    let act = a.client.activity().await.unwrap();
    assert_eq!((act.sessions, act.attached), (2, 2));

    // A session that ignores SIGTERM and SIGHUP still goes (SIGKILL after the grace).
    let stubborn = a
        .client
        .open_session({
            let mut r = sh("trap '' TERM HUP; echo trapped; while :; do sleep 1; done");
            r.session = Some("stubborn".into());
            r
        })
        .await
        .unwrap();
    drop(stubborn);
    a.client.kill_session("a1").await.unwrap();
    a.client.kill_session(&s2.name).await.unwrap();
    a.client.kill_session("stubborn").await.unwrap();
    assert!(a.client.sessions().await.unwrap().is_empty());
    assert!(!alive(s1.pid) && !alive(s2.pid));
    let err = a.client.kill_session("a1").await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
    let err = a.client.session("nope").await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn rejects_bad_and_duplicate_session_names() {
    let a = TestAgent::start();
    let _s = a.client.open_session(shell(Some("dup"))).await.unwrap();
    let err = a.client.open_session(shell(Some("dup"))).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::SessionExists));
    let err = a
        .client
        .open_session(shell(Some("../etc")))
        .await
        .unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    let mut req = shell(Some("tiny"));
    req.size = Some(WindowSize { rows: 0, cols: 80 });
    let err = a.client.open_session(req).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::BadRequest));
    let err = a.client.attach("missing", false, None).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn caps_the_number_of_sessions() {
    let a = TestAgent::start();
    let mut held = Vec::new();
    for i in 0..MAX_SESSIONS {
        let mut req = argv(&["sleep", "1000"]);
        req.session = Some(format!("n{i}"));
        held.push(a.client.open_session(req).await.unwrap());
    }
    let mut req = argv(&["sleep", "1000"]);
    req.session = Some("one-too-many".into());
    let err = a.client.open_session(req).await.unwrap_err();
    assert_eq!(err.agent_code(), Some(ErrorCode::TooManySessions));
    assert!(err.to_string().contains("20"), "{err}");
    // Room again once one goes.
    a.client.kill_session("n0").await.unwrap();
    let mut req = argv(&["sleep", "1000"]);
    req.session = Some("fits-now".into());
    a.client.open_session(req).await.unwrap();
}

#[tokio::test]
async fn idle_detached_sessions_are_killed() {
    let a = TestAgent::start_with(serde_json::json!({"session_idle_timeout_secs": 1}));
    let s = a.client.open_session(shell(Some("idle"))).await.unwrap();
    let pid = s.pid;
    // Attached sessions are never idle-killed, however quiet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.client.sessions().await.unwrap().len(), 1);
    s.detach().await.unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while !a.client.sessions().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < end,
            "idle session was not killed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until(
        "the idle session's shell died",
        Duration::from_secs(10),
        || !alive(pid),
    )
    .await;
}

#[tokio::test]
async fn the_init_command_starts_detached_with_its_output_in_its_log() {
    let a = TestAgent::start_with(serde_json::json!({
        "env": {"GREETING": "hello"},
        "init_command": ["sh", "-c",
            "echo \"$GREETING sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$\"; echo err >&2; exec sleep 1000"]
    }));
    let log = a.path("init.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "the init command wrote its log",
        Duration::from_secs(20),
        || read().contains("err\n"),
    )
    .await;
    let text = read();
    let pid: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("[bhatti] init started: pid "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no start line: {text:?}"));
    // Its own session (not a PTY session of the agent), the agent's env.
    assert!(
        text.contains(&format!("hello sid={pid} pid={pid}\n")),
        "{text:?}"
    );
    assert!(a.client.sessions().await.unwrap().is_empty());
    assert!(alive(pid));
    // Its end is noted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("its end is in the log", Duration::from_secs(20), || {
        read().contains("[bhatti] init was killed by SIGTERM\n")
    })
    .await;
}

/// A session that exits while its output is still queued: the relay sees
/// the session end (its kick sender dropped) with output waiting, and must
/// keep relaying, then report the exit, without polling the finished kick
/// channel again (that panicked the agent's connection task).
#[tokio::test]
async fn a_session_that_exits_mid_output_reports_all_output_and_its_exit() {
    let a = TestAgent::start();
    for round in 0..6u32 {
        let lines = 12_000 + 3_000 * round;
        let mut req = argv(&["sh", "-c", &format!("seq 1 {lines}; exit 3")]);
        req.session = Some(format!("burst{round}"));
        let mut s = a.client.open_session(req).await.unwrap();
        // A slow client: wait (bounded) until the session has ended, so its
        // output is queued in the agent when the relay learns of the end.
        for _ in 0..50 {
            if a.client.sessions().await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut out = String::new();
        let exit = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.next().await {
                    Ok(SessionEvent::Output(d)) => out.push_str(&String::from_utf8_lossy(&d)),
                    Ok(SessionEvent::Exit(e)) => return e,
                    other => panic!("round {round}: {other:?} after {} bytes", out.len()),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: no exit"));
        assert_eq!(exit.code, 3, "round {round}");
        assert!(
            out.contains(&format!("\n{lines}")),
            "round {round}: output lost"
        );
    }
}
