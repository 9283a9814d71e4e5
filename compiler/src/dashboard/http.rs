//! The dashboard's web server: GET only, a thread per connection (at most
//! [`MAX_CONNECTIONS`]), the page and its script embedded, live updates as
//! server-sent events. No request byte is trusted: the request head is bounded, the
//! path is matched exactly, a device name is checked before it is looked up.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::names::{self, Kind};

use super::Shared;

/// Open connections at most (each live page holds one).
pub const MAX_CONNECTIONS: usize = 64;
/// Open connections from one address at most, so one client cannot hold them all.
pub const MAX_PER_SOURCE: usize = 16;
/// A client that does not take what is written for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head longer than this is refused.
const MAX_HEAD: u64 = 8 * 1024;
/// Updates queued for one page; a page that falls this far behind is disconnected
/// (its EventSource reconnects and starts from a fresh snapshot).
const QUEUE: usize = 64;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");

/// The pages listening for updates.
#[derive(Default)]
pub struct Hub {
    pages: Mutex<Vec<SyncSender<Arc<str>>>>,
}

impl Hub {
    /// Sends `event` with `data` (one line of JSON) to every page.
    pub fn broadcast(&self, event: &str, data: &str) {
        let message: Arc<str> = format!("event: {event}\ndata: {data}\n\n").into();
        lock(&self.pages).retain(|page| page.try_send(message.clone()).is_ok());
    }

    fn join(&self) -> Receiver<Arc<str>> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        lock(&self.pages).push(tx);
        rx
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `Host` (and `Origin`) values a request may carry: the address the dashboard
/// listens on, its loopback names, and the names the operator gave (`--host`).
#[derive(Debug, Clone)]
pub struct Hosts(Vec<String>);

impl Hosts {
    pub fn new(listen: SocketAddr, extra: &[String]) -> Self {
        let port = listen.port();
        let mut names = vec![listen.to_string()];
        if listen.ip().is_loopback() || listen.ip().is_unspecified() {
            names.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
        }
        for h in extra {
            names.push(h.to_ascii_lowercase());
            if !h.contains(':') || h.ends_with(']') {
                names.push(format!("{}:{port}", h.to_ascii_lowercase()));
            }
        }
        Self(names)
    }

    fn allows_host(&self, host: &str) -> bool {
        self.0.iter().any(|h| h.eq_ignore_ascii_case(host.trim()))
    }

    /// `Origin: http://HOST` for an allowed host (or no Origin: a same-origin GET).
    fn allows_origin(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(o) => o
                .trim()
                .strip_prefix("http://")
                .or_else(|| o.trim().strip_prefix("https://"))
                .is_some_and(|h| self.allows_host(h)),
        }
    }
}

/// Serves until the listener fails.
pub fn serve(listener: TcpListener, shared: Arc<Shared>, hosts: Hosts) {
    let open = Arc::new(AtomicUsize::new(0));
    let per_source: Arc<Mutex<BTreeMap<IpAddr, usize>>> = Arc::default();
    let hosts = Arc::new(hosts);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let from_peer = lock(&per_source).get(&peer.ip()).copied().unwrap_or(0);
        if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS || from_peer >= MAX_PER_SOURCE {
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let _ = respond(
                stream,
                "503 Service Unavailable",
                "text/plain",
                b"too many connections\n",
            );
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        *lock(&per_source).entry(peer.ip()).or_default() += 1;
        let (shared, open, per_source, hosts) = (
            shared.clone(),
            open.clone(),
            per_source.clone(),
            hosts.clone(),
        );
        std::thread::spawn(move || {
            let _ = handle(stream, &shared, &hosts);
            open.fetch_sub(1, Ordering::SeqCst);
            let mut counts = lock(&per_source);
            if let Some(n) = counts.get_mut(&peer.ip()) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&peer.ip());
                }
            }
        });
    }
}

fn handle(stream: TcpStream, shared: &Shared, hosts: &Hosts) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?.take(MAX_HEAD));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The rest of the head: only Host and Origin are looked at (no body is accepted).
    let (mut host, mut origin) = (None, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("host") {
                host = Some(value.trim().to_string());
            } else if name.eq_ignore_ascii_case("origin") {
                origin = Some(value.trim().to_string());
            }
        }
    }
    if !host.as_deref().is_some_and(|h| hosts.allows_host(h)) {
        return respond(
            stream,
            "421 Misdirected Request",
            "text/plain",
            b"this dashboard does not answer to that Host (kiln dashboard --host NAME adds one)\n",
        );
    }
    if !hosts.allows_origin(origin.as_deref()) {
        return respond(
            stream,
            "403 Forbidden",
            "text/plain",
            b"requests from another origin are refused\n",
        );
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            stream,
            "405 Method Not Allowed",
            "text/plain",
            b"the dashboard is read-only\n",
        );
    }
    match path {
        "/" => respond(
            stream,
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes(),
        ),
        "/app.js" => respond(
            stream,
            "200 OK",
            "text/javascript; charset=utf-8",
            SCRIPT.as_bytes(),
        ),
        "/events" => events(stream, shared),
        _ => match path.strip_prefix("/device/") {
            Some(name) if names::check(Kind::Device, name).is_ok() => match shared.detail(name) {
                Some(json) => respond(stream, "200 OK", "application/json", json.as_bytes()),
                None => respond(stream, "404 Not Found", "text/plain", b"no such device\n"),
            },
            _ => respond(stream, "404 Not Found", "text/plain", b"not found\n"),
        },
    }
}

fn respond(mut stream: TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        body.len(),
        SECURITY
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)
}

/// No inline script, nothing from elsewhere, no framing: what a device sends can
/// never run as code, even if a bug put it in the page as markup.
const SECURITY: &str = "Content-Security-Policy: default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n";

/// A live page: the snapshot, then every update, with a comment every 15 s so idle
/// proxies keep the stream open.
fn events(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let updates = shared.hub.join();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{SECURITY}Connection: keep-alive\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(format!("event: snapshot\ndata: {}\n\n", shared.snapshot()).as_bytes())?;
    loop {
        match updates.recv_timeout(Duration::from_secs(15)) {
            Ok(message) => stream.write_all(message.as_bytes())?,
            Err(RecvTimeoutError::Timeout) => stream.write_all(b": ping\n\n")?,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_dashboards_own_names_are_answered() {
        let hosts = Hosts::new("127.0.0.1:8080".parse().unwrap(), &["fleet.lan".into()]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
            "fleet.lan",
            "fleet.lan:8080",
        ] {
            assert!(hosts.allows_host(ok), "{ok}");
        }
        // DNS rebinding: evil.example resolved to 127.0.0.1 still says its own name.
        for bad in ["evil.example:8080", "127.0.0.1:9999", "localhost", ""] {
            assert!(!hosts.allows_host(bad), "{bad}");
        }
        assert!(hosts.allows_origin(None));
        assert!(hosts.allows_origin(Some("http://localhost:8080")));
        assert!(!hosts.allows_origin(Some("http://evil.example:8080")));
        assert!(!hosts.allows_origin(Some("null")));
    }
}
