//! Host side (test support, outside the sandbox): a recording HTTP
//! upstream on 127.0.0.1 for the e2e tests. It answers every request
//! `200` with the body `echo METHOD PATH` and `Connection: close`, and
//! records each request (method, path, when it arrived); it stops by
//! itself at its deadline. Bounded: one request head of at most
//! [`MAX_HEAD`] bytes per connection, [`MAX_LOGGED`] requests kept.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest request head read.
pub const MAX_HEAD: u64 = 64 * 1024;
/// Requests kept in the log.
pub const MAX_LOGGED: usize = 1024;

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// When its request line was read.
    pub at: Instant,
}

/// A running upstream.
pub struct Upstream {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// Starts one that serves until `for_how_long` has passed.
    pub fn start(for_how_long: Duration) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream on loopback");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let port = listener.local_addr().expect("its address").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + for_how_long;
            while Instant::now() < deadline {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let log = log.clone();
                std::thread::spawn(move || serve(conn, &log));
            }
        });
        Upstream { port, seen }
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// "METHOD PATH" of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.seen().iter().map(|s| format!("{} {}", s.method, s.path)).collect()
    }
}

fn serve(conn: std::net::TcpStream, log: &Mutex<Vec<Seen>>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(reader) = conn.try_clone() else { return };
    let mut reader = BufReader::new(reader.take(MAX_HEAD));
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    let at = Instant::now();
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        line.clear();
    }
    let mut parts = first.split(' ');
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let body = format!("echo {method} {path}");
    {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() < MAX_LOGGED {
            log.push(Seen { method, path, at });
        }
    }
    let mut conn = conn;
    let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    // Our side is done (the client may read to the end); then whatever
    // the client still sends is taken until it closes.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn answers_and_records_each_request() {
        let up = Upstream::start(Duration::from_secs(30));
        for path in ["/a", "/b?x=1"] {
            let mut s = TcpStream::connect(("127.0.0.1", up.port)).unwrap();
            write!(s, "DELETE {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert!(out.starts_with("HTTP/1.1 200 OK") && out.ends_with(&format!("echo DELETE {path}")), "{out}");
        }
        assert_eq!(up.requests(), ["DELETE /a", "DELETE /b?x=1"]);
        let seen = up.seen();
        assert!(seen[0].at <= seen[1].at);
    }
}
