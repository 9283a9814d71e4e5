//! A module's stdout or stderr as a stream of lines: each complete line goes to a
//! callback (the worker turns it into a log record). Long lines are cut at
//! `abi::MAX_LOG` bytes so a guest cannot make the host buffer without bound.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use kiln_protocol::abi::MAX_LOG;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use wasmer_wasix::virtual_fs::{self, VirtualFile};

pub type LineFn = Arc<dyn Fn(String) + Send + Sync>;

#[derive(Clone)]
pub struct LineCapture {
    pending: Arc<Mutex<Vec<u8>>>,
    emit: LineFn,
}

impl std::fmt::Debug for LineCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineCapture")
    }
}

impl LineCapture {
    pub fn new(emit: LineFn) -> Self {
        Self {
            pending: Arc::default(),
            emit,
        }
    }

    fn push(&self, buf: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.extend_from_slice(buf);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            self.send(&line[..end]);
        }
        if pending.len() >= MAX_LOG {
            let line: Vec<u8> = pending.drain(..MAX_LOG).collect();
            self.send(&line);
        }
    }

    /// Sends what is left without a newline (at exit).
    pub fn flush_partial(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() {
            let line = std::mem::take(&mut *pending);
            self.send(&line);
        }
    }

    fn send(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        (self.emit)(line.trim_end_matches('\r').to_string());
    }
}

impl AsyncWrite for LineCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for LineCapture {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for LineCapture {
    fn start_seek(self: Pin<&mut Self>, _position: SeekFrom) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(0))
    }
}

impl VirtualFile for LineCapture {
    fn last_accessed(&self) -> u64 {
        0
    }
    fn last_modified(&self) -> u64 {
        0
    }
    fn created_time(&self) -> u64 {
        0
    }
    fn size(&self) -> u64 {
        0
    }
    fn set_len(&mut self, _new_size: u64) -> virtual_fs::Result<()> {
        Err(virtual_fs::FsError::PermissionDenied)
    }
    fn unlink(&mut self) -> virtual_fs::Result<()> {
        Ok(())
    }
    fn poll_read_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(0))
    }
    fn poll_write_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(8192))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_become_whole_lines_and_long_lines_are_cut() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let capture = LineCapture::new(Arc::new(move |l| sink.lock().unwrap().push(l)));
        capture.push(b"hel");
        capture.push(b"lo\r\nwor");
        assert_eq!(*lines.lock().unwrap(), ["hello"]);
        capture.push(&vec![b'x'; MAX_LOG + 10]);
        capture.flush_partial();
        let got = lines.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].len(), MAX_LOG);
        assert!(got[1].starts_with("worxx"));
        assert_eq!(got[2], "x".repeat(13));
    }
}
