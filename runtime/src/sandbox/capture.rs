//! A module's stdout or stderr as a stream of lines: each complete line goes to a
//! callback (the worker turns it into a log record). A line longer than
//! `abi::MAX_LOG` is cut to it, and ends with a marker that says how many bytes were
//! left out (` [cut: N bytes]`), newline or not; the bytes past the bound are counted,
//! never buffered, so a guest cannot make the host buffer more than one bounded line.

use std::sync::{Arc, Mutex};

use kiln_protocol::abi::MAX_LOG;

pub type LineFn = Arc<dyn Fn(String) + Send + Sync>;

#[derive(Clone)]
pub struct LineCapture {
    line: Arc<Mutex<Line>>,
    emit: LineFn,
}

/// The line being written: at most `MAX_LOG` bytes kept, the rest only counted.
#[derive(Debug, Default)]
struct Line {
    kept: Vec<u8>,
    cut: u64,
}

impl std::fmt::Debug for LineCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineCapture")
    }
}

// The lean kilnd (no WASI) has no stdout to capture, only whole lines to bound.
#[cfg_attr(not(feature = "wasi"), allow(dead_code))]
impl LineCapture {
    pub fn new(emit: LineFn) -> Self {
        Self {
            line: Arc::default(),
            emit,
        }
    }

    fn push(&self, mut buf: &[u8]) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        while !buf.is_empty() {
            let (part, ends) = match buf.iter().position(|b| *b == b'\n') {
                Some(end) => (&buf[..end], Some(end)),
                None => (buf, None),
            };
            let room = MAX_LOG - line.kept.len();
            let keep = part.len().min(room);
            line.kept.extend_from_slice(&part[..keep]);
            line.cut += (part.len() - keep) as u64;
            match ends {
                Some(end) => {
                    let done = std::mem::take(&mut *line);
                    (self.emit)(bounded(&done.kept, done.cut).0);
                    buf = &buf[end + 1..];
                }
                None => break,
            }
        }
    }

    /// Sends what is left without a newline (at exit).
    pub fn flush_partial(&self) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        if !line.kept.is_empty() || line.cut > 0 {
            let done = std::mem::take(&mut *line);
            (self.emit)(bounded(&done.kept, done.cut).0);
        }
    }
}

/// The text of a line of which `raw` was kept and `cut` more bytes were not, in at
/// most `MAX_LOG` bytes: invalid UTF-8 shows as U+FFFD, a trailing `\r` goes, and a
/// line that does not fit whole ends with ` [cut: N bytes]`. Also returns N.
fn bounded(raw: &[u8], cut: u64) -> (String, u64) {
    let raw = match raw.strip_suffix(b"\r") {
        Some(r) if cut == 0 => r,
        _ => raw,
    };
    if cut == 0 {
        let (text, used) = text_within(raw, MAX_LOG);
        if used == raw.len() {
            return (text, 0);
        }
    }
    // The marker's widest form, so the text and the real marker always fit.
    let widest = marker(cut + raw.len() as u64).len();
    let (mut text, used) = text_within(raw, MAX_LOG - widest);
    let n = cut + (raw.len() - used) as u64;
    text.push_str(&marker(n));
    (text, n)
}

/// A line that came whole (from `kiln.log`, or over a frame), bounded as captured
/// lines are: within `MAX_LOG` bytes, cut with a marker. Also returns the bytes cut.
pub fn bound_line(line: &str) -> (String, u64) {
    if line.len() <= MAX_LOG {
        return (line.to_string(), 0);
    }
    let kept = &line.as_bytes()[..MAX_LOG];
    bounded(kept, (line.len() - MAX_LOG) as u64)
}

fn marker(n: u64) -> String {
    format!(" [cut: {n} bytes]")
}

/// The longest prefix of `raw` whose text (invalid sequences as U+FFFD) takes at most
/// `room` bytes; returns the text and how many bytes of `raw` it shows.
fn text_within(raw: &[u8], room: usize) -> (String, usize) {
    let mut text = String::new();
    let mut used = 0;
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            if text.len() + c.len_utf8() > room {
                return (text, used);
            }
            text.push(c);
            used += c.len_utf8();
        }
        let invalid = chunk.invalid();
        if !invalid.is_empty() {
            if text.len() + char::REPLACEMENT_CHARACTER.len_utf8() > room {
                return (text, used);
            }
            text.push(char::REPLACEMENT_CHARACTER);
            used += invalid.len();
        }
    }
    (text, used)
}

/// Where a module's output goes, synchronously, in the thread that wrote it: whole
/// lines into log records ([`LineCapture`], workers) or straight to kilnd's own stdout
/// and stderr ([`PassThrough`], `kilnd run`).
pub trait Sink: Send + Sync + 'static {
    fn write_all(&self, buf: &[u8]) -> std::io::Result<()>;
}

impl Sink for LineCapture {
    fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        self.push(buf);
        Ok(())
    }
}

/// kilnd's own stdout or stderr, written with write(2) as the module writes: as a
/// native program's output, in order across the two.
#[derive(Debug, Clone, Copy)]
pub struct PassThrough(std::os::fd::RawFd);

impl PassThrough {
    pub const STDOUT: Self = Self(1);
    pub const STDERR: Self = Self(2);
}

impl Sink for PassThrough {
    fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        use std::io;
        while !buf.is_empty() {
            // SAFETY: write(2) from a live slice to a descriptor kilnd holds open for
            // its whole life.
            let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                buf = &buf[n as usize..];
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                // A non-blocking stdout (a shell's pty may be one): wait until the
                // reader drains it.
                io::ErrorKind::WouldBlock => {
                    crate::poll::ready(self.0, libc::POLLOUT, -1)?;
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn collect() -> (LineCapture, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let capture = LineCapture::new(Arc::new(move |l| sink.lock().unwrap().push(l)));
        (capture, lines)
    }

    #[test]
    fn writes_become_whole_lines_and_long_lines_are_cut_with_a_marker() {
        let (capture, lines) = collect();
        capture.push(b"hel");
        capture.push(b"lo\r\nwor");
        assert_eq!(*lines.lock().unwrap(), ["hello"]);
        capture.push(&vec![b'x'; MAX_LOG + 10]);
        capture.push(b"\nlast");
        capture.flush_partial();
        let got = lines.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert!(got[1].len() <= MAX_LOG && got[1].len() > MAX_LOG - 8);
        assert!(got[1].starts_with("worxx"));
        let (body, n) = got[1].rsplit_once(" [cut: ").unwrap();
        let n: usize = n.strip_suffix(" bytes]").unwrap().parse().unwrap();
        assert_eq!(body.len() + n, MAX_LOG + 13);
        assert_eq!(got[2], "last");
    }

    /// The finding of issue 12: a 3 MiB line that ends in a newline was one record.
    #[test]
    fn a_megabyte_line_with_a_newline_is_one_bounded_line() {
        let (capture, lines) = collect();
        let mut big = vec![b'y'; 3 << 20];
        big.push(b'\n');
        capture.push(&big);
        let got = lines.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert!(got[0].len() <= MAX_LOG);
        let n = (3 << 20) - (got[0].len() - marker(0).len() - 6);
        assert!(got[0].ends_with(&marker(n as u64)), "{}", &got[0][4000..]);
        assert!(capture.line.lock().unwrap().kept.is_empty());
    }

    #[test]
    fn invalid_utf8_never_takes_a_line_over_the_bound() {
        let (text, n) = bounded(&vec![0xff; MAX_LOG], 0);
        assert!(text.len() <= MAX_LOG);
        assert!(n > 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// For any sequence of writes: no line and no pending buffer over `MAX_LOG`, and
        /// every byte written is shown, counted as cut, or a newline (or a dropped `\r`).
        #[test]
        fn lines_stay_bounded_and_every_byte_is_accounted_for(
            writes in prop::collection::vec(
                prop::collection::vec(
                    prop_oneof![
                        8 => Just(b'a'),
                        2 => Just(b'\n'),
                        1 => Just(b'\r'),
                        1 => Just(0xffu8),
                        1 => Just(0xc3u8),
                        1 => Just(0xa9u8),
                    ],
                    0..3000,
                ),
                0..12,
            ),
            long in prop::collection::vec(0usize..3, 0..3),
        ) {
            let mut writes = writes;
            // Some writes far over the bound, with and without a newline.
            for (i, kind) in long.iter().enumerate() {
                let mut w = vec![b'z'; MAX_LOG * (2 + i)];
                if *kind == 1 {
                    w.push(b'\n');
                }
                writes.insert(i.min(writes.len()), w);
            }
            let accounted = Arc::new(Mutex::new(0u64));
            let lines = Arc::new(Mutex::new(0u64));
            let (a, l) = (accounted.clone(), lines.clone());
            let capture = LineCapture::new(Arc::new(move |_| *l.lock().unwrap() += 1));
            let written: u64 = writes.iter().map(|w| w.len() as u64).sum();
            let mut newlines = 0u64;
            // Account with the same arithmetic as `bounded`, line by line.
            let mut current: Vec<u8> = Vec::new();
            for w in &writes {
                capture.push(w);
                let pending = capture.line.lock().unwrap();
                prop_assert!(pending.kept.len() <= MAX_LOG);
                drop(pending);
                for b in w {
                    if *b == b'\n' {
                        newlines += 1;
                        *a.lock().unwrap() += account(&current);
                        current.clear();
                    } else {
                        current.push(*b);
                    }
                }
            }
            capture.flush_partial();
            *a.lock().unwrap() += account(&current);
            prop_assert_eq!(*accounted.lock().unwrap() + newlines, written);
            prop_assert!(*lines.lock().unwrap() >= newlines);
        }
    }

    /// Feeds one line through the capture alone and checks its emitted text: within
    /// the bound, and shown bytes plus the marker's count make up the whole line.
    fn account(line: &[u8]) -> u64 {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let capture = LineCapture::new(Arc::new(move |l| sink.lock().unwrap().push(l)));
        capture.push(line);
        capture.flush_partial();
        let got = got.lock().unwrap();
        if line.is_empty() {
            assert!(got.is_empty());
            return 0;
        }
        assert_eq!(got.len(), 1);
        assert!(got[0].len() <= MAX_LOG, "{} bytes", got[0].len());
        let kept = &line[..line.len().min(MAX_LOG)];
        let cut = (line.len() - kept.len()) as u64;
        let (text, n) = bounded(kept, cut);
        assert_eq!(text, got[0]);
        let stripped = usize::from(cut == 0 && kept.ends_with(b"\r"));
        let body = match n {
            0 => text.as_str(),
            n => text
                .strip_suffix(&marker(n))
                .expect("a cut line ends with its marker"),
        };
        // What is shown is exactly the line's first bytes; the marker counts the rest.
        let shown = line.len() - stripped - n as usize;
        assert_eq!(String::from_utf8_lossy(&line[..shown]), body);
        (shown + stripped) as u64 + n
    }
}
