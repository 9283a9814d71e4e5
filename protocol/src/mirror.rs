//! Artifact mirrors: a transfer's chunk list and chunks as static files on an HTTP(S)
//! server, an object store or a CDN, as another source of the same bytes the broker
//! holds. `kiln push --mirror-dir DIR` writes them in the layout of the topics:
//!
//! ```text
//! {base}/artifacts/{sha256}/list    the chunk-list message, as on the broker
//! {base}/artifacts/{sha256}/{n}     chunk n's bytes, raw (no envelope)
//! ```
//!
//! Nothing here is trusted: the chunk list is checked against the sha256 the signed
//! desired state names before it is decoded, and each chunk's bytes against the list's
//! hash before they are written, exactly as for the broker's. A chunk file is the raw
//! slice of the stream, so it verifies before anything of it is decoded.
//!
//! The device's HTTP/1.1 client is small and strict: this module builds its GET and
//! parses the head of the answer ([`parse_head`], a pure function over untrusted bytes,
//! fuzzed as `http_head`), bounded everywhere: [`MAX_HEAD`] bytes of status line and
//! headers, a `Content-Length` it requires (no chunked encoding), no redirects.

/// Most mirror URLs a desired state names.
pub const MAX_MIRRORS: usize = 4;

/// Longest mirror URL.
pub const MAX_URL: usize = 512;

/// Largest status line and headers a device reads before it gives up on an answer.
pub const MAX_HEAD: usize = 8 * 1024;

/// Most header lines in an answer.
pub const MAX_HEADERS: usize = 64;

/// Where a mirror is: `http://host[:port][/path]` or `https://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorUrl {
    pub tls: bool,
    /// The host as written (a name, an IPv4 address, or an IPv6 address without its
    /// brackets).
    pub host: String,
    pub port: u16,
    /// The base path: empty, or starting with `/` and not ending with one.
    pub path: String,
    /// The URL as given, for messages.
    pub text: String,
}

/// Why a mirror URL or an answer is refused; each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror `{0}` must look like http://host[:port][/path] or https://host[:port][/path]")]
    Url(String),
    #[error("{0}")]
    Answer(String),
}

impl From<MirrorError> for String {
    fn from(e: MirrorError) -> Self {
        e.to_string()
    }
}

impl MirrorUrl {
    pub fn parse(url: &str) -> Result<Self, MirrorError> {
        let bad = || MirrorError::Url(url.chars().take(MAX_URL).collect());
        if url.len() > MAX_URL || url.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(bad());
        }
        let (rest, tls) = if let Some(rest) = url.strip_prefix("https://") {
            (rest, true)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (rest, false)
        } else {
            return Err(bad());
        };
        if rest.contains(['?', '#', '@', '\\']) {
            return Err(bad());
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            if host.is_empty() || !host.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
                return Err(bad());
            }
            (host, after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let valid_host = |h: &str| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        };
        if !valid_host(host) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
            None if tls => 443,
            None => 80,
        };
        let path = path.trim_end_matches('/');
        if path.split('/').any(|s| s == ".." || s == ".") {
            return Err(bad());
        }
        Ok(Self {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
            text: url.to_string(),
        })
    }

    /// The path of a transfer's chunk list on the mirror.
    pub fn list_path(&self, sha256: &[u8; 32]) -> String {
        format!("{}/{}", self.path, layout(sha256, "list"))
    }

    /// The path of chunk `n` of a transfer.
    pub fn chunk_path(&self, sha256: &[u8; 32], n: u32) -> String {
        format!("{}/{}", self.path, layout(sha256, &n.to_string()))
    }

    /// `host[:port]` as the `Host` header says it (the port only when not the scheme's).
    pub fn authority(&self) -> String {
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }

    /// `scheme://authority`: a connection is reused only for the same origin.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }

    /// The GET request for `path` on this mirror.
    pub fn request(&self, path: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kilnd/{}\r\nAccept-Encoding: identity\r\nConnection: keep-alive\r\n\r\n",
            self.authority(),
            env!("CARGO_PKG_VERSION"),
        )
        .into_bytes()
    }
}

/// A file of a transfer under a mirror's base, as `kiln push --mirror-dir` writes it:
/// `artifacts/{sha256}/{part}` (`part` is `list` or a chunk's index).
pub fn layout(sha256: &[u8; 32], part: &str) -> String {
    format!("artifacts/{}/{part}", hex::encode(sha256))
}

/// The status line and headers of an answer, as far as a device cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, the blank line included: the body starts there.
    pub len: usize,
    /// The body's length; `None` when the answer does not say (refused for a 200).
    pub content_length: Option<u64>,
    /// The server closes the connection after this answer.
    pub close: bool,
    /// Where a redirect points (never followed; said in the error).
    pub location: Option<String>,
}

impl Head {
    /// The body's length if this is an answer a device takes: a 200, its length given
    /// and at most `max` (exactly `exact` when known), no transfer or content coding.
    pub fn body_len(&self, max: u64, exact: Option<u64>) -> Result<u64, MirrorError> {
        let answer = |s: String| Err(MirrorError::Answer(s));
        match self.status {
            200 => {}
            301 | 302 | 303 | 307 | 308 => {
                return answer(format!(
                    "HTTP {} to {} (redirects are not followed)",
                    self.status,
                    self.location.as_deref().unwrap_or("nowhere")
                ))
            }
            status => return answer(format!("HTTP {status}")),
        }
        let Some(len) = self.content_length else {
            return answer("the answer has no Content-Length".into());
        };
        if len > max {
            return answer(format!("Content-Length {len} is above the limit of {max}"));
        }
        if exact.is_some_and(|e| e != len) {
            return answer(format!(
                "Content-Length {len}, the chunk list says {}",
                exact.unwrap_or(0)
            ));
        }
        Ok(len)
    }
}

/// Parses the head of an HTTP/1.x answer from the bytes read so far: `Ok(None)` while
/// the blank line that ends it has not arrived (and there are fewer than [`MAX_HEAD`]
/// bytes), the head once it has. Refused: a head over [`MAX_HEAD`] bytes or
/// [`MAX_HEADERS`] lines, a status line that is not `HTTP/1.x NNN ...`, a header line
/// without a colon or with bytes that are not visible ASCII, a `Transfer-Encoding` or
/// a `Content-Encoding` other than identity, and `Content-Length`s that are not digits
/// or disagree.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, MirrorError> {
    let answer = |s: &str| Err(MirrorError::Answer(s.to_string()));
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() >= MAX_HEAD {
            return answer("the answer's head is longer than 8 KiB");
        }
        return Ok(None);
    };
    let text = &buf[..end];
    let mut lines = text.split(|b| *b == b'\n').map(|l| match l.last() {
        Some(b'\r') => &l[..l.len() - 1],
        _ => l,
    });
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status(status_line).ok_or_else(|| {
        MirrorError::Answer("the answer does not start with an HTTP/1.x status line".into())
    })?;
    let mut head = Head {
        status,
        len: end + 4,
        content_length: None,
        close: false,
        location: None,
    };
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return answer("the answer has more than 64 header lines");
        }
        if line
            .iter()
            .any(|b| !(b.is_ascii_graphic() || *b == b' ' || *b == b'\t'))
        {
            return answer("a header line holds bytes that are not visible ASCII");
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return answer("a header line has no colon");
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || name.iter().any(|b| !b.is_ascii_graphic()) {
            return answer("a header line has no name");
        }
        // Visible ASCII only, checked above.
        let value = std::str::from_utf8(value).unwrap_or_default();
        if name.eq_ignore_ascii_case(b"content-length") {
            if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return answer("the Content-Length is not a number");
            }
            let len: u64 = value.parse().unwrap_or(u64::MAX);
            if head.content_length.is_some_and(|l| l != len) {
                return answer("the answer has two different Content-Lengths");
            }
            head.content_length = Some(len);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return answer(
                "the answer has a Transfer-Encoding (a mirror must send a Content-Length)",
            );
        } else if name.eq_ignore_ascii_case(b"content-encoding") {
            if !value.eq_ignore_ascii_case("identity") {
                return answer("the answer has a Content-Encoding");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            head.close = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if name.eq_ignore_ascii_case(b"location") {
            head.location = Some(value.chars().take(256).collect());
        }
    }
    // An HTTP/1.0 server closes unless it says otherwise in ways not worth trusting.
    head.close |= status_line.starts_with(b"HTTP/1.0");
    Ok(Some(head))
}

/// `HTTP/1.0 200 OK` or `HTTP/1.1 404` -> the status.
fn parse_status(line: &[u8]) -> Option<u16> {
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))?;
    let (code, reason) = rest.split_at(rest.len().min(3));
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) || code[0] == b'0' {
        return None;
    }
    if !(reason.is_empty() || reason[0] == b' ') {
        return None;
    }
    if reason.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
