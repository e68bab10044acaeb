//! Human output: aligned tables, key/value blocks, sizes and ages. Pure
//! string building; the commands decide where it goes.

use api_types::{FileEntry, Sandbox, SecretSummary, SessionSummary};

/// A table whose columns are padded to their widest cell, two spaces
/// apart; the last column is not padded.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "row width");
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let last = cells.len() - 1;
            let mut line = String::new();
            for (i, c) in cells.iter().enumerate() {
                line.push_str(c);
                if i != last {
                    line.extend(std::iter::repeat_n(' ', widths[i] - width(c) + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key:  value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k}:{}{v}\n", " ".repeat(w - k.len() + 2)))
        .collect()
}

/// How long ago `then_ms` was, compactly: `42s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// How long until `then_ms`, compactly: `59m`, `23h`, `6d`; `expired`.
pub fn until(now_ms: i64, then_ms: i64) -> String {
    let s = (then_ms - now_ms) / 1000;
    match s {
        ..=0 => "expired".into(),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `bhatti share --list`: one live link a line.
pub fn shares_table(list: &[api_types::Share], now_ms: i64) -> String {
    let mut out = format!(
        "{:<16} {:<10} {:<10} {}\n",
        "ID", "ACCESS", "EXPIRES", "CREATED"
    );
    for s in list {
        out.push_str(&format!(
            "{:<16} {:<10} {:<10} {}\n",
            s.id,
            if s.read_only {
                "read-only"
            } else {
                "read-write"
            },
            format!("in {}", until(now_ms, s.expires_at)),
            ago(now_ms, s.created_at)
        ));
    }
    out
}

/// A byte count with a binary unit: `512`, `1.5K`, `12M`, `3.0G`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut v = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v < 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

/// Memory given in MiB: `512M`, `2G`.
pub fn memory(mb: u64) -> String {
    if mb >= 1024 && mb.is_multiple_of(1024) {
        format!("{}G", mb / 1024)
    } else {
        format!("{mb}M")
    }
}

/// `ls -l` style mode: `drwxr-xr-x`.
pub fn mode_string(kind: &str, mode: u32) -> String {
    let t = match kind {
        "dir" => 'd',
        "symlink" => 'l',
        "file" => '-',
        _ => '?',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn or_dash(v: Option<&str>) -> String {
    v.filter(|s| !s.is_empty()).unwrap_or("-").to_string()
}

fn labels(l: &std::collections::BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn sandboxes_table(list: &[Sandbox], now_ms: i64) -> String {
    let mut t = Table::new(&[
        "NAME", "STATUS", "THERMAL", "IMAGE", "CPUS", "MEMORY", "IP", "CREATED",
    ]);
    for s in list {
        t.row(vec![
            s.name.clone(),
            s.status.to_string(),
            s.thermal.to_string(),
            s.image.clone(),
            s.cpus.to_string(),
            memory(s.memory_mb),
            or_dash(s.ip.as_deref()),
            ago(now_ms, s.created_at),
        ]);
    }
    t.render()
}

fn egress(e: &api_types::Egress) -> String {
    match e {
        api_types::Egress::Public => "public".into(),
        api_types::Egress::None => "none".into(),
        api_types::Egress::Allow(list) if list.is_empty() => "allow (nothing but DNS)".into(),
        api_types::Egress::Allow(list) => format!("allow {}", list.join(",")),
    }
}

pub fn sandbox_details(s: &Sandbox, now_ms: i64) -> String {
    let mut status = s.status.to_string();
    if let Some(r) = s.status_reason.as_deref().filter(|r| !r.is_empty()) {
        status.push_str(&format!(" ({r})"));
    }
    let mut pairs = vec![
        ("name", s.name.clone()),
        ("id", s.id.clone()),
        ("status", status),
        (
            "thermal",
            format!("{} (since {})", s.thermal, ago(now_ms, s.thermal_since)),
        ),
        ("image", s.image.clone()),
        ("cpus", s.cpus.to_string()),
        ("memory", memory(s.memory_mb)),
        ("disk", memory(s.disk_size_mb)),
        ("ip", or_dash(s.ip.as_deref())),
        ("keep_hot", s.keep_hot.to_string()),
        ("labels", labels(&s.labels)),
        ("egress", egress(&s.egress)),
        ("created", ago(now_ms, s.created_at)),
    ];
    if !s.published.is_empty() {
        let urls = s
            .published
            .iter()
            .map(|p| format!("{} (port {})", p.url, p.port))
            .collect::<Vec<_>>()
            .join(", ");
        pairs.push(("published", urls));
    }
    if let Some(init) = &s.init {
        pairs.push(("init", init.clone()));
    }
    key_values(&pairs)
}

pub fn ports_table(list: &[api_types::Port]) -> String {
    let mut t = Table::new(&["PORT", "ADDRESS", "PROTOCOL"]);
    for p in list {
        t.row(vec![
            p.port.to_string(),
            p.address.clone(),
            p.protocol.clone(),
        ]);
    }
    t.render()
}

pub fn sessions_table(list: &[SessionSummary], now_ms: i64) -> String {
    let mut t = Table::new(&["SESSION", "PID", "ATTACHED", "CREATED", "ACTIVE", "CMD"]);
    for s in list {
        t.row(vec![
            s.session.clone(),
            s.pid.to_string(),
            if s.attached { "yes" } else { "no" }.into(),
            ago(now_ms, s.created_at),
            ago(now_ms, s.last_activity_at),
            s.cmd.join(" "),
        ]);
    }
    t.render()
}

pub fn listing_table(entries: &[FileEntry], now_ms: i64) -> String {
    let mut t = Table::new(&["MODE", "SIZE", "MODIFIED", "NAME"]);
    for e in entries {
        let name = match &e.symlink_target {
            Some(target) => format!("{} -> {target}", e.name),
            None if e.kind == "dir" => format!("{}/", e.name),
            None => e.name.clone(),
        };
        t.row(vec![
            mode_string(&e.kind, e.mode),
            size(e.size),
            ago(now_ms, e.mtime_ms),
            name,
        ]);
    }
    t.render()
}

pub fn secrets_table(list: &[SecretSummary], now_ms: i64) -> String {
    let mut t = Table::new(&["NAME", "CREATED", "UPDATED"]);
    for s in list {
        t.row(vec![
            s.name.clone(),
            ago(now_ms, s.created_at),
            ago(now_ms, s.updated_at),
        ]);
    }
    t.render()
}

/// Where a volume is attached: `dev:/data, ci:/data(ro)`, or `-`.
fn volume_uses(v: &api_types::Volume) -> String {
    if v.attachments.is_empty() {
        return "-".into();
    }
    v.attachments
        .iter()
        .map(|a| {
            format!(
                "{}:{}{}",
                a.sandbox,
                a.mount,
                if a.read_only { "(ro)" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `bhatti volume list`.
pub fn volumes_table(list: &[api_types::Volume], now_ms: i64) -> String {
    let mut t = Table::new(&["NAME", "SIZE", "CREATED", "ATTACHED"]);
    for v in list {
        t.row(vec![
            v.name.clone(),
            memory(v.size_mb),
            ago(now_ms, v.created_at),
            volume_uses(v),
        ]);
    }
    t.render()
}

/// `bhatti volume inspect` (and create, grow).
pub fn volume_details(v: &api_types::Volume, now_ms: i64) -> String {
    key_values(&[
        ("name", v.name.clone()),
        ("size", memory(v.size_mb)),
        ("created", ago(now_ms, v.created_at)),
        ("updated", ago(now_ms, v.updated_at)),
        ("attached", volume_uses(v)),
    ])
}

pub fn checkpoints_table(list: &[api_types::Checkpoint], now_ms: i64) -> String {
    let mut t = Table::new(&[
        "NAME", "SANDBOX", "IMAGE", "CPUS", "MEMORY", "SIZE", "CREATED",
    ]);
    for c in list {
        t.row(vec![
            c.name.clone(),
            c.sandbox.clone(),
            c.image.clone(),
            c.cpus.to_string(),
            memory(c.memory_mb),
            memory(c.bytes >> 20),
            ago(now_ms, c.created_at),
        ]);
    }
    t.render()
}

/// `bhatti checkpoint inspect` (and create).
pub fn checkpoint_details(c: &api_types::Checkpoint, now_ms: i64) -> String {
    key_values(&[
        ("name", c.name.clone()),
        ("id", c.id.clone()),
        ("sandbox", format!("{} ({})", c.sandbox, c.sandbox_id)),
        ("image", c.image.clone()),
        ("cpus", c.cpus.to_string()),
        ("memory", memory(c.memory_mb)),
        ("disk", memory(c.disk_size_mb)),
        ("size on host", memory(c.bytes >> 20)),
        ("created", ago(now_ms, c.created_at)),
    ])
}

/// `bhatti admin status`.
pub fn admin_status(s: &api_types::AdminStatus) -> String {
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let c = &s.capacity;
    let total: u64 = s.sandboxes.values().sum();
    format!(
        "server:     bhatti {} ({} on {}; {})\n\
         users:      {}\n\
         sandboxes:  {total} ({})\n\
         running:    {}\n\
         cpus:       {} of {} allocated to hot and warm sandboxes\n\
         memory:     {} MiB of {} MiB allocated to hot and warm sandboxes; {} MiB available; VMMs resident {} MiB\n",
        s.health.version,
        s.health.engine,
        s.health.accelerator,
        s.health.engine_reason,
        s.users,
        counts(&s.sandboxes),
        counts(&s.running_by_tier),
        c.cpus_allocated,
        c.host_cpus,
        c.memory_mb_allocated,
        c.host_memory_mb,
        c.host_memory_available_mb,
        c.vmm_resident_mb,
    )
}

/// An event's time as UTC `YYYY-MM-DD HH:MM:SS.mmm`.
pub fn event_time(at_ms: i64) -> String {
    let (secs, ms) = (at_ms.div_euclid(1000), at_ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{ms:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn event_detail(d: &serde_json::Value) -> String {
    match d.as_object() {
        Some(o) => o
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v.as_str() {
                Some(s) => format!("{k}={s}"),
                None => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None if d.is_null() => String::new(),
        None => d.to_string(),
    }
}

/// `bhatti events`: time, sandbox, type, details.
pub fn events_table(list: &[api_types::Event]) -> String {
    let mut t = Table::new(&["TIME (UTC)", "SANDBOX", "TYPE", "DETAIL"]);
    for e in list {
        t.row(vec![
            event_time(e.at),
            e.sandbox_id.clone().unwrap_or_else(|| "-".into()),
            e.kind.clone(),
            event_detail(&e.detail),
        ]);
    }
    t.render()
}

/// One followed event (`bhatti events -f`).
pub fn event_line(e: &api_types::Event) -> String {
    format!(
        "{}  {}  {}  {}\n",
        event_time(e.at),
        e.sandbox_id.as_deref().unwrap_or("-"),
        e.kind,
        event_detail(&e.detail)
    )
    .replace("  \n", "\n")
}

/// `bhatti image list`.
pub fn images(list: &[api_types::ImageInfo]) -> String {
    let mut t = Table::new(&["NAME", "KIND", "OWNER", "SHARED", "SIZE", "SOURCE"]);
    for i in list {
        t.row(vec![
            i.name.clone(),
            i.kind.clone(),
            i.owner.clone().unwrap_or_else(|| "-".into()),
            if i.shared { "yes" } else { "no" }.into(),
            size(i.size_bytes),
            i.source.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

/// `bhatti image inspect`.
pub fn image_details(i: &api_types::ImageInfo) -> String {
    let mut pairs = vec![
        ("name", i.name.clone()),
        ("kind", i.kind.clone()),
        ("owner", i.owner.clone().unwrap_or_else(|| "-".into())),
        ("shared", if i.shared { "yes" } else { "no" }.into()),
        ("source", i.source.clone().unwrap_or_default()),
        ("digest", i.digest.clone().unwrap_or_default()),
        ("size", size(i.size_bytes)),
    ];
    if let Some(c) = &i.config {
        let list = |v: &Option<Vec<String>>| {
            v.as_ref()
                .map(|v| serde_json::to_string(v).unwrap_or_default())
                .unwrap_or_else(|| "-".into())
        };
        pairs.push(("env", c.env.join(" ")));
        pairs.push((
            "workdir",
            c.working_dir.clone().unwrap_or_else(|| "-".into()),
        ));
        pairs.push(("user", c.user.clone().unwrap_or_else(|| "-".into())));
        pairs.push(("entrypoint", list(&c.entrypoint)));
        pairs.push(("cmd", list(&c.cmd)));
    }
    key_values(&pairs)
}

/// One line of a task's progress: a bar when the total is known, the
/// bytes so far otherwise.
pub fn task_bar(t: &api_types::Task, elapsed: std::time::Duration) -> String {
    let p = &t.progress;
    let bar = if p.bytes_total > 0 {
        let frac = (p.bytes_done as f64 / p.bytes_total as f64).clamp(0.0, 1.0);
        let filled = (frac * 30.0).round() as usize;
        format!(
            "[{}{}] {:>3}% ",
            "#".repeat(filled),
            "-".repeat(30 - filled),
            (frac * 100.0).round() as u64
        )
    } else {
        String::new()
    };
    format!(
        "{} {}{}  {} ({:.0}s)",
        t.kind,
        bar,
        size(p.bytes_done),
        p.step,
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn events_show_utc_time_sandbox_type_and_details() {
        assert_eq!(event_time(0), "1970-01-01 00:00:00.000");
        assert_eq!(event_time(1_709_210_096_789), "2024-02-29 12:34:56.789");
        let e = api_types::Event {
            id: 1,
            user_id: "u".into(),
            sandbox_id: Some("sb1".into()),
            kind: "hot".into(),
            detail: serde_json::json!({"from": "cold", "took_ms": 12, "reason": null}),
            at: 0,
        };
        assert_eq!(
            event_line(&e),
            "1970-01-01 00:00:00.000  sb1  hot  from=cold took_ms=12\n"
        );
        let t = events_table(&[e]);
        assert!(t.starts_with("TIME (UTC)"), "{t}");
        assert!(t.contains("sb1      hot   from=cold took_ms=12\n"), "{t}");
    }

    #[test]
    fn table_columns_align_and_last_is_unpadded() {
        let mut t = Table::new(&["NAME", "STATUS", "IP"]);
        t.row(vec!["demo".into(), "running".into(), "10.0.0.2".into()]);
        t.row(vec!["a-much-longer-name".into(), "cold".into(), "-".into()]);
        t.row(vec!["ünï".into(), "x".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME                STATUS   IP\n\
             demo                running  10.0.0.2\n\
             a-much-longer-name  cold     -\n\
             ünï                 x\n"
        );
    }

    #[test]
    fn empty_table_is_its_header() {
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn key_values_align() {
        assert_eq!(
            key_values(&[("id", "x".into()), ("status", "running".into())]),
            "id:      x\nstatus:  running\n"
        );
    }

    #[test]
    fn ages_sizes_modes() {
        let now = 1_000_000_000;
        assert_eq!(ago(now, now), "0s ago");
        assert_eq!(ago(now, now + 5000), "0s ago", "clock skew is not negative");
        assert_eq!(ago(now, now - 59_999), "59s ago");
        assert_eq!(ago(now, now - 60_000), "1m ago");
        assert_eq!(ago(now, now - 7_200_000), "2h ago");
        assert_eq!(ago(now, now - 3 * 86_400_000), "3d ago");
        assert_eq!(size(0), "0");
        assert_eq!(size(1023), "1023");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(12 * 1024 * 1024), "12M");
        assert_eq!(size(3 << 30), "3.0G");
        assert_eq!(memory(512), "512M");
        assert_eq!(memory(2048), "2G");
        assert_eq!(memory(1536), "1536M");
        assert_eq!(mode_string("dir", 0o755), "drwxr-xr-x");
        assert_eq!(mode_string("file", 0o640), "-rw-r-----");
        assert_eq!(mode_string("symlink", 0o777), "lrwxrwxrwx");
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            id: "sb_1".into(),
            name: "demo".into(),
            image: "minimal".into(),
            cpus: 2,
            memory_mb: 1024,
            disk_size_mb: 2048,
            status: api_types::SandboxStatus::Failed,
            status_reason: Some("agent did not answer".into()),
            thermal: api_types::Thermal::Cold,
            thermal_since: 0,
            ip: None,
            keep_hot: false,
            labels: BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
            created_at: 0,
            published: vec![],
            egress: api_types::Egress::Allow(vec!["api.example.com".into(), "10.1.2.0/24".into()]),
            init: None,
        }
    }

    #[test]
    fn sandbox_views() {
        let list = sandboxes_table(&[sandbox()], 90_000);
        assert_eq!(
            list,
            "NAME  STATUS  THERMAL  IMAGE    CPUS  MEMORY  IP  CREATED\n\
             demo  failed  cold     minimal  2     1G      -   1m ago\n"
        );
        let d = sandbox_details(&sandbox(), 90_000);
        assert!(
            d.contains("status:    failed (agent did not answer)\n"),
            "{d}"
        );
        assert!(d.contains("labels:    a=1,b=2\n"), "{d}");
        assert!(
            d.contains("egress:    allow api.example.com,10.1.2.0/24\n"),
            "{d}"
        );
        assert!(d.contains("thermal:   cold (since 1m ago)\n"), "{d}");
        assert!(!d.contains("published"), "{d}");
        assert!(!d.contains("init"), "{d}");
        let mut sb = sandbox();
        sb.init = Some("dockerd".into());
        assert!(sandbox_details(&sb, 90_000).contains("init:      dockerd\n"));
        sb.published = vec![api_types::Published {
            port: 3000,
            alias: "demo-3000".into(),
            url: "http://127.0.0.1:8081/demo-3000/".into(),
            listening: None,
        }];
        let d = sandbox_details(&sb, 90_000);
        assert!(
            d.contains("published:  http://127.0.0.1:8081/demo-3000/ (port 3000)\n"),
            "{d}"
        );
    }

    #[test]
    fn listing_marks_dirs_and_links() {
        let e = |name: &str, kind: &str, target: Option<&str>| FileEntry {
            name: name.into(),
            kind: kind.into(),
            size: 2048,
            mode: 0o755,
            mtime_ms: 0,
            symlink_target: target.map(Into::into),
        };
        let out = listing_table(
            &[
                e("src", "dir", None),
                e("cur", "symlink", Some("src")),
                e("a.py", "file", None),
            ],
            0,
        );
        assert_eq!(
            out,
            "MODE        SIZE  MODIFIED  NAME\n\
             drwxr-xr-x  2.0K  0s ago    src/\n\
             lrwxr-xr-x  2.0K  0s ago    cur -> src\n\
             -rwxr-xr-x  2.0K  0s ago    a.py\n"
        );
    }
}
