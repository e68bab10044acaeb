//! Listening TCP ports, read from `/proc/net/tcp` and `/proc/net/tcp6`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proto::{ListeningPort, PortList};

/// The `st` column of a socket in the LISTEN state.
const TCP_LISTEN: &str = "0A";

/// The guest's listening TCP sockets, the agent's own (`0.0.0.0:`
/// `agent_port`) left out. A table that cannot be read (no IPv6 in the
/// kernel) contributes nothing.
pub fn listening(agent_port: u16) -> PortList {
    let v4 = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let mut found = parse(&v4, false);
    found.extend(parse(&v6, true));
    let agent = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), agent_port);
    found.retain(|s| *s != agent);
    found.sort_by_key(|&(addr, port)| (port, addr));
    found.dedup();
    PortList {
        ports: found
            .into_iter()
            .map(|(address, port)| ListeningPort {
                port,
                address: address.to_string(),
                protocol: "tcp".into(),
            })
            .collect(),
    }
}

/// The listening sockets (address, port) in one `/proc/net/tcp{,6}` table.
/// Lines that do not parse are skipped: the header, and anything a future
/// kernel might add.
pub fn parse(table: &str, v6: bool) -> Vec<(IpAddr, u16)> {
    table
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let _slot = cols.next()?;
            let local = cols.next()?;
            let _remote = cols.next()?;
            let state = cols.next()?;
            if !state.eq_ignore_ascii_case(TCP_LISTEN) {
                return None;
            }
            parse_endpoint(local, v6)
        })
        .collect()
}

/// `0100007F:0BB8` → 127.0.0.1:3000. The kernel prints each 32-bit word of
/// the address as a number in the machine's byte order, the port in hex.
fn parse_endpoint(s: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let addr = if v6 {
        if addr.len() != 32 || !addr.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(bytes);
        // Dual-stack sockets bound to an IPv4 address show up mapped.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        if addr.len() != 8 {
            return None;
        }
        let word = u32::from_str_radix(addr, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
    };
    Some((addr, port))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0400 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1002 1 0000000000000000 100 0 0 10 0
   2: 0F02000A:0400 0202000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1004 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2002 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1389 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2003 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn reads_listening_ipv4_sockets_only() {
        let got = parse(TCP, false);
        assert_eq!(
            got,
            vec![
                ("0.0.0.0".parse().unwrap(), 1024),
                ("127.0.0.1".parse().unwrap(), 3000),
                ("0.0.0.0".parse().unwrap(), 8080),
            ]
        );
    }

    #[test]
    fn reads_ipv6_and_mapped_sockets() {
        let got = parse(TCP6, true);
        assert_eq!(
            got,
            vec![
                ("::".parse().unwrap(), 8000),
                ("::1".parse().unwrap(), 80),
                ("127.0.0.1".parse().unwrap(), 5001),
            ]
        );
    }

    #[test]
    fn junk_lines_are_skipped() {
        let t = "garbage\n 0: zz:0400 0 0A\n 1: 00000000:04 0 0A\n 2: 00000000:0400\n\n 3: 0100007F:0050 00000000:0000 0a x\n";
        assert_eq!(parse(t, false), vec![("127.0.0.1".parse().unwrap(), 80)]);
        assert!(parse("0: 0000:0400 0 0A", true).is_empty());
        assert!(parse("0: é0000000000000000000000000000000:0400 0 0A", true).is_empty());
    }

    proptest! {
        #[test]
        fn never_panics_on_junk(table in ".{0,400}", v6 in any::<bool>()) {
            let _ = parse(&table, v6);
        }

        #[test]
        fn never_panics_on_near_miss_lines(
            addr in "[0-9A-Fa-fé]{0,40}",
            port in "[0-9A-Fa-f:]{0,6}",
            st in "[0-9A-Fa-f]{0,3}",
            v6 in any::<bool>(),
        ) {
            let line = format!("0: {addr}:{port} 00000000:0000 {st} rest\n");
            let _ = parse(&line, v6);
        }

        #[test]
        fn every_ipv4_listener_round_trips(a in any::<[u8; 4]>(), port in any::<u16>()) {
            let word = u32::from_ne_bytes(a);
            let line = format!("0: {word:08X}:{port:04X} 00000000:0000 0A 0 0 0\n");
            prop_assert_eq!(parse(&line, false), vec![(IpAddr::V4(Ipv4Addr::from(a)), port)]);
        }
    }
}
