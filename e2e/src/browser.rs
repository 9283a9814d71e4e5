//! Headless Chromium for page tests, driven over WebDriver (Debian's chromium and
//! chromium-driver, installed by scripts/setup.sh): load a page, run a script in it,
//! take a screenshot. Plain HTTP/1.1 to chromedriver on loopback; no client library.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Self {
        let port = crate::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed by scripts/setup.sh (chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,2000",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let answer = request(port, "POST", "/session", Some(&caps));
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_string();
        Browser {
            driver,
            port,
            session,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, what: &str, body: Option<&Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        let answer = request(self.port, method, &path, body);
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {what}: {answer}");
        }
        answer["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            "execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
    }

    /// Polls `script` until it returns something truthy (not null, false, 0 or "").
    #[track_caller]
    pub fn wait_for(&self, limit: Duration, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(script);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?}: {what} (last: {v})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the window.
    pub fn screenshot(&self, path: &Path) {
        let png = self.call("GET", "screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request_timeout(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
            Duration::from_secs(5),
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    request_timeout(port, method, path, body, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
}

fn request_timeout(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    limit: Duration,
) -> std::io::Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(limit))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver may keep the connection open: read the head, then the body by its
    // length (or its chunks), not to the end of the stream.
    let mut reader = std::io::BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let body = match length {
        Some(n) => {
            let mut body = vec![0; n];
            reader.read_exact(&mut body)?;
            String::from_utf8_lossy(&body).into_owned()
        }
        None if head.contains("transfer-encoding: chunked") => {
            let mut body = String::new();
            loop {
                let mut size = String::new();
                std::io::BufRead::read_line(&mut reader, &mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk)?;
                body.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
            body
        }
        None => {
            let mut body = String::new();
            reader.read_to_string(&mut body)?;
            body
        }
    };
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}
