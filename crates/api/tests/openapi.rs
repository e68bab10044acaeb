//! The OpenAPI document (`GET /openapi.json`) against the router it
//! describes, and against `openapi-spec-validator` (PyPI).
//!
//! - `router_and_document_agree`: walks the built axum router (its own
//!   route table, read from its `Debug` form: not the registrations the
//!   document comes from) and finds each (method, path) in the document,
//!   and each documented one in the router. A route added beside the
//!   document's registration is caught (shown with one).
//! - `served_document_validates_and_matches_the_routes`: a daemon (fake
//!   engine) serves the document without a key; the validator accepts
//!   it and rejects two broken copies (positive controls); every
//!   documented operation answers 401 without a key (200 for the public
//!   ones) and every undocumented method on a documented path 405; a
//!   shell request that is no upgrade is the documented JSON 400.
//!
//! The validator is `$BHATTI_OPENAPI_VALIDATOR` (scripts/test.sh installs
//! it into a venv and sets it) or `openapi-spec-validator` on the PATH;
//! without it the test fails.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use reqwest::Method;
use serde_json::Value;

/// The methods OpenAPI path items have.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// (method, path) of every operation in a document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(m).is_some() {
                ops.insert((m.to_string(), path.clone()));
            }
        }
    }
    ops
}

/// (method, path) of every route of an axum 0.8 router, read from its
/// `Debug` form: `node: Node { paths: {RouteId(n): "/p", …} }` names the
/// paths, `routes: {RouteId(n): MethodRouter(MethodRouter { get: …,
/// head: None, …, fallback: Default(Route), … }), …}` the methods (a
/// non-default method fallback is `any`: every method). Panics on what
/// it cannot read, so a new axum cannot make it pass by reading nothing.
fn routes_of(router: &axum::Router<api::state::AppState>) -> BTreeSet<(String, String)> {
    let dbg = format!("{router:?}");
    let main = dbg.split("fallback_router:").next().expect("a path router");
    let (routes, node) = main
        .split_once("node: Node { paths: {")
        .expect("the router's Debug names its paths");
    let mut paths = std::collections::BTreeMap::new();
    for entry in node.split("RouteId(").skip(1) {
        let (id, rest) = entry.split_once("): \"").expect("RouteId(n): \"path\"");
        let path = rest.split('"').next().expect("a quoted path");
        paths.insert(id.to_string(), path.to_string());
    }
    let routes = routes
        .split_once("routes: {")
        .expect("the router's Debug lists its routes")
        .1;
    let mut ops = BTreeSet::new();
    for entry in routes.split("RouteId(").skip(1) {
        let (id, body) = entry.split_once("): ").expect("RouteId(n): endpoint");
        let path = paths
            .get(id)
            .unwrap_or_else(|| panic!("route {id} has no path in {dbg}"));
        assert!(
            body.starts_with("MethodRouter(MethodRouter {"),
            "route {path} is not a method router (a service?): {body}"
        );
        let field = |name: &str| -> &str {
            let at = body
                .find(&format!(" {name}: "))
                .unwrap_or_else(|| panic!("no {name} in {body}"));
            &body[at + name.len() + 3..]
        };
        let fallback = field("fallback");
        let any = if fallback.starts_with("Default(") {
            false
        } else if fallback.starts_with("BoxedHandler") || fallback.starts_with("Service(") {
            true
        } else {
            panic!("unreadable method fallback of {path}: {fallback}")
        };
        for m in METHODS.iter().chain(&["connect"]) {
            let set = !field(m).starts_with("None");
            if set || (any && *m != "connect") {
                ops.insert((m.to_string(), api::openapi::document_path(path)));
            }
        }
    }
    assert!(!ops.is_empty(), "read no route from {dbg}");
    ops
}

fn diff(a: &BTreeSet<(String, String)>, b: &BTreeSet<(String, String)>) -> Vec<String> {
    a.difference(b).map(|(m, p)| format!("{m} {p}")).collect()
}

#[test]
fn router_and_document_agree() {
    let (router, doc) = api::routes::parts();
    let doc = serde_json::to_value(&doc).unwrap();
    let (routed, documented) = (routes_of(&router), documented(&doc));
    assert!(
        routed.contains(&("get".into(), "/health".into()))
            && routed.contains(&("patch".into(), "/sandboxes/{id}".into()))
            && routed.contains(&("trace".into(), "/sandboxes/{id}/proxy/{port}/{rest}".into())),
        "the walk read the router: {routed:?}"
    );
    assert_eq!(
        diff(&routed, &documented),
        Vec::<String>::new(),
        "routes the document lacks"
    );
    assert_eq!(
        diff(&documented, &routed),
        Vec::<String>::new(),
        "documented operations the router lacks"
    );
    assert!(routed.len() >= 30, "{} operations", routed.len());

    // Control: a route added beside the registrations is found missing.
    let (extra, _) = api::routes::api()
        .route("/extra", axum::routing::post(|| async {}))
        .split_for_parts();
    assert_eq!(
        diff(&routes_of(&extra), &documented),
        vec!["post /extra".to_string()]
    );
}

/// Runs the validator on `doc`; its success and its output.
fn validate(doc: &Value, dir: &Path, name: &str) -> (bool, String) {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    let validator = std::env::var("BHATTI_OPENAPI_VALIDATOR")
        .unwrap_or_else(|_| "openapi-spec-validator".to_string());
    let out = Command::new(&validator)
        .arg("--schema")
        .arg("3.1")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {validator} ({e}): scripts/test.sh installs openapi-spec-validator \
                 from PyPI into a venv and sets BHATTI_OPENAPI_VALIDATOR"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A concrete URL path for a documented one.
fn concrete(path: &str) -> String {
    path.replace("{id}", "nosuch")
        .replace("{port}", "3000")
        .replace("{rest}", "a/b")
        .replace("{name}", "NOSUCH")
        .replace("{share_id}", "shr-nosuch")
        .replace("{file}", "term.js")
}

#[test]
fn served_document_validates_and_matches_the_routes() {
    common::in_netns("openapi", || async {
        let dir = tempfile::tempdir().unwrap();
        let config = common::config(dir.path(), "");
        let engine = vmm::fake::FakeEngine::new(testkit::host_lohar());
        let d = common::TestDaemon::start_with_engine(config, engine).await;
        let http = reqwest::Client::new();

        // Served without a key, as JSON, and the document the code builds.
        let resp = http
            .get(format!("{}/openapi.json", d.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        let doc: Value = resp.json().await.unwrap();
        assert_eq!(doc, serde_json::to_value(api::openapi::document()).unwrap());
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"]["api_key"]["scheme"],
            "bearer"
        );

        let out = tempfile::tempdir().unwrap();
        let (ok, text) = validate(&doc, out.path(), "openapi.json");
        assert!(ok, "the validator refused the document: {text}");

        // Positive controls: the validator refuses broken copies — one
        // without `info`, one whose path template names a parameter no
        // longer declared.
        let mut broken = doc.clone();
        broken.as_object_mut().unwrap().remove("info");
        let (ok, text) = validate(&broken, out.path(), "no-info.json");
        assert!(
            !ok,
            "the validator accepted a document without info: {text}"
        );
        let mut broken = doc.clone();
        broken["paths"]["/sandboxes/{id}"]["get"]["parameters"] = Value::Array(vec![]);
        let (ok, text) = validate(&broken, out.path(), "undeclared.json");
        assert!(
            !ok,
            "the validator accepted an undeclared path parameter: {text}"
        );

        // Every documented operation is served as the document says: 401
        // without a key where it names the API key, 200 where it is
        // public; every method it does not list on a path is a 405 (HEAD
        // aside where GET is listed: axum answers it from GET).
        let ops = documented(&doc);
        let mut checked = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            let url = format!("{}{}", d.url, concrete(path));
            for m in METHODS {
                let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
                let resp = http.request(method, &url).send().await.unwrap();
                let status = resp.status().as_u16();
                let Some(op) = item.get(m) else {
                    if m == "head" && item.get("get").is_some() {
                        continue;
                    }
                    assert_eq!(status, 405, "{m} {path}: not documented, yet served");
                    continue;
                };
                let public = op["security"] == serde_json::json!([{}]);
                // The share WebSocket's token travels inside the socket:
                // a plain GET is refused as no upgrade before any token.
                let share_ws = op["security"] == serde_json::json!([{"share_token": []}])
                    && path.ends_with("/ws");
                let want = if public {
                    200
                } else if share_ws {
                    400
                } else {
                    401
                };
                assert_eq!(status, want, "{m} {path} (public: {public})");
                checked += 1;
            }
        }
        assert_eq!(checked, ops.len());

        // The shell route answers a plain GET (no upgrade) with the
        // document's 400 `{"error"}`, not axum's plain-text rejection.
        let key = d.user("alice", 1);
        let resp = http
            .get(format!("{}/sandboxes/nosuch/ws", d.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("WebSocket upgrade")),
            "{v}"
        );
        d.stop().await;
    });
}
