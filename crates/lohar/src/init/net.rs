//! Loopback and `eth0` from [`NetConfig`], with the classic socket ioctls
//! (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS`, `SIOCADDRT`): four
//! system calls, no netlink library in a static binary.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::cmdline::NetConfig;
use super::error::BootError;

/// The guest's one NIC.
pub const IFACE: &str = "eth0";

/// `struct rtentry` from `<net/route.h>` (the `libc` crate lacks it for glibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) on
    // Linux; the kernel reads an AF_INET address out of it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

struct Ctl {
    sock: OwnedFd,
}

impl Ctl {
    fn open() -> Result<Ctl, BootError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(BootError::Net {
                op: "open a control socket",
                iface: "-".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Ctl {
            sock: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ifreq(iface: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req
    }

    fn ioctl<T>(
        &self,
        op: &'static str,
        iface: &str,
        request: libc::c_ulong,
        arg: &mut T,
    ) -> Result<(), BootError> {
        // SAFETY: `arg` is the structure this request expects (ifreq or
        // rtentry), valid and exclusively borrowed for the call.
        let r = unsafe { libc::ioctl(self.sock.as_raw_fd(), request, arg as *mut T) };
        if r < 0 {
            return Err(BootError::Net {
                op,
                iface: iface.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn set_addr(
        &self,
        iface: &str,
        request: libc::c_ulong,
        op: &'static str,
        ip: Ipv4Addr,
    ) -> Result<(), BootError> {
        let mut req = Self::ifreq(iface);
        req.ifr_ifru.ifru_addr = sockaddr(ip);
        self.ioctl(op, iface, request, &mut req)
    }

    fn up(&self, iface: &str) -> Result<(), BootError> {
        self.set_up(iface, true)
    }

    fn set_up(&self, iface: &str, up: bool) -> Result<(), BootError> {
        let mut req = Self::ifreq(iface);
        self.ioctl("read the flags", iface, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = if up {
            flags | libc::IFF_UP as libc::c_short
        } else {
            flags & !(libc::IFF_UP as libc::c_short)
        };
        let op = if up {
            "bring the link up"
        } else {
            "bring the link down"
        };
        self.ioctl(op, iface, libc::SIOCSIFFLAGS, &mut req)
    }

    fn set_mac(&self, iface: &str, mac: [u8; 6]) -> Result<(), BootError> {
        let mut req = Self::ifreq(iface);
        req.ifr_ifru.ifru_hwaddr = hwaddr(mac);
        self.ioctl("set the MAC", iface, libc::SIOCSIFHWADDR, &mut req)
    }

    fn default_route(&self, iface: &str, gateway: Ipv4Addr) -> Result<(), BootError> {
        let dev = CString::new(iface).expect("interface names have no NUL");
        let mut rt = default_rtentry(&dev, gateway);
        self.ioctl("add the default route", iface, libc::SIOCADDRT, &mut rt)
    }
}

/// The `rtentry` of a default route through `gateway` on `dev` (which must
/// outlive the ioctl: the entry points at it).
fn default_rtentry(dev: &std::ffi::CStr, gateway: Ipv4Addr) -> RtEntry {
    RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_ptr().cast_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    }
}

/// An Ethernet hardware address as `SIOCSIFHWADDR` takes it.
fn hwaddr(mac: [u8; 6]) -> libc::sockaddr {
    // SAFETY: sockaddr is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in sa.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    sa
}

/// Where the kernel keeps IPv6 settings; absent when it has no IPv6.
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Turns IPv6 off on each of `ifaces` (`all`, `default` or a device) under
/// `conf` (normally [`IPV6_CONF`]), as the host does on bridges and TAPs:
/// set before an interface comes up, it never gets an IPv6 address, not
/// even a link-local one. A kernel without IPv6 (no `conf` directory) has
/// nothing to turn off; any other failure fails the boot rather than leave
/// IPv6 on.
fn disable_ipv6(conf: &Path, ifaces: &[&str]) -> Result<(), BootError> {
    if !conf.is_dir() {
        return Ok(());
    }
    for iface in ifaces {
        let path = conf.join(iface).join("disable_ipv6");
        std::fs::write(&path, "1").map_err(BootError::io("disable IPv6 in", &path))?;
    }
    Ok(())
}

/// Brings up `lo` (the kernel gives it 127.0.0.1/8) and `eth0` with the
/// static address, then the default route through the gateway, IPv6 off
/// on both before they come up. Waits (bounded) for `eth0` to exist:
/// virtio_net registers it at probe time.
pub fn configure(cfg: &NetConfig, timeout: Duration) -> Result<(), BootError> {
    // `all` covers the interfaces that exist (`lo`, and `eth0` if already
    // probed), `default` the ones that appear later.
    disable_ipv6(Path::new(IPV6_CONF), &["default", "all"])?;
    let ctl = Ctl::open()?;
    ctl.up("lo")?;
    let end = Instant::now() + timeout;
    let name = CString::new(IFACE).expect("static name");
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    while unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
        if Instant::now() >= end {
            return Err(BootError::Timeout {
                what: format!("network interface {IFACE}"),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    disable_ipv6(Path::new(IPV6_CONF), &[IFACE])?;
    ctl.set_addr(IFACE, libc::SIOCSIFADDR, "set the address", cfg.ip)?;
    ctl.set_addr(
        IFACE,
        libc::SIOCSIFNETMASK,
        "set the netmask",
        cfg.netmask(),
    )?;
    ctl.up(IFACE)?;
    ctl.default_route(IFACE, cfg.gateway)?;
    allow_unprivileged_ping();
    Ok(())
}

/// Gives a running `eth0` a new MAC, address and netmask (after a
/// restore, the copied guest still has its source's): down (which also
/// drops its routes and its neighbour entries), MAC, address, netmask, up,
/// default route through `gateway`. Sockets bound to `0.0.0.0` (the
/// agent's) accept on the new address at once.
pub fn readdress(
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(), BootError> {
    let ctl = Ctl::open()?;
    ctl.set_up(IFACE, false)?;
    // A failed MAC change still leaves the address worth setting.
    let mac_result = ctl.set_mac(IFACE, mac);
    ctl.set_addr(IFACE, libc::SIOCSIFADDR, "set the address", ip)?;
    ctl.set_addr(
        IFACE,
        libc::SIOCSIFNETMASK,
        "set the netmask",
        super::cmdline::mask(prefix),
    )?;
    ctl.up(IFACE)?;
    match ctl.default_route(IFACE, gateway) {
        // Still there (a kernel that kept it across the down): fine.
        Err(BootError::Net { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {}
        other => other?,
    }
    mac_result
}

/// Lets every user `ping` with ICMP datagram sockets, as Docker does for
/// containers: the sandbox user is not root, and ping is the first thing
/// anyone tries when a network looks wrong. Best effort.
fn allow_unprivileged_ping() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647") {
        eprintln!("lohar: cannot allow unprivileged ping: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_has_the_kernel_layout() {
        // x86_64 and aarch64: 8 + 3*16 + 2 + 2 + 4(pad) + 8 + 8 + 2 + 6(pad) + 8 + 8 + 8 + 2 + 6(pad)
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn ipv6_is_turned_off_per_interface_and_a_kernel_without_it_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        // No IPv6 in the kernel: nothing to do.
        disable_ipv6(&conf, &["all", "eth0"]).expect("no IPv6 is fine");
        for iface in ["all", "default", "eth0"] {
            std::fs::create_dir_all(conf.join(iface)).unwrap();
            std::fs::write(conf.join(iface).join("disable_ipv6"), "0").unwrap();
        }
        disable_ipv6(&conf, &["default", "all"]).unwrap();
        disable_ipv6(&conf, &["eth0"]).unwrap();
        for iface in ["all", "default", "eth0"] {
            let v = std::fs::read_to_string(conf.join(iface).join("disable_ipv6")).unwrap();
            assert_eq!(v, "1", "{iface}");
        }
        // With IPv6 present, a setting that cannot be written fails the boot.
        let err = disable_ipv6(&conf, &["nosuch"]).unwrap_err();
        assert!(err.chain().contains("disable IPv6 in"), "{}", err.chain());
    }

    #[test]
    fn the_default_route_and_the_mac_are_laid_out_for_the_kernel() {
        let dev = CString::new(IFACE).unwrap();
        let rt = default_rtentry(&dev, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(rt.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        assert_eq!(rt.rt_dev.cast_const(), dev.as_ptr());
        let gw: Vec<u8> = rt.rt_gateway.sa_data[2..6]
            .iter()
            .map(|&b| b as u8)
            .collect();
        assert_eq!(gw, [10, 0, 0, 1]);
        assert_eq!(rt.rt_dst.sa_data, sockaddr(Ipv4Addr::UNSPECIFIED).sa_data);
        let sa = hwaddr([2, 0xb4, 10, 0xc8, 0, 7]);
        assert_eq!(sa.sa_family, libc::ARPHRD_ETHER);
        let mac: Vec<u8> = sa.sa_data[..6].iter().map(|&b| b as u8).collect();
        assert_eq!(mac, [2, 0xb4, 10, 0xc8, 0, 7]);
        assert!(sa.sa_data[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn sockaddr_holds_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data[2..6].iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, [10, 77, 0, 2]);
    }
}
