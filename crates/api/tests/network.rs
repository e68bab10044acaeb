//! The daemon's network services on real VMs: the firewall keeps sandboxes
//! off the host (but DNS), and the gateway's DNS answers each user with
//! their own sandboxes' names only.

mod common;

use common::*;

#[test]
fn sandboxes_resolve_their_siblings_and_cannot_reach_the_host() {
    in_netns("api-net", || async {
        let data = data_dir();
        // Relay unknown names to a loopback port where nothing listens: no
        // query ever leaves the test's namespace.
        let d = TestDaemon::start(config(
            data.path(),
            "[network]\ndns_upstream = \"127.0.0.1:9\"\n",
        ))
        .await;
        let alice = d.client(&d.user("alice", 5));
        let bob = d.client(&d.user("bob", 5));
        alice.create("web").await;
        let db = alice.create("db").await;
        bob.create("other").await;
        let db_ip = db["ip"].as_str().unwrap().to_string();

        // DNS on the gateway: a sibling's name resolves for its own user...
        let (_, out) = alice.exec("web", &["nslookup", "db"]).await;
        let text = out["stdout"].as_str().unwrap();
        assert!(text.contains(&db_ip), "{out}");
        // ...and not for another user (unknown names are relayed, and the
        // relay goes nowhere here).
        let (_, out) = bob.exec("other", &["nslookup", "db"]).await;
        assert!(!out["stdout"].as_str().unwrap().contains(&db_ip), "{out}");
        assert_ne!(out["exit_code"], 0, "{out}");

        // A service on the host's side of the bridge: sandboxes may not
        // open connections to it.
        let listener = tokio::net::TcpListener::bind("10.210.0.1:8701")
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost\n").await;
            }
        });
        let (_, out) = alice
            .exec(
                "web",
                &[
                    "wget",
                    "-q",
                    "-T",
                    "3",
                    "-O",
                    "-",
                    "http://10.210.0.1:8701/",
                ],
            )
            .await;
        assert_ne!(out["exit_code"], 0, "a sandbox reached the host: {out}");
        assert!(!out["stdout"].as_str().unwrap().contains("host"), "{out}");
        // The host's own connections to sandboxes still work (that is how
        // every exec above got here), and so does the gateway's DNS port:
        let (_, out) = alice.exec("db", &["nslookup", "web", "10.210.0.1"]).await;
        assert_eq!(out["exit_code"], 0, "{out}");

        // Exactly one copy of each rule, also after a restart.
        d.stop().await;
        let d = TestDaemon::start(config(
            data.path(),
            "[network]\ndns_upstream = \"127.0.0.1:9\"\n",
        ))
        .await;
        let rules = testkit::run("iptables-save", &[]);
        assert_eq!(rules.matches("-j BHATTI-FWD").count(), 1, "{rules}");
        assert_eq!(rules.matches("-j BHATTI-IN").count(), 1, "{rules}");
        assert_eq!(rules.matches("MASQUERADE").count(), 1, "{rules}");
        d.stop().await;
    });
}
