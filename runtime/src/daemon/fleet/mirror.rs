//! Fetching a transfer's chunk list and chunks from an HTTP(S) mirror (feature
//! `mirror`): a small HTTP/1.1 client on `std::net` and the rustls kilnd links for
//! `mqtts://`, and the thread that runs it for the driver. The agent decides what to
//! fetch and verifies every byte (the list against the signed hash, each chunk against
//! the list); this side only moves bytes, bounded before they are allocated: a head of
//! at most 8 KiB parsed by `kiln_protocol::mirror::parse_head`, a body of exactly the
//! `Content-Length` it allows, timeouts on every connect, read and write, no redirects.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::mirror::{parse_head, MirrorUrl, MAX_HEAD};

#[cfg(test)]
use super::agent::MirrorPart;
#[cfg(test)]
use super::store::DownloadKey;
use super::{AgentIn, MirrorJob as Job};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest CA bundle read (Debian's is about 220 KiB).
const MAX_CA: u64 = 4 * 1024 * 1024;

/// Where Debian (and most distributions) keep the system's CA bundle.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS settings for `https://` mirrors: the CA file(s) given, or the system's
/// bundle; `Err` says why there are none (an `https://` mirror then fails, and the
/// device uses the broker).
pub fn tls_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let path = ca.unwrap_or(Path::new(SYSTEM_CA));
    let bytes = kiln_protocol::files::read_bounded(path, MAX_CA)
        .map_err(|e| format!("cannot read the mirror CA `{}`: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "the mirror CA `{}` holds no certificate that parses",
            path.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Runs the jobs one at a time, each answered on `to_agent`: one chunk in flight per
/// device, so what waits for the agent is at most one chunk.
pub fn serve(
    jobs: Receiver<Job>,
    to_agent: SyncSender<AgentIn>,
    tls: Result<Arc<rustls::ClientConfig>, String>,
) {
    let mut client = Client::new(tls);
    for job in jobs {
        if to_agent.send(client.answer(job)).is_err() {
            return;
        }
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

struct Conn {
    origin: String,
    stream: Box<dyn Stream>,
}

pub struct Client {
    tls: Result<Arc<rustls::ClientConfig>, String>,
    /// Kept open between requests to the same origin (HTTP/1.1 keep-alive).
    conn: Option<Conn>,
}

/// Why a request failed, and whether it may be sent again on a new connection (a
/// kept-alive connection the server had closed meanwhile).
struct Failed {
    retry: bool,
    why: String,
}

fn failed(why: impl Into<String>) -> Failed {
    Failed {
        retry: false,
        why: why.into(),
    }
}

impl Client {
    pub fn new(tls: Result<Arc<rustls::ClientConfig>, String>) -> Self {
        Self { tls, conn: None }
    }

    /// The job done, as the agent takes its answer.
    pub fn answer(&mut self, job: Job) -> AgentIn {
        let result = self.get(&job);
        AgentIn::Mirror {
            key: job.key,
            part: job.part,
            result,
        }
    }

    /// The job's bytes from the first of its mirrors that gives them; the error names
    /// each URL tried and why it failed.
    pub fn get(&mut self, job: &Job) -> Result<Vec<u8>, String> {
        let mut errors = Vec::new();
        for text in &job.urls {
            let url = match MirrorUrl::parse(text) {
                Ok(url) => url,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            let path = match job.part {
                super::MirrorPart::List => url.list_path(&job.key.sha256),
                super::MirrorPart::Chunk(n) => url.chunk_path(&job.key.sha256, n),
            };
            match self.get_one(&url, &path, job.max, job.exact) {
                Ok(bytes) => return Ok(bytes),
                Err(why) => {
                    self.conn = None;
                    errors.push(format!("GET {}{path}: {why}", url.origin()));
                }
            }
        }
        Err(errors.join("; "))
    }

    fn get_one(
        &mut self,
        url: &MirrorUrl,
        path: &str,
        max: u64,
        exact: Option<u64>,
    ) -> Result<Vec<u8>, String> {
        let origin = url.origin();
        if self.conn.as_ref().is_some_and(|c| c.origin == origin) {
            match self.exchange(url, path, max, exact) {
                Ok(bytes) => return Ok(bytes),
                Err(f) if f.retry => self.conn = None,
                Err(f) => return Err(f.why),
            }
        }
        self.conn = Some(Conn {
            origin,
            stream: self.connect(url)?,
        });
        self.exchange(url, path, max, exact).map_err(|f| f.why)
    }

    fn connect(&self, url: &MirrorUrl) -> Result<Box<dyn Stream>, String> {
        let addrs = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", url.host))?;
        let mut last = format!("{} resolves to no address", url.host);
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("connect to {addr}: {e}"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let set = |r: std::io::Result<()>| r.map_err(|e| format!("socket: {e}"));
        set(tcp.set_read_timeout(Some(IO_TIMEOUT)))?;
        set(tcp.set_write_timeout(Some(IO_TIMEOUT)))?;
        set(tcp.set_nodelay(true))?;
        if !url.tls {
            return Ok(Box::new(tcp));
        }
        let config = self.tls.clone()?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("{} is not a TLS server name: {e}", url.host))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
        Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
    }

    /// One GET on the open connection: the head read to its blank line (at most
    /// [`MAX_HEAD`] bytes and one read more), then exactly the body it announces.
    fn exchange(
        &mut self,
        url: &MirrorUrl,
        path: &str,
        max: u64,
        exact: Option<u64>,
    ) -> Result<Vec<u8>, Failed> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(failed("no connection"));
        };
        let stream = &mut conn.stream;
        let sent = stream
            .write_all(&url.request(path))
            .and_then(|()| stream.flush());
        if let Err(e) = sent {
            return Err(Failed {
                retry: true,
                why: format!("send: {}", io_why(&e)),
            });
        }
        let mut buf = Vec::with_capacity(4096);
        let mut piece = [0u8; 4096];
        let head = loop {
            if let Some(head) = parse_head(&buf).map_err(|e| failed(e.to_string()))? {
                break head;
            }
            match stream.read(&mut piece) {
                Ok(0) => {
                    return Err(Failed {
                        retry: buf.is_empty(),
                        why: "the connection closed before the answer".into(),
                    })
                }
                Ok(n) => buf.extend_from_slice(&piece[..n]),
                Err(e) => {
                    return Err(Failed {
                        retry: buf.is_empty() && e.kind() != std::io::ErrorKind::WouldBlock,
                        why: format!("receive: {}", io_why(&e)),
                    })
                }
            }
            debug_assert!(buf.len() <= MAX_HEAD + piece.len());
        };
        let len = head
            .body_len(max, exact)
            .map_err(|e| failed(e.to_string()))?;
        let len = usize::try_from(len).map_err(|_| failed("a body too large"))?;
        let early = &buf[head.len..];
        if early.len() > len {
            return Err(failed("the server sent more than its Content-Length"));
        }
        let mut body = Vec::with_capacity(len);
        body.extend_from_slice(early);
        let mut rest = vec![0u8; len - early.len()];
        let mut got = 0;
        while got < rest.len() {
            match stream.read(&mut rest[got..]) {
                Ok(0) => {
                    return Err(failed(format!(
                        "the body ended after {} of {len} bytes",
                        early.len() + got
                    )))
                }
                Ok(n) => got += n,
                Err(e) => return Err(failed(format!("receive: {}", io_why(&e)))),
            }
        }
        body.extend_from_slice(&rest);
        if head.close {
            self.conn = None;
        }
        Ok(body)
    }
}

/// A timeout says so in words (the OS says "Resource temporarily unavailable").
fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("timed out after {} s", IO_TIMEOUT.as_secs())
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-connection server that answers each request with the next of `answers`.
    fn server(answers: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut requests = 0;
            for answer in answers {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return requests;
                    }
                    req.push(b[0]);
                }
                requests += 1;
                s.write_all(&answer).unwrap();
            }
            requests
        });
        (url, handle)
    }

    fn job(url: &str, part: MirrorPart, max: u64, exact: Option<u64>) -> Job {
        Job {
            key: DownloadKey {
                sha256: [0xab; 32],
                chunk_size: 4,
            },
            part,
            urls: vec![url.into()],
            max,
            exact,
        }
    }

    #[test]
    fn bodies_come_whole_over_one_kept_connection() {
        let (url, server) = server(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nef".to_vec(),
        ]);
        let mut client = Client::new(Err("no TLS here".into()));
        assert_eq!(
            client.get(&job(&url, MirrorPart::Chunk(0), 4, Some(4))),
            Ok(b"abcd".to_vec())
        );
        assert_eq!(
            client.get(&job(&url, MirrorPart::List, 100, None)),
            Ok(b"ef".to_vec())
        );
        assert_eq!(server.join().unwrap(), 2);
    }

    #[test]
    fn what_is_not_the_promised_body_fails_naming_the_url() {
        for (answer, why) in [
            (
                &b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"[..],
                "HTTP 404",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
                "the body ended after 3 of 9 bytes",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde",
                "Content-Length 5, the chunk list says 4",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabcd",
                "more than its Content-Length",
            ),
        ] {
            let (url, _server) = server(vec![answer.to_vec()]);
            let mut client = Client::new(Err("no TLS here".into()));
            let err = client
                .get(&job(
                    &url,
                    MirrorPart::Chunk(3),
                    9,
                    (why.contains("chunk list")).then_some(4),
                ))
                .unwrap_err();
            assert!(
                err.starts_with(&format!("GET {url}/artifacts/{}/3: ", "ab".repeat(32))),
                "{err}"
            );
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn a_dead_mirror_and_https_without_a_ca_fail_in_one_line() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut client = Client::new(Err("no CA".into()));
        let err = client
            .get(&job(
                &format!("http://127.0.0.1:{port}"),
                MirrorPart::List,
                9,
                None,
            ))
            .unwrap_err();
        assert!(err.contains("connect to 127.0.0.1"), "{err}");
        let (url, _server) = server(vec![]);
        let err = client
            .get(&job(
                &url.replace("http:", "https:"),
                MirrorPart::List,
                9,
                None,
            ))
            .unwrap_err();
        assert!(err.ends_with(": no CA"), "{err}");
        assert!(!err.contains('\n'));
    }
}
