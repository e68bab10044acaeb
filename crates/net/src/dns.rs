//! A small DNS responder for a sandbox network's gateway: it answers the
//! names of that network's sandboxes (A records) and forwards every other
//! query to an upstream resolver, relaying its answer unchanged.
//!
//! Only what guests need: one question per query, class IN; A answered from
//! the table; AAAA for a known name answered empty (no IPv6 in guests);
//! anything malformed is dropped (a resolver retries or gives up).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

/// Looks a (lower-case) sandbox name up for the guest asking (by its
/// address), so each user's sandboxes see only their own names.
pub type NameLookup = Arc<dyn Fn(&str, std::net::IpAddr) -> Option<Ipv4Addr> + Send + Sync>;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Answers for sandbox names are short-lived: a name may move on recreate.
const TTL_SECS: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// The one question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Lower-case, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past the question (where answers go).
    pub end: usize,
}

/// Parses a query's header and first question; `None` for anything that is
/// not a well-formed standard query.
pub fn parse_query(msg: &[u8]) -> Option<Question> {
    if msg.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    // QR must be 0 (a query) and the opcode 0 (standard).
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qdcount == 0 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        // Compression pointers do not occur in questions of a query.
        if len > 63 {
            return None;
        }
        let label = msg.get(pos..pos + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += len;
        if pos > 12 + 255 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    let qclass = u16::from_be_bytes([*msg.get(pos + 2)?, *msg.get(pos + 3)?]);
    Some(Question {
        id,
        name: labels.join("."),
        qtype,
        qclass,
        end: pos + 4,
    })
}

/// The answer to `q` (the query `msg`) for a known name at `ip`: the
/// question echoed, one A record for A queries, none for others.
pub fn answer(msg: &[u8], q: &Question, ip: Ipv4Addr) -> Vec<u8> {
    let with_record = q.qtype == TYPE_A;
    let mut out = Vec::with_capacity(q.end + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, opcode 0, AA=1, RD copied from the query, RA=1, RCODE 0.
    let rd = msg[2] & 0x01;
    out.extend_from_slice(&[0x84 | rd, 0x80]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(with_record).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.end]);
    if with_record {
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// A SERVFAIL answer to `q` (the upstream could not be asked).
pub fn servfail(msg: &[u8], q: &Question) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end);
    out.extend_from_slice(&q.id.to_be_bytes());
    let rd = msg[2] & 0x01;
    out.extend_from_slice(&[0x80 | rd, 0x82]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.end]);
    out
}

/// Serves DNS on `socket` until it fails: sandbox names from `lookup`
/// (with or without the `suffix` domain), everything else via `upstream`.
pub async fn serve(
    socket: Arc<UdpSocket>,
    lookup: NameLookup,
    suffix: String,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let msg = buf[..n].to_vec();
        let Some(q) = parse_query(&msg) else {
            tracing::debug!(%from, "dropping a malformed DNS query");
            continue;
        };
        let local = q
            .name
            .strip_suffix(&format!(".{suffix}"))
            .unwrap_or(&q.name)
            .to_string();
        let known = (q.qclass == CLASS_IN && matches!(q.qtype, TYPE_A | TYPE_AAAA))
            .then(|| lookup(&local, from.ip()))
            .flatten();
        match known {
            Some(ip) => {
                if let Err(e) = socket.send_to(&answer(&msg, &q, ip), from).await {
                    tracing::debug!(%from, error = %e, "cannot answer a DNS query");
                }
            }
            None => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    match forward(&msg, upstream).await {
                        Ok(reply) => {
                            if let Err(e) = socket.send_to(&reply, from).await {
                                tracing::debug!(%from, error = %e, "cannot relay a DNS answer");
                            }
                        }
                        Err(e) => {
                            // Fail fast rather than let the guest's resolver time out.
                            tracing::debug!(%upstream, error = %e, "DNS upstream failed");
                            let _ = socket.send_to(&servfail(&msg, &q), from).await;
                        }
                    }
                });
            }
        }
    }
}

/// Sends `msg` upstream from a fresh port and returns the reply with the same id.
async fn forward(msg: &[u8], upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).await?;
    // Connected, so an unreachable upstream is an error at once (ICMP)
    // rather than a timeout, and only the upstream's datagrams arrive.
    s.connect(upstream).await?;
    s.send(msg).await?;
    let mut buf = vec![0u8; 4096];
    let read = async {
        loop {
            let n = s.recv(&mut buf).await?;
            if n >= 2 && buf[..2] == msg[..2] {
                return Ok::<_, std::io::Error>(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS upstream timed out"))?
}

/// The first `nameserver` of a resolv.conf text, if any.
pub fn upstream_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` of type `qtype` with id `id`.
    pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    #[test]
    fn parses_queries_and_answers_a_records() {
        let q = query(0x1234, "Dev-1.Bhatti", TYPE_A);
        let parsed = parse_query(&q).unwrap();
        assert_eq!(
            (parsed.id, parsed.name.as_str(), parsed.qtype, parsed.end),
            (0x1234, "dev-1.bhatti", TYPE_A, q.len())
        );
        let a = answer(&q, &parsed, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[2] & 0x80, 0x80, "QR set");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[10, 0, 0, 7]);
        let aaaa = query(1, "dev", TYPE_AAAA);
        let p = parse_query(&aaaa).unwrap();
        let empty = answer(&aaaa, &p, Ipv4Addr::LOCALHOST);
        assert_eq!(u16::from_be_bytes([empty[6], empty[7]]), 0);
        assert_eq!(empty.len(), aaaa.len());
    }

    #[test]
    fn servfail_echoes_the_question_with_rcode_2() {
        let q = query(5, "example.org", TYPE_A);
        let p = parse_query(&q).unwrap();
        let f = servfail(&q, &p);
        assert_eq!(&f[..2], &[0, 5]);
        assert_eq!(f[3] & 0x0f, 2);
        assert_eq!(u16::from_be_bytes([f[6], f[7]]), 0);
        assert_eq!(&f[12..], &q[12..]);
    }

    #[test]
    fn rejects_malformed_messages() {
        assert!(parse_query(&[]).is_none());
        assert!(parse_query(&[0; 11]).is_none());
        let mut reply = query(1, "x", TYPE_A);
        reply[2] |= 0x80;
        assert!(parse_query(&reply).is_none(), "responses are not queries");
        let mut cut = query(1, "abc", TYPE_A);
        cut.truncate(15);
        assert!(parse_query(&cut).is_none());
        let mut pointer = query(1, "abc", TYPE_A);
        pointer[12] = 0xc0;
        assert!(parse_query(&pointer).is_none());
    }

    #[test]
    fn reads_the_upstream_from_resolv_conf() {
        let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(
            upstream_from_resolv_conf(text),
            Some("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(upstream_from_resolv_conf("search x\n"), None);
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic(msg in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some(q) = super::parse_query(&msg) {
                prop_assert!(q.end <= msg.len());
                let _ = super::answer(&msg, &q, std::net::Ipv4Addr::LOCALHOST);
            }
        }
    }
}
