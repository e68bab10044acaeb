//! Observability: the daemon's Prometheus metrics (hand-written text
//! format, docs/operations.md lists the series), request ids, and the
//! version header on every API response.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const VERSION: HeaderName = HeaderName::from_static("x-bhatti-version");
/// The oldest CLI that speaks this API (`api_types::MIN_CLIENT_VERSION`).
pub const MIN_CLIENT: HeaderName = HeaderName::from_static("x-bhatti-min-client");

/// Longest client-supplied request id kept; longer ones are replaced.
pub const MAX_REQUEST_ID: usize = 128;

/// Upper bounds (seconds) of every histogram's buckets.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One histogram: per-bucket counts (not cumulative), sum and count.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// A label set, in order: `[(name, value)]`.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
struct Families {
    requests: BTreeMap<Labels, u64>,
    request_seconds: BTreeMap<Labels, Histogram>,
    thermal_seconds: BTreeMap<Labels, Histogram>,
    agent_seconds: BTreeMap<Labels, Histogram>,
}

/// The daemon's counters and histograms. Gauges (sandboxes, users, VMM
/// memory) are read at scrape time.
#[derive(Debug, Default)]
pub struct Metrics {
    families: Mutex<Families>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Families) -> T) -> T {
        f(&mut self.families.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// An API request answered: `route` is the matched route template.
    pub fn request(&self, method: &str, route: &str, status: u16, secs: f64) {
        self.with(|f| {
            *f.requests
                .entry(vec![
                    ("method", method.to_string()),
                    ("route", route.to_string()),
                    ("status", status.to_string()),
                ])
                .or_default() += 1;
            f.request_seconds
                .entry(vec![
                    ("method", method.to_string()),
                    ("route", route.to_string()),
                ])
                .or_default()
                .observe(secs);
        });
    }

    /// A thermal transition (`warm`, `hot`, `cold`, …) and how long it took;
    /// `from` for a wake (`warm` or `cold`), else empty.
    pub fn thermal(&self, kind: &str, from: &str, secs: f64) {
        self.with(|f| {
            f.thermal_seconds
                .entry(vec![("kind", kind.to_string()), ("from", from.to_string())])
                .or_default()
                .observe(secs);
        });
    }

    /// A guest agent call (`exec`, …) answered, and how long it took.
    pub fn agent_call(&self, call: &'static str, secs: f64) {
        self.with(|f| {
            f.agent_seconds
                .entry(vec![("call", call.to_string())])
                .or_default()
                .observe(secs);
        });
    }

    /// The text exposition (format 0.0.4) of these metrics and `gauges`.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        let mut by_name: BTreeMap<&str, Vec<&Gauge>> = BTreeMap::new();
        for g in gauges {
            by_name.entry(g.name).or_default().push(g);
        }
        for (name, gs) in by_name {
            header(&mut out, name, gs[0].help, "gauge");
            for g in gs {
                sample(&mut out, name, &g.labels, g.value);
            }
        }
        self.with(|f| {
            header(
                &mut out,
                "bhatti_http_requests_total",
                "API requests answered, by method, route template and status.",
                "counter",
            );
            for (labels, n) in &f.requests {
                sample(&mut out, "bhatti_http_requests_total", labels, *n as f64);
            }
            histograms(
                &mut out,
                "bhatti_http_request_duration_seconds",
                "API request latency (to the response head), by method and route template.",
                &f.request_seconds,
            );
            histograms(
                &mut out,
                "bhatti_thermal_transition_duration_seconds",
                "Thermal transitions (warm = pause, cold = snapshot, hot = wake from `from`).",
                &f.thermal_seconds,
            );
            histograms(
                &mut out,
                "bhatti_agent_call_duration_seconds",
                "Calls to the guest agent, by call.",
                &f.agent_seconds,
            );
        });
        out
    }
}

/// A value read at scrape time.
#[derive(Debug, Clone)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Labels,
    pub value: f64,
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histograms(out: &mut String, name: &str, help: &str, family: &BTreeMap<Labels, Histogram>) {
    header(out, name, help, "histogram");
    for (labels, h) in family {
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let mut l = labels.clone();
            l.push(("le", format_value(*bound)));
            sample(out, &format!("{name}_bucket"), &l, cumulative as f64);
        }
        let mut l = labels.clone();
        l.push(("le", "+Inf".into()));
        sample(out, &format!("{name}_bucket"), &l, h.count as f64);
        sample(out, &format!("{name}_sum"), labels, h.sum);
        sample(out, &format!("{name}_count"), labels, h.count as f64);
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&'static str, String)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(value));
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text: `\` and newline escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A client's request id if it is sane (1–128 visible ASCII characters).
pub fn sane_request_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= MAX_REQUEST_ID && s.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(s)
}

/// A new request id: 16 random hex digits.
pub fn new_request_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No randomness: a counter still tells requests apart.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        b = N
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_be_bytes();
    }
    hex::encode(b)
}

/// Middleware over every API route: a request id (the client's if sane,
/// else a new one) on the response and on every log line of the request
/// (a span), `X-Bhatti-Version`, and the request counted and timed under
/// its route template (never the raw path: bounded cardinality).
pub async fn track(
    State(metrics): State<std::sync::Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(sane_request_id)
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let span = tracing::info_span!("request", request_id = %id, %method, %route);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.in_scope(|| tracing::debug!(status, "answered"));
    metrics.request(
        known_method(&method),
        &route,
        status,
        started.elapsed().as_secs_f64(),
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp.headers_mut()
        .insert(VERSION, HeaderValue::from_static(env!("CARGO_PKG_VERSION")));
    resp.headers_mut().insert(
        MIN_CLIENT,
        HeaderValue::from_static(api_types::MIN_CLIENT_VERSION),
    );
    resp
}

/// The method as a label: one of the standard ones, else `other`.
fn known_method(m: &str) -> &str {
    match m {
        "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" | "CONNECT" | "TRACE" => m,
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("plain/{id}"), "plain/{id}");
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let m = Metrics::default();
        m.request("GET", "/sandboxes/{id}", 200, 0.003);
        m.request("GET", "/sandboxes/{id}", 404, 0.2);
        m.request("GET", "/sandboxes/{id}", 200, 100.0);
        let text = m.render(&[Gauge {
            name: "bhatti_users",
            help: "Users.",
            labels: vec![],
            value: 2.0,
        }]);
        assert!(
            text.contains("# TYPE bhatti_users gauge\nbhatti_users 2\n"),
            "{text}"
        );
        assert!(text.contains(
            "bhatti_http_requests_total{method=\"GET\",route=\"/sandboxes/{id}\",status=\"200\"} 2\n"
        ), "{text}");
        let b = |le: &str| {
            format!(
            "bhatti_http_request_duration_seconds_bucket{{method=\"GET\",route=\"/sandboxes/{{id}}\",le=\"{le}\"}}"
        )
        };
        assert!(text.contains(&format!("{} 0\n", b("0.001"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", b("0.005"))), "{text}");
        assert!(text.contains(&format!("{} 2\n", b("0.25"))), "{text}");
        assert!(text.contains(&format!("{} 2\n", b("60"))), "{text}");
        assert!(text.contains(&format!("{} 3\n", b("+Inf"))), "{text}");
        assert!(text.contains("bhatti_http_request_duration_seconds_sum{method=\"GET\",route=\"/sandboxes/{id}\"} 100.203"), "{text}");
        assert!(text.contains("bhatti_http_request_duration_seconds_count{method=\"GET\",route=\"/sandboxes/{id}\"} 3\n"), "{text}");
        // Each family's HELP and TYPE once.
        assert_eq!(
            text.matches("# TYPE bhatti_http_requests_total counter")
                .count(),
            1
        );
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let ok = HeaderValue::from_static("abc-123_XYZ");
        assert_eq!(sane_request_id(&ok), Some("abc-123_XYZ"));
        for bad in ["", "has space", &"x".repeat(MAX_REQUEST_ID + 1)] {
            assert_eq!(
                sane_request_id(&HeaderValue::from_str(bad).unwrap()),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(
            sane_request_id(&HeaderValue::from_bytes(b"\xff\xfe").unwrap()),
            None
        );
        let a = new_request_id();
        assert_eq!(a.len(), 16);
        assert_ne!(a, new_request_id());
    }
}
