use std::net::{Ipv4Addr, TcpListener};

use crate::Error;

/// `count` distinct free TCP ports on 127.0.0.1.
///
/// The ports are held until all are chosen, so they differ from each other; another process may still take one
/// before the component binds it, which then fails to start with "address already in use".
pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::io("choosing a free port on 127.0.0.1", e))?;
        *port = listener
            .local_addr()
            .map_err(|e| Error::io("reading the address of a free port", e))?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}
