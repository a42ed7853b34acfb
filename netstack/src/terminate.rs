//! Host side: TLS termination for the guest's HTTPS (untrusted bytes in
//! both TLS sessions). The guest's session ends here, with a leaf of the
//! per-installation CA ([`crate::ca`]) for the name its SNI gave (already
//! checked against the name bound to the address and the policy); the
//! requests inside go through the same parser and policy as plain HTTP
//! ([`crate::conn`]). Each connection to the upstream is a new TLS session
//! from netstack, verified against the host's trust roots (plus any extra
//! root the sandbox was given, for local test servers) for the same name:
//! a certificate that does not verify fails the request with a 502 and an
//! audit line, never a fallback to anything unverified.
//!
//! Both ends speak HTTP/1.1 only (ALPN). rustls does the TLS; netstack
//! only moves bytes through it, without blocking the poll loop: the
//! guest's session runs on it, the upstream's handshake on the connection's
//! connect thread, the upstream's records on the poll loop. Buffers are
//! bounded like plain connections' ([`crate::conn::MAX_BUFFERED`]).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

use crate::ca::Authority;
use crate::conn::MAX_BUFFERED;
use crate::credential::Credentials;
use crate::host::HostName;

/// Where a Linux host keeps its trust roots, most common first
/// (`SSL_CERT_FILE` is read before these).
pub const HOST_ROOT_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// Largest root bundle read, in bytes.
pub const MAX_ROOT_FILE: u64 = 8 << 20;
/// How long the upstream's TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The ALPN protocols offered upstream.
pub const UPSTREAM_ALPN: &[&[u8]] = &[b"http/1.1"];

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot read trust roots from {0}: {1}")]
    Read(PathBuf, String),
    #[error("{0} holds no certificate")]
    NoRoots(PathBuf),
    #[error("No trust roots found on this host (looked at $SSL_CERT_FILE and {})", HOST_ROOT_FILES.join(", "))]
    NoHostRoots,
    #[error("Cannot set up upstream TLS: {0}")]
    Tls(String),
}

/// Adds every certificate of the PEM file at `path` to `roots`; returns
/// how many were taken (certificates rustls cannot use are skipped).
pub fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<usize, Error> {
    let read = |e: String| Error::Read(path.to_path_buf(), e);
    let file = std::fs::File::open(path).map_err(|e| read(e.to_string()))?;
    let mut text = Vec::new();
    file.take(MAX_ROOT_FILE + 1).read_to_end(&mut text).map_err(|e| read(e.to_string()))?;
    if text.len() as u64 > MAX_ROOT_FILE {
        return Err(read(format!("larger than {MAX_ROOT_FILE} bytes")));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(Error::NoRoots(path.to_path_buf()));
    }
    let (added, _) = roots.add_parsable_certificates(certs);
    Ok(added)
}

/// The host's trust roots: `$SSL_CERT_FILE`, else the first of
/// [`HOST_ROOT_FILES`] there is; and the file they came from.
pub fn host_roots() -> Result<(RootCertStore, PathBuf), Error> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from).into_iter().collect();
    candidates.extend(HOST_ROOT_FILES.iter().map(PathBuf::from));
    for path in candidates {
        if path.is_file() {
            let mut roots = RootCertStore::empty();
            add_pem_roots(&mut roots, &path)?;
            return Ok((roots, path));
        }
    }
    Err(Error::NoHostRoots)
}

/// What a stack needs to terminate TLS: the CA that mints the guest-facing
/// leaves, the upstream TLS configuration (trust roots), and the
/// credentials to inject.
pub struct Termination {
    pub authority: Arc<Authority>,
    upstream: Arc<ClientConfig>,
    pub credentials: Credentials,
}

impl std::fmt::Debug for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Termination").field("authority", &self.authority).finish_non_exhaustive()
    }
}

impl Termination {
    /// Upstream sessions are verified against `roots` (see [`host_roots`]).
    pub fn new(
        authority: Arc<Authority>,
        roots: RootCertStore,
        credentials: Credentials,
    ) -> Result<Termination, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = UPSTREAM_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Termination { authority, upstream: Arc::new(config), credentials })
    }

    /// The upstream TLS configuration.
    pub fn upstream_config(&self) -> &Arc<ClientConfig> {
        &self.upstream
    }
}

/// Writes what `conn` has queued to `out` until it would block.
fn flush<T, W: Write>(conn: &mut rustls::ConnectionCommon<T>, out: &mut W) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The guest's TLS session, as netstack serves it: ciphertext from the
/// guest in, plaintext out to the HTTP checks, and the reverse.
pub(crate) struct GuestTls {
    conn: ServerConnection,
    /// Ciphertext for the guest.
    wire: Vec<u8>,
    /// The guest sent close_notify: what follows is ignored.
    peer_closed: bool,
}

impl GuestTls {
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<GuestTls, rustls::Error> {
        Ok(GuestTls { conn: ServerConnection::new(config)?, wire: Vec::new(), peer_closed: false })
    }

    /// Takes ciphertext from the guest; the plaintext it holds is appended
    /// to `plain`. An error is the end of the session (its alert queued
    /// for the guest).
    pub(crate) fn receive(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> Result<(), rustls::Error> {
        let mut buf = [0u8; 16 * 1024];
        while !data.is_empty() && !self.peer_closed {
            let n = match self.conn.read_tls(&mut data) {
                Ok(n) => n,
                Err(e) => return Err(rustls::Error::General(e.to_string())),
            };
            let processed = self.conn.process_new_packets();
            self.seal_queued();
            processed?;
            loop {
                match self.conn.reader().read(&mut buf) {
                    Ok(0) => {
                        self.peer_closed = true;
                        break;
                    }
                    Ok(k) => plain.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.peer_closed = true;
                        break;
                    }
                }
            }
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Encrypts plaintext from the front of `plain` while the ciphertext
    /// waiting for the guest is under [`MAX_BUFFERED`].
    pub(crate) fn send(&mut self, plain: &mut Vec<u8>) {
        while !plain.is_empty() && self.wire.len() < MAX_BUFFERED && !self.conn.is_handshaking() {
            match self.conn.writer().write(plain) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    plain.drain(..n);
                }
            }
            self.seal_queued();
        }
        self.seal_queued();
    }

    /// Queues close_notify (once).
    pub(crate) fn close(&mut self) {
        self.conn.send_close_notify();
        self.seal_queued();
    }

    fn seal_queued(&mut self) {
        // Writing to a Vec cannot fail.
        let _ = flush(&mut *self.conn, &mut self.wire);
    }

    /// Ciphertext waiting for the guest.
    pub(crate) fn wire(&mut self) -> &mut Vec<u8> {
        &mut self.wire
    }

    /// Ciphertext bytes waiting for the guest.
    pub(crate) fn wire_len(&self) -> usize {
        self.wire.len()
    }

    pub(crate) fn wire_is_empty(&self) -> bool {
        self.wire.is_empty() && !self.conn.wants_write()
    }

    /// The protocol ALPN settled on, if any.
    pub(crate) fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }
}

/// The upstream end of a connection: plain TCP, or netstack's own TLS
/// session over it. Non-blocking once set up; the same calls either way.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(TcpStream, Box<ClientConnection>),
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Upstream::Plain(_) => "Upstream::Plain",
            Upstream::Tls(..) => "Upstream::Tls",
        })
    }
}

impl Upstream {
    /// Takes plaintext for the upstream; `Ok(0)` when nothing fits now.
    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Upstream::Plain(s) => s.write(buf),
            Upstream::Tls(s, c) => {
                flush(&mut ***c, s)?;
                if c.wants_write() {
                    return Ok(0);
                }
                let n = c.writer().write(buf)?;
                flush(&mut ***c, s)?;
                Ok(n)
            }
        }
    }

    /// The socket, for an event loop to wait on.
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Upstream::Plain(s) | Upstream::Tls(s, _) => s.as_raw_fd(),
        }
    }

    /// The TLS session has records queued for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        match self {
            Upstream::Plain(_) => false,
            Upstream::Tls(_, c) => c.wants_write(),
        }
    }

    /// Sends what the TLS session has queued (records, alerts, key
    /// updates) as far as the socket takes it.
    pub(crate) fn flush_queued(&mut self) -> io::Result<()> {
        match self {
            Upstream::Plain(_) => Ok(()),
            Upstream::Tls(s, c) => flush(&mut ***c, s),
        }
    }

    /// Reads plaintext from the upstream: `Ok(0)` at its end, `WouldBlock`
    /// when nothing is there yet. A TLS error (a bad record, a truncation
    /// attack) is an `InvalidData` error.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (s, c) = match self {
            Upstream::Plain(s) => return s.read(buf),
            Upstream::Tls(s, c) => (s, c),
        };
        loop {
            match c.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Closed without close_notify: the response tracker sees
                // whether a response was cut short.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let n = c.read_tls(s)?;
            c.process_new_packets().map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            if n == 0 {
                // End of stream: the reader now says how it ended.
                continue;
            }
        }
    }

    /// Half-closes towards the upstream (close_notify first, for TLS);
    /// true once done.
    pub(crate) fn shutdown_write(&mut self) -> bool {
        match self {
            Upstream::Plain(s) => {
                let _ = s.shutdown(Shutdown::Write);
                true
            }
            Upstream::Tls(s, c) => {
                c.send_close_notify();
                match flush(&mut ***c, s) {
                    Ok(()) if !c.wants_write() => {
                        let _ = s.shutdown(Shutdown::Write);
                        true
                    }
                    Ok(()) => false,
                    Err(_) => true,
                }
            }
        }
    }
}

/// Sets up netstack's TLS session to the upstream over `stream` (still
/// blocking; at most [`HANDSHAKE_TIMEOUT`] in all), verified for `name`.
pub(crate) fn handshake(
    mut stream: TcpStream,
    config: &Arc<ClientConfig>,
    name: &HostName,
) -> Result<Upstream, String> {
    let server = ServerName::try_from(name.as_str().to_string()).map_err(|e| e.to_string())?;
    let mut conn = ClientConnection::new(config.clone(), server).map_err(|e| e.to_string())?;
    // In all, not per read: an upstream that drips its handshake a byte
    // at a time holds the connect thread no longer.
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!("handshake not done within {}s", HANDSHAKE_TIMEOUT.as_secs()));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
        conn.complete_io(&mut stream).map_err(|e| {
            match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(tls) => tls.to_string(),
                None => e.to_string(),
            }
        })?;
    }
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    stream.set_write_timeout(None).map_err(|e| e.to_string())?;
    Ok(Upstream::Tls(stream, Box::new(conn)))
}

#[cfg(test)]
mod tests;
