//! A host directory mapped into a module's sandbox: virtual-fs's `host_fs` with file
//! times set to the nanosecond. virtual-fs 0.704's host file takes the nanoseconds
//! wasix gives it for seconds, so `fd_filestat_set_times` (and `touch`, `tar`, `make`
//! inside a module) dated files tens of billions of years ahead. kilnd opens files the
//! way host_fs does, keeps a second handle on the same open file, and sets the times
//! through it; everything else is host_fs's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::runtime::Handle;
use wasmer_wasix::virtual_fs::{
    host_fs, FileOpener, FileSystem, FsError, Metadata, OpenOptions, OpenOptionsConfig, ReadDir,
    VirtualFile,
};

const NANOS: u64 = 1_000_000_000;

#[derive(Debug)]
pub struct HostDir {
    inner: host_fs::FileSystem,
    /// The canonical host directory.
    root: PathBuf,
    handle: Handle,
}

impl HostDir {
    pub fn new(handle: Handle, root: PathBuf) -> Result<Self, FsError> {
        let root = root.canonicalize().map_err(FsError::from)?;
        let inner = host_fs::FileSystem::new(handle.clone(), root.clone())?;
        Ok(HostDir {
            inner,
            root,
            handle,
        })
    }

    /// The host path of a path in this directory, as host_fs makes it.
    fn host_path(&self, path: &Path) -> Result<PathBuf, FsError> {
        let path = host_fs::normalize_path(path);
        if matches!(
            path.components().next(),
            Some(std::path::Component::Prefix(..))
        ) {
            return Err(FsError::InvalidInput);
        }
        if self.root != Path::new("/") && path.starts_with(&self.root) {
            return Err(FsError::InvalidInput);
        }
        let relative = path.strip_prefix("/").unwrap_or(&path);
        Ok(self.root.join(relative))
    }
}

impl FileSystem for HostDir {
    fn readlink(&self, path: &Path) -> Result<PathBuf, FsError> {
        self.inner.readlink(path)
    }
    fn read_dir(&self, path: &Path) -> Result<ReadDir, FsError> {
        self.inner.read_dir(path)
    }
    fn create_dir(&self, path: &Path) -> Result<(), FsError> {
        self.inner.create_dir(path)
    }
    fn create_symlink(&self, source: &Path, target: &Path) -> Result<(), FsError> {
        self.inner.create_symlink(source, target)
    }
    fn hard_link(&self, source: &Path, target: &Path) -> Result<(), FsError> {
        self.inner.hard_link(source, target)
    }
    fn remove_dir(&self, path: &Path) -> Result<(), FsError> {
        self.inner.remove_dir(path)
    }
    fn rename<'a>(
        &'a self,
        from: &'a Path,
        to: &'a Path,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), FsError>> + Send + 'a>> {
        self.inner.rename(from, to)
    }
    fn metadata(&self, path: &Path) -> Result<Metadata, FsError> {
        self.inner.metadata(path)
    }
    fn symlink_metadata(&self, path: &Path) -> Result<Metadata, FsError> {
        self.inner.symlink_metadata(path)
    }
    fn remove_file(&self, path: &Path) -> Result<(), FsError> {
        self.inner.remove_file(path)
    }
    fn new_open_options(&self) -> OpenOptions<'_> {
        OpenOptions::new(self)
    }
}

impl FileOpener for HostDir {
    fn open(
        &self,
        path: &Path,
        conf: &OpenOptionsConfig,
    ) -> Result<Box<dyn VirtualFile + Send + Sync + 'static>, FsError> {
        let path = self.host_path(path)?;
        // As host_fs: append and truncate together is truncate.
        let append = !conf.truncate() && conf.append();
        let file = fs::OpenOptions::new()
            .read(conf.read())
            .write(conf.write())
            .create_new(conf.create_new())
            .create(conf.create())
            .append(append)
            .truncate(conf.truncate())
            .open(&path)
            .map_err(FsError::from)?;
        let times = file.try_clone().map_err(FsError::from)?;
        Ok(Box::new(Timed {
            file: host_fs::File::new(
                self.handle.clone(),
                file,
                path,
                conf.read(),
                conf.write(),
                append,
            ),
            times,
        }))
    }
}

/// A host file whose times are set to the nanosecond.
#[derive(Debug)]
struct Timed {
    file: host_fs::File,
    /// The same open file, for futimens.
    times: fs::File,
}

fn file_time(nanos: u64) -> filetime::FileTime {
    filetime::FileTime::from_unix_time((nanos / NANOS) as i64, (nanos % NANOS) as u32)
}

impl VirtualFile for Timed {
    fn last_accessed(&self) -> u64 {
        self.file.last_accessed()
    }
    fn last_modified(&self) -> u64 {
        self.file.last_modified()
    }
    fn created_time(&self) -> u64 {
        self.file.created_time()
    }
    fn set_times(&mut self, atime: Option<u64>, mtime: Option<u64>) -> Result<(), FsError> {
        filetime::set_file_handle_times(&self.times, atime.map(file_time), mtime.map(file_time))
            .map_err(|_| FsError::IOError)
    }
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn set_len(&mut self, new_size: u64) -> Result<(), FsError> {
        self.file.set_len(new_size)
    }
    fn unlink(&mut self) -> Result<(), FsError> {
        self.file.unlink()
    }
    fn is_open(&self) -> bool {
        self.file.is_open()
    }
    fn get_special_fd(&self) -> Option<u32> {
        self.file.get_special_fd()
    }
    fn poll_read_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_read_ready(cx)
    }
    fn poll_write_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write_ready(cx)
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_read(cx, buf)
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.file.is_write_vectored()
    }
}

impl AsyncSeek for Timed {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.get_mut().file).start_seek(position)
    }
    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().file).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_set_to_the_nanosecond_and_nothing_else_changes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"kiln").unwrap();
        let host = HostDir::new(rt.handle().clone(), dir.path().to_path_buf()).unwrap();
        let mut file = host
            .new_open_options()
            .read(true)
            .write(true)
            .open(Path::new("/f"))
            .unwrap();
        let mtime = 1_796_543_518_745_019_618;
        file.set_times(None, Some(mtime)).unwrap();
        let meta = std::fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(
            filetime::FileTime::from_last_modification_time(&meta),
            file_time(mtime)
        );
        assert_eq!(file.size(), 4);
        for climbing in ["/../../etc/passwd", "../f", "/a/../../f"] {
            let path = host.host_path(Path::new(climbing)).unwrap();
            assert!(
                path.starts_with(&host.root),
                "{climbing} -> {}",
                path.display()
            );
        }
    }
}
