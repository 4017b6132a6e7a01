//! Loopback ports for the test servers and sidecars, never handed out twice in one test process and never from the
//! kernel's ephemeral range.
//!
//! Asking the kernel for port 0 returns an ephemeral port, and once it is released the kernel may give it to the
//! next `bind(0)` or outgoing connection. A test whose upstream is down (its port free) while its sidecar retries
//! could then see another test's new upstream take that port and receive its events. Ports here come from below the
//! ephemeral range (Linux's default starts at 32768), from a counter starting at a per-process offset, so a port a
//! test released stays unused for the rest of the run.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 10_000;
const LAST: u32 = 32_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port of 127.0.0.1 that nothing listens on now and that this process has not handed out before.
pub fn unused_port() -> u16 {
    let span = LAST - FIRST;
    // Test binaries run one after another; a per-process start keeps them apart too.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start + n) % span;
        let port = u16::try_from(port).unwrap_or_else(|_| panic!("port {port} out of range"));
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {LAST}");
}

/// `N` ports of [`unused_port`], all different.
pub fn unused_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| unused_port())
}
