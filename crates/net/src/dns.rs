//! A small DNS responder for a sandbox network's gateway: it answers the
//! names of that network's sandboxes (A records) and forwards every other
//! query to an upstream resolver through the daemon's one [`Relay`],
//! relaying its answer unchanged but for the id.
//!
//! Only what guests need: one question per query, class IN; A answered from
//! the table; AAAA for a known name answered empty (no IPv6 in guests);
//! anything malformed is dropped (a resolver retries or gives up).
//!
//! A guest is hostile until shown otherwise, so the responder is bounded:
//! it answers only addresses of its own network (its sandboxes; the TAP
//! guard makes a source address trustworthy), each of them at most
//! [`RelayLimits::per_client_rate`] queries a second (a token bucket;
//! beyond it queries are dropped, as DNS rate limiting does, so a flood is
//! not turned into replies); and relaying uses one upstream socket for the
//! whole daemon with at most [`RelayLimits::max_in_flight`] queries
//! waiting ([`RelayLimits::max_in_flight_per_client`] per sandbox) —
//! beyond that a SERVFAIL at once. A flood costs a bounded amount of memory
//! and no file descriptors.
//!
//! For a sandbox whose egress allow-list holds names ([`crate::egress`]),
//! the answer to its A query for a listed name has its addresses added to
//! the sandbox's guard (for the records' TTL, clamped) before the guest
//! gets it; that query keeps its in-flight slot until then. A sandbox
//! whose egress is not `public` gets REFUSED for every other name (under
//! `none`, for every name but its network's sandboxes): the relay is no
//! channel out of it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::cidr::Cidr;
use crate::egress::NameSets;

/// Looks a (lower-case) sandbox name up for the guest asking (by its
/// address), so each user's sandboxes see only their own names.
pub type NameLookup = Arc<dyn Fn(&str, std::net::IpAddr) -> Option<Ipv4Addr> + Send + Sync>;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Answers for sandbox names are short-lived: a name may move on recreate.
const TTL_SECS: u32 = 5;

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

/// Skips a (possibly compressed) name starting at `pos`; the offset past it.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *msg.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            // A pointer ends the name.
            l if l & 0xc0 == 0xc0 => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            l if l > 63 => return None,
            l => pos += 1 + usize::from(l),
        }
    }
    None
}

/// The A records (address, TTL in seconds) in the answer section of a
/// response; nothing for anything malformed or not a NOERROR response.
pub fn answer_addresses(msg: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut out = Vec::new();
    if msg.len() < 12 || msg[2] & 0x80 == 0 || msg[3] & 0x0f != 0 {
        return out;
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = 12;
    for _ in 0..qd {
        match skip_name(msg, pos) {
            Some(p) if p + 4 <= msg.len() => pos = p + 4,
            _ => return Vec::new(),
        }
    }
    for _ in 0..an {
        let Some(p) = skip_name(msg, pos) else {
            return out;
        };
        let Some(fixed) = msg.get(p..p + 10) else {
            return out;
        };
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let Some(rdata) = msg.get(p + 10..p + 10 + rdlen) else {
            return out;
        };
        if rtype == TYPE_A && class == CLASS_IN && rdlen == 4 {
            out.push((Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]), ttl));
        }
        pos = p + 10 + rdlen;
    }
    out
}

/// A SERVFAIL answer to `q` (the upstream could not be asked).
pub fn servfail(msg: &[u8], q: &Question) -> Vec<u8> {
    error_answer(msg, q, 2)
}

/// A REFUSED answer to `q` (the sandbox's egress policy does not let it
/// resolve that name).
pub fn refused(msg: &[u8], q: &Question) -> Vec<u8> {
    error_answer(msg, q, 5)
}

/// An answer to `q` with no records and response code `rcode`.
fn error_answer(msg: &[u8], q: &Question, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end);
    out.extend_from_slice(&q.id.to_be_bytes());
    let rd = msg[2] & 0x01;
    out.extend_from_slice(&[0x80 | rd, 0x80 | rcode]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.end]);
    out
}

/// How much a [`Relay`] and the responders using it take on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Queries waiting for the upstream at once, all sandboxes together.
    pub max_in_flight: usize,
    /// Of those, at most this many from one sandbox.
    pub max_in_flight_per_client: usize,
    /// Queries a second one sandbox may ask, sustained (every query
    /// counts, sandbox names included).
    pub per_client_rate: u32,
    /// …and in a burst.
    pub per_client_burst: u32,
    /// How long the upstream has to answer before the guest gets SERVFAIL.
    pub timeout: Duration,
}

impl Default for RelayLimits {
    /// Generous for a build resolving hundreds of hosts (guests have no
    /// resolver cache), small enough that a flood is a rounding error.
    fn default() -> Self {
        RelayLimits {
            max_in_flight: 1024,
            max_in_flight_per_client: 64,
            per_client_rate: 100,
            per_client_burst: 200,
            timeout: Duration::from_secs(3),
        }
    }
}

/// A query waiting for the upstream, under the relay's own id.
#[derive(Debug)]
struct Pending {
    /// The guest's id, restored in the answer.
    id: u16,
    /// The question section, to check the answer is for this query.
    question: Vec<u8>,
    /// The query as the guest sent it (for a SERVFAIL).
    query: Vec<u8>,
    client: SocketAddr,
    /// The responder socket the guest asked (answers come from it).
    via: Arc<UdpSocket>,
    sent: Instant,
    /// The name asked, when the answer's addresses are to be allowed for
    /// the client ([`NameSets`]) before it gets the answer.
    learn: Option<String>,
    /// The answer arrived and is being learned: later copies are ignored.
    answered: bool,
}

/// A client's token bucket and its queries in flight.
#[derive(Debug)]
struct Client {
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
}

#[derive(Debug)]
struct State {
    pending: HashMap<u16, Pending>,
    clients: HashMap<IpAddr, Client>,
    /// xorshift64 state for the relay's query ids.
    rng: u64,
}

/// What happened to a query offered to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// Sent upstream; the answer will follow.
    Sent,
    /// Too many queries waiting (for everyone, or for this client):
    /// answered SERVFAIL.
    Busy,
    /// The upstream could not be sent to: answered SERVFAIL.
    Failed,
    /// The client's egress policy does not let it resolve the name:
    /// answered REFUSED, nothing sent.
    Refused,
}

/// The daemon's relay to the upstream resolver: one socket, a table of
/// queries in flight, and each client's rate. Shared by every gateway's
/// responder; [`Relay::run`] reads answers and expires queries.
#[derive(Debug)]
pub struct Relay {
    upstream: SocketAddr,
    socket: UdpSocket,
    limits: RelayLimits,
    state: Mutex<State>,
    /// Sandboxes' allow-listed names, learned from answers.
    names: OnceLock<Arc<NameSets>>,
}

impl Relay {
    /// Binds the relay's one socket. It is not connected: an upstream the
    /// host cannot reach yet (no route at start) must not stop the daemon;
    /// queries then get SERVFAIL until it can. Datagrams from anyone but
    /// the upstream are dropped.
    pub async fn bind(upstream: SocketAddr, limits: RelayLimits) -> std::io::Result<Arc<Relay>> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        };
        let socket = UdpSocket::bind(bind).await?;
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.finish() | 1
        };
        Ok(Arc::new(Relay {
            upstream,
            socket,
            limits,
            state: Mutex::new(State {
                pending: HashMap::new(),
                clients: HashMap::new(),
                rng: seed,
            }),
            names: OnceLock::new(),
        }))
    }

    /// From now on, answers to a sandbox's A queries for names its egress
    /// allow-list holds open the answers' addresses for it in `names`
    /// before the guest gets them. Set once; later calls are ignored.
    pub fn learn_into(&self, names: Arc<NameSets>) {
        let _ = self.names.set(names);
    }

    /// The limits.
    pub fn limits(&self) -> &RelayLimits {
        &self.limits
    }

    /// Queries waiting for the upstream now.
    pub fn in_flight(&self) -> usize {
        self.state().pending.len()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one token from `client`'s bucket; `false` when it is empty
    /// (the query is to be dropped).
    pub fn admit(&self, client: IpAddr) -> bool {
        let now = Instant::now();
        let (rate, burst) = (
            f64::from(self.limits.per_client_rate),
            f64::from(self.limits.per_client_burst.max(1)),
        );
        let mut st = self.state();
        let c = st.clients.entry(client).or_insert(Client {
            tokens: burst,
            refilled: now,
            in_flight: 0,
        });
        let elapsed = now.duration_since(c.refilled).as_secs_f64();
        c.tokens = (c.tokens + elapsed * rate).min(burst);
        c.refilled = now;
        if c.tokens >= 1.0 {
            c.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sends the query `msg` (question `q`) from `client` upstream under a
    /// fresh id; its answer goes back through `via`. When the relay is
    /// full or the send fails, the client gets SERVFAIL at once.
    pub async fn forward(
        &self,
        msg: &[u8],
        q: &Question,
        client: SocketAddr,
        via: &Arc<UdpSocket>,
    ) -> Relayed {
        if let (Some(names), IpAddr::V4(ip)) = (self.names.get(), client.ip()) {
            if !names.may_resolve(ip, &q.name) {
                tracing::debug!(%client, name = %q.name, "refusing a name the sandbox's egress does not list");
                reply(via, &refused(msg, q), client).await;
                return Relayed::Refused;
            }
        }
        let learn = match (self.names.get(), client.ip()) {
            (Some(names), IpAddr::V4(ip))
                if q.qtype == TYPE_A && q.qclass == CLASS_IN && names.wants(ip, &q.name) =>
            {
                Some(q.name.clone())
            }
            _ => None,
        };
        let id = {
            let mut st = self.state();
            let busy = st.pending.len() >= self.limits.max_in_flight
                || st
                    .clients
                    .get(&client.ip())
                    .is_some_and(|c| c.in_flight >= self.limits.max_in_flight_per_client);
            if busy {
                None
            } else {
                let id = loop {
                    st.rng ^= st.rng << 13;
                    st.rng ^= st.rng >> 7;
                    st.rng ^= st.rng << 17;
                    let id = (st.rng >> 24) as u16;
                    if !st.pending.contains_key(&id) {
                        break id;
                    }
                };
                st.pending.insert(
                    id,
                    Pending {
                        id: q.id,
                        question: msg[12..q.end].to_vec(),
                        query: msg.to_vec(),
                        client,
                        via: via.clone(),
                        sent: Instant::now(),
                        learn,
                        answered: false,
                    },
                );
                if let Some(c) = st.clients.get_mut(&client.ip()) {
                    c.in_flight += 1;
                }
                Some(id)
            }
        };
        let Some(id) = id else {
            reply(via, &servfail(msg, q), client).await;
            return Relayed::Busy;
        };
        let mut out = msg.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        match self.socket.send_to(&out, self.upstream).await {
            Ok(_) => Relayed::Sent,
            Err(e) => {
                tracing::debug!(upstream = %self.upstream, error = %e, "DNS upstream failed");
                if self.take(id).is_some() {
                    reply(via, &servfail(msg, q), client).await;
                }
                Relayed::Failed
            }
        }
    }

    /// Removes a pending query, giving its client's slot back.
    fn take(&self, id: u16) -> Option<Pending> {
        let mut st = self.state();
        let p = st.pending.remove(&id)?;
        if let Some(c) = st.clients.get_mut(&p.client.ip()) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        Some(p)
    }

    /// Removes every pending query `expired` says is done.
    fn take_all(&self, expired: impl Fn(&Pending) -> bool) -> Vec<Pending> {
        let ids: Vec<u16> = self
            .state()
            .pending
            .iter()
            .filter(|(_, p)| expired(p))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| self.take(id)).collect()
    }

    /// Relays answers to the clients that asked and answers SERVFAIL for
    /// queries the upstream did not answer in time (or at all: an ICMP
    /// error on the socket fails everything waiting). Runs until its task
    /// is dropped; never fails.
    pub async fn run(self: Arc<Self>) {
        let mut buf = vec![0u8; 4096];
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                got = self.socket.recv_from(&mut buf) => match got {
                    Ok((n, from)) if from == self.upstream => self.clone().answer(&buf[..n]).await,
                    Ok((_, from)) => {
                        tracing::debug!(%from, "DNS datagram not from the upstream; dropped");
                    }
                    Err(e) => {
                        // A connected UDP socket reports the upstream's ICMP
                        // errors here; everything waiting went to it.
                        tracing::debug!(upstream = %self.upstream, error = %e, "DNS upstream failed");
                        self.fail(self.take_all(|_| true)).await;
                    }
                },
                _ = tick.tick() => {
                    let timeout = self.limits.timeout;
                    let late = self.take_all(|p| p.sent.elapsed() >= timeout);
                    self.fail(late).await;
                    // Forget clients idle long enough to have a full bucket.
                    let idle = Duration::from_secs(60);
                    self.state()
                        .clients
                        .retain(|_, c| c.in_flight > 0 || c.refilled.elapsed() < idle);
                }
            }
        }
    }

    async fn answer(self: Arc<Self>, reply_msg: &[u8]) {
        if reply_msg.len() < 12 {
            return;
        }
        let id = u16::from_be_bytes([reply_msg[0], reply_msg[1]]);
        // The name to learn, when the answer's addresses are to be allowed
        // first; the query stays pending (and counted) until they are.
        let learn = {
            let mut st = self.state();
            let Some(p) = st.pending.get_mut(&id) else {
                return;
            };
            let ours = !p.answered
                && reply_msg
                    .get(12..12 + p.question.len())
                    .is_some_and(|q| q.eq_ignore_ascii_case(&p.question));
            if !ours {
                return;
            }
            p.answered = true;
            match (&p.learn, p.client.ip()) {
                (Some(name), IpAddr::V4(ip)) => Some((name.clone(), ip)),
                _ => None,
            }
        };
        let mut out = reply_msg.to_vec();
        let (Some((name, client)), Some(names)) = (learn, self.names.get().cloned()) else {
            if let Some(p) = self.take(id) {
                out[..2].copy_from_slice(&p.id.to_be_bytes());
                reply(&p.via, &out, p.client).await;
            }
            return;
        };
        // Learning runs `nft`: off the relay's loop, which goes on reading
        // answers meanwhile. At most `max_in_flight` of these at once:
        // each holds its query's slot.
        tokio::spawn(async move {
            let addrs = answer_addresses(&out);
            let learned = if addrs.is_empty() {
                Ok(0)
            } else {
                tokio::task::spawn_blocking(move || names.learn(client, &name, &addrs))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            };
            // Timed out meanwhile: the client had its SERVFAIL.
            let Some(p) = self.take(id) else { return };
            match learned {
                Ok(_) => {
                    out[..2].copy_from_slice(&p.id.to_be_bytes());
                    reply(&p.via, &out, p.client).await;
                }
                Err(e) => {
                    tracing::warn!(%client, error = %e, "cannot allow the addresses of an allow-listed name");
                    if let Some(q) = parse_query(&p.query) {
                        reply(&p.via, &servfail(&p.query, &q), p.client).await;
                    }
                }
            }
        });
    }

    async fn fail(&self, done: Vec<Pending>) {
        for p in done {
            if let Some(q) = parse_query(&p.query) {
                reply(&p.via, &servfail(&p.query, &q), p.client).await;
            }
        }
    }
}

async fn reply(via: &UdpSocket, msg: &[u8], to: SocketAddr) {
    if let Err(e) = via.send_to(msg, to).await {
        tracing::debug!(%to, error = %e, "cannot answer a DNS query");
    }
}

/// Serves DNS on `socket` until it fails: sandbox names from `lookup`
/// (with or without the `suffix` domain), everything else through
/// `relay`. Only addresses in `clients` (the network's subnet) get an
/// answer, and only as often as the relay's rate allows.
pub async fn serve(
    socket: Arc<UdpSocket>,
    lookup: NameLookup,
    suffix: String,
    relay: Arc<Relay>,
    clients: Cidr,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1500];
    let suffix = format!(".{suffix}");
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let ours = match from.ip() {
            IpAddr::V4(ip) => clients.contains(ip),
            IpAddr::V6(_) => false,
        };
        if !ours {
            tracing::debug!(%from, "dropping a DNS query from outside the network");
            continue;
        }
        if !relay.admit(from.ip()) {
            continue;
        }
        let msg = &buf[..n];
        let Some(q) = parse_query(msg) else {
            tracing::debug!(%from, "dropping a malformed DNS query");
            continue;
        };
        let local = q.name.strip_suffix(&suffix).unwrap_or(&q.name);
        let known = (q.qclass == CLASS_IN && matches!(q.qtype, TYPE_A | TYPE_AAAA))
            .then(|| lookup(local, from.ip()))
            .flatten();
        match known {
            Some(ip) => reply(&socket, &answer(msg, &q, ip), from).await,
            None => {
                relay.forward(msg, &q, from, &socket).await;
            }
        }
    }
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
    fn reads_a_records_from_answers_with_compressed_names_and_cnames() {
        let q = query(7, "api.example.com", TYPE_A);
        let mut r = q.clone();
        r[2] |= 0x80;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&3u16.to_be_bytes());
        // CNAME api.example.com -> x.cdn.net (compressed owner), then two A
        // records owned by a pointer into the CNAME's data.
        let cname_at = r.len() + 12;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 30, 0, 11]);
        r.extend_from_slice(&[1, b'x', 3, b'c', b'd', b'n', 3, b'n', b'e', b't', 0]);
        for (ip, ttl) in [([203, 0, 113, 10], 300u32), ([203, 0, 113, 11], 5)] {
            r.extend_from_slice(&[0xc0, cname_at as u8, 0, 1, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&[0, 4]);
            r.extend_from_slice(&ip);
        }
        assert_eq!(
            answer_addresses(&r),
            vec![
                (Ipv4Addr::new(203, 0, 113, 10), 300),
                (Ipv4Addr::new(203, 0, 113, 11), 5)
            ]
        );
        // Not a response, an error response, a cut one: nothing (or what
        // was whole).
        assert!(answer_addresses(&q).is_empty());
        let mut nx = r.clone();
        nx[3] = 0x83;
        assert!(answer_addresses(&nx).is_empty());
        assert_eq!(answer_addresses(&r[..r.len() - 2]).len(), 1);
        // The answer to a sandbox name is read back too.
        let p = parse_query(&q).unwrap();
        assert_eq!(
            answer_addresses(&answer(&q, &p, Ipv4Addr::new(10, 0, 0, 7))),
            vec![(Ipv4Addr::new(10, 0, 0, 7), TTL_SECS)]
        );
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
        let r = refused(&q, &p);
        assert_eq!(r[3] & 0x0f, 5);
        assert_eq!(&r[12..], &q[12..]);
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

    #[tokio::test]
    async fn each_client_gets_its_burst_then_its_rate() {
        let limits = RelayLimits {
            per_client_rate: 1,
            per_client_burst: 5,
            ..RelayLimits::default()
        };
        let relay = Relay::bind("127.0.0.1:9".parse().unwrap(), limits)
            .await
            .unwrap();
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.3".parse().unwrap();
        let admitted = (0..20).filter(|_| relay.admit(a)).count();
        assert!((5..=6).contains(&admitted), "{admitted} of a burst of 20");
        assert!(relay.admit(b), "another client has its own bucket");
        // At least one more second: at least one more token, never more
        // than the burst.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let later = (0..20).filter(|_| relay.admit(a)).count();
        assert!((1..=5).contains(&later), "{later} after a second at 1/s");
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
            prop_assert!(super::answer_addresses(&msg).len() <= msg.len() / 14);
        }
    }
}
