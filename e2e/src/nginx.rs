//! Debian's nginx as an artifact mirror (issue 34): on a free loopback port with a
//! config and prefix of its own (no system config), serving a directory under `/fleet/`
//! over HTTP, or over TLS with a test PKI's server certificate. Its access log counts
//! the body bytes it sent.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::mosquitto::Pki;
use crate::path_str;

pub struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
    root: PathBuf,
    /// The server certificate and key, for TLS.
    tls: Option<[PathBuf; 2]>,
    child: Option<Child>,
}

impl Nginx {
    /// nginx serving `root` as `/fleet/`, over TLS with `pki`'s server certificate if
    /// one is given.
    pub fn start(pki: Option<&Pki>, root: &Path) -> Self {
        let mut nginx = Self {
            dir: tempfile::tempdir().unwrap(),
            port: crate::free_port(),
            root: root.to_path_buf(),
            tls: pki.map(|p| [p.server_cert.clone(), p.server_key.clone()]),
            child: None,
        };
        nginx.run(false);
        nginx
    }

    /// The mirror's URL, as `--mirror-url` takes it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/fleet", self.port)
    }

    /// (Re)starts it; `swapped`: a misconfigured mirror that serves chunk 1's file for
    /// every chunk 0 (the right length, the wrong bytes).
    pub fn run(&mut self, swapped: bool) {
        self.stop();
        let d = self.dir.path();
        let swap = match swapped {
            true => format!(
                "location ~ \"^/fleet/artifacts/([0-9a-f]{{64}})/0$\" {{ alias {}/artifacts/$1/1; }}",
                path_str(&self.root)
            ),
            false => String::new(),
        };
        let (listen, tls) = match &self.tls {
            Some([cert, key]) => (
                format!("listen 127.0.0.1:{} ssl;", self.port),
                format!(
                    "ssl_certificate {};\n        ssl_certificate_key {};",
                    path_str(cert),
                    path_str(key)
                ),
            ),
            None => (format!("listen 127.0.0.1:{};", self.port), String::new()),
        };
        let conf = format!(
            r#"user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 8192; }}
http {{
    log_format mirror '$request_uri $status $body_bytes_sent';
    access_log {d}/access.log mirror;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    server {{
        {listen}
        {tls}
        {swap}
        location /fleet/ {{ alias {root}/; }}
    }}
}}
"#,
            d = path_str(d),
            root = path_str(&self.root),
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .args([
                "-p",
                path_str(d),
                "-e",
                &format!("{}/error.log", path_str(d)),
            ])
            .args(["-c", &format!("{}/nginx.conf", path_str(d))])
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (scripts/setup.sh installs nginx-light)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen: {}",
                self.log("error.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: a graceful stop, the workers with it.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Body bytes nginx sent so far, as its access log says, and the lines.
    pub fn sent(&self) -> (u64, usize) {
        let log = self.log("access.log");
        let bytes = log
            .lines()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        (bytes, log.lines().count())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
