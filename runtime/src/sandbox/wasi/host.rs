//! The host side of a module's files: Linux `*at` calls on directory descriptors, and
//! the walk that resolves a guest path beneath a preopened directory.
//!
//! A guest path is resolved one name at a time, each directory opened with
//! `O_NOFOLLOW` relative to the one before, and each symlink met on the way read and
//! spliced into the names still to walk; nothing is ever resolved by the host's own
//! path lookup. So a path can only name something beneath the directory it is
//! relative to: an absolute path or symlink target, or a `..` past that directory, is
//! `NOTCAPABLE`, and more than 40 symlinks in one walk is `LOOP`. The last name is
//! handed to the operation with the directory that holds it, which acts on it with
//! `O_NOFOLLOW` or `AT_SYMLINK_NOFOLLOW`: a symlink put there after the walk is not
//! followed either. (Landlock, where the kernel has it, also confines the worker to its
//! mapped directories; this walk does not rely on it.)

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::types::Errno;

/// At most this many symlinks are followed in one walk (Linux's own bound).
pub const MAX_SYMLINKS: usize = 40;
/// A guest path longer than this is `NAMETOOLONG` (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

pub type Result<T> = std::result::Result<T, Errno>;

fn cvt(r: libc::c_int) -> Result<libc::c_int> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

fn cstr(name: &[u8]) -> Result<CString> {
    CString::new(name).map_err(|_| Errno::INVAL)
}

/// A libc call whose negative result means errno, made again while it is EINTR.
pub fn retry(mut call: impl FnMut() -> isize) -> Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = Errno::last();
        if e != Errno::INTR {
            return Err(e);
        }
    }
}

/// openat(2), the new descriptor close-on-exec.
pub fn openat(dir: RawFd, name: &[u8], flags: libc::c_int, mode: u32) -> Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: a NUL-terminated name.
    let fd = retry(|| unsafe {
        libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) as isize
    })?;
    // SAFETY: openat returned a fresh descriptor, which we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// fstatat(2); `follow` follows a symlink named by `name`.
pub fn statat(dir: RawFd, name: &[u8], follow: bool) -> Result<libc::stat> {
    let name = cstr(name)?;
    // SAFETY: zeroed is a valid stat; fstatat writes it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: a NUL-terminated name and a stat to write into.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// fstat(2).
pub fn fstat(fd: RawFd) -> Result<libc::stat> {
    // SAFETY: zeroed is a valid stat; fstat writes it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a stat to write into.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// readlinkat(2) of the whole target (at most `MAX_PATH` bytes).
pub fn readlinkat(dir: RawFd, name: &[u8]) -> Result<Vec<u8>> {
    let name = cstr(name)?;
    let mut buf = vec![0u8; MAX_PATH + 1];
    // SAFETY: the buffer is writable for its length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    let n = n as usize;
    if n > MAX_PATH {
        return Err(Errno::NAMETOOLONG);
    }
    buf.truncate(n);
    Ok(buf)
}

pub fn mkdirat(dir: RawFd, name: &[u8]) -> Result<()> {
    let name = cstr(name)?;
    // SAFETY: a NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), 0o777) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &[u8], flags: libc::c_int) -> Result<()> {
    let name = cstr(name)?;
    // SAFETY: a NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn symlinkat(target: &[u8], dir: RawFd, name: &[u8]) -> Result<()> {
    let (target, name) = (cstr(target)?, cstr(name)?);
    // SAFETY: NUL-terminated names.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn renameat(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated names.
    cvt(unsafe { libc::renameat(from_dir, from.as_ptr(), to_dir, to.as_ptr()) }).map(drop)
}

pub fn linkat(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated names; flags 0: a symlink is linked, not followed.
    cvt(unsafe { libc::linkat(from_dir, from.as_ptr(), to_dir, to.as_ptr(), 0) }).map(drop)
}

/// utimensat(2) of `name` in `dir`, never following a symlink; an empty name is
/// `dir` itself (futimens).
pub fn utimensat(dir: RawFd, name: &[u8], times: &[libc::timespec; 2]) -> Result<()> {
    if name.is_empty() {
        // SAFETY: two timespecs.
        return cvt(unsafe { libc::futimens(dir, times.as_ptr()) }).map(drop);
    }
    let name = cstr(name)?;
    // SAFETY: a NUL-terminated name and two timespecs.
    cvt(unsafe {
        libc::utimensat(
            dir,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub d_type: u8,
    pub name: Vec<u8>,
}

/// A directory's whole listing, `.` and `..` included, in the order the kernel gives
/// it, at most `max_bytes` of names.
pub fn list(dir: RawFd, max_bytes: usize) -> Result<Vec<DirEntry>> {
    // A description of its own, so the listing always starts at the beginning.
    let own = openat(dir, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: getdents64 writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                own.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(Errno::last());
        }
        if n == 0 {
            return Ok(entries);
        }
        let mut at = 0usize;
        let n = n as usize;
        // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
        while at + 19 < n {
            let ino = u64::from_ne_bytes(buf[at..at + 8].try_into().map_err(|_| Errno::IO)?);
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            if reclen == 0 || at + reclen > n {
                return Err(Errno::IO);
            }
            let d_type = buf[at + 18];
            let raw = &buf[at + 19..at + reclen];
            let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            bytes += name.len() + 24;
            if bytes > max_bytes {
                return Err(Errno::NOMEM);
            }
            entries.push(DirEntry {
                ino,
                d_type,
                name: name.to_vec(),
            });
            at += reclen;
        }
    }
}

/// The directory a resolved name is in: the walk's start, or one it opened.
pub enum Parent {
    Start(RawFd),
    Opened(OwnedFd),
}

impl Parent {
    pub fn fd(&self) -> RawFd {
        match self {
            Parent::Start(fd) => *fd,
            Parent::Opened(fd) => fd.as_raw_fd(),
        }
    }
}

/// A guest path resolved to the directory that holds its last name.
pub struct Resolved {
    pub parent: Parent,
    /// The last name: never empty, never containing `/`; `.` when the path names the
    /// directory itself.
    pub name: Vec<u8>,
    /// The path ended in `/` (or in a symlink whose target did): only a directory may
    /// be named.
    pub dir_required: bool,
}

/// What a walk needs of the file system: a test gives a model, kilnd the host.
pub trait Walker {
    type Dir;
    /// Opens the directory `name` in `dir` without following a symlink: `Ok(None)`
    /// when `name` is a symlink.
    fn open_dir(&mut self, dir: Option<&Self::Dir>, name: &[u8]) -> Result<Option<Self::Dir>>;
    /// `name`'s target when it is a symlink, else `None`.
    fn link(&mut self, dir: Option<&Self::Dir>, name: &[u8]) -> Result<Option<Vec<u8>>>;
}

/// The result of a walk: the directories opened beneath the start (the last holds the
/// name), the name, and whether a directory is required.
pub struct Walked<D> {
    pub dirs: Vec<D>,
    pub name: Vec<u8>,
    pub dir_required: bool,
}

/// Walks `path` beneath the start directory (`None`), following symlinks on the way,
/// and the last name's too when `follow` (or a trailing `/`) says so.
pub fn walk<W: Walker>(w: &mut W, path: &[u8], follow: bool) -> Result<Walked<W::Dir>> {
    if path.is_empty() {
        return Err(Errno::NOENT);
    }
    if path.len() > MAX_PATH {
        return Err(Errno::NAMETOOLONG);
    }
    if path.contains(&0) {
        return Err(Errno::INVAL);
    }
    let mut todo: VecDeque<Vec<u8>> = VecDeque::new();
    let mut dir_required = false;
    push_front(&mut todo, path, &mut dir_required)?;
    let mut dirs: Vec<W::Dir> = Vec::new();
    let mut links = 0usize;
    while let Some(part) = todo.pop_front() {
        let last = todo.is_empty();
        match part.as_slice() {
            b"." if last => break,
            b"." => {}
            b".." => {
                if dirs.pop().is_none() {
                    return Err(Errno::NOTCAPABLE);
                }
                if last {
                    break;
                }
            }
            name if last && !(follow || dir_required) => {
                return Ok(Walked {
                    dirs,
                    name: name.to_vec(),
                    dir_required,
                });
            }
            name if last => match w.link(dirs.last(), name)? {
                Some(target) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno::LOOP);
                    }
                    push_front(&mut todo, &target, &mut dir_required)?;
                }
                None => {
                    return Ok(Walked {
                        dirs,
                        name: name.to_vec(),
                        dir_required,
                    })
                }
            },
            name => match w.open_dir(dirs.last(), name)? {
                Some(dir) => dirs.push(dir),
                None => {
                    let target = w.link(dirs.last(), name)?.ok_or(Errno::NOTDIR)?;
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno::LOOP);
                    }
                    let mut ignored = false;
                    push_front(&mut todo, &target, &mut ignored)?;
                }
            },
        }
    }
    // The path named a directory by `.` or `..` last (or was only those).
    Ok(Walked {
        dirs,
        name: b".".to_vec(),
        dir_required: true,
    })
}

/// Puts `path`'s names in front of those still to walk; an absolute path is
/// `NOTCAPABLE`, a trailing `/` requires a directory at the end.
fn push_front(todo: &mut VecDeque<Vec<u8>>, path: &[u8], dir_required: &mut bool) -> Result<()> {
    if path.is_empty() {
        return Err(Errno::NOENT);
    }
    if path[0] == b'/' {
        return Err(Errno::NOTCAPABLE);
    }
    if todo.is_empty() && path.ends_with(b"/") {
        *dir_required = true;
    }
    let mut parts: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        parts.push(b".");
    }
    for part in parts.into_iter().rev() {
        todo.push_front(part.to_vec());
    }
    Ok(())
}

/// The host as a walk sees it.
pub struct Host {
    pub start: RawFd,
}

impl Host {
    fn at(&self, dir: Option<&OwnedFd>) -> RawFd {
        dir.map_or(self.start, |d| d.as_raw_fd())
    }
}

impl Walker for Host {
    type Dir = OwnedFd;

    fn open_dir(&mut self, dir: Option<&OwnedFd>, name: &[u8]) -> Result<Option<OwnedFd>> {
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        match openat(self.at(dir), name, flags, 0) {
            Ok(fd) => Ok(Some(fd)),
            // A symlink opened with O_NOFOLLOW | O_DIRECTORY is ENOTDIR (or ELOOP).
            Err(Errno::NOTDIR) | Err(Errno::LOOP) => match statat(self.at(dir), name, false) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => Ok(None),
                Ok(_) => Err(Errno::NOTDIR),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn link(&mut self, dir: Option<&OwnedFd>, name: &[u8]) -> Result<Option<Vec<u8>>> {
        match readlinkat(self.at(dir), name) {
            Ok(target) => Ok(Some(target)),
            // Not a symlink (EINVAL), or not there yet (a file to create).
            Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Resolves `path` beneath the directory `start` on the host.
pub fn resolve(start: RawFd, path: &[u8], follow: bool) -> Result<Resolved> {
    let mut host = Host { start };
    let walked = walk(&mut host, path, follow)?;
    let parent = match walked.dirs.into_iter().last() {
        Some(fd) => Parent::Opened(fd),
        None => Parent::Start(start),
    };
    Ok(Resolved {
        parent,
        name: walked.name,
        dir_required: walked.dir_required,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A model file system: paths (names joined by `/`) to what is there.
    #[derive(Default)]
    struct Model {
        dirs: Vec<String>,
        links: BTreeMap<String, String>,
    }

    impl Model {
        fn path(dir: Option<&String>, name: &[u8]) -> String {
            let name = String::from_utf8_lossy(name);
            match dir {
                Some(d) => format!("{d}/{name}"),
                None => name.into_owned(),
            }
        }
    }

    impl Walker for Model {
        type Dir = String;
        fn open_dir(&mut self, dir: Option<&String>, name: &[u8]) -> Result<Option<String>> {
            let p = Self::path(dir, name);
            if self.links.contains_key(&p) {
                Ok(None)
            } else if self.dirs.contains(&p) {
                Ok(Some(p))
            } else {
                Err(Errno::NOENT)
            }
        }
        fn link(&mut self, dir: Option<&String>, name: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(self
                .links
                .get(&Self::path(dir, name))
                .map(|t| t.as_bytes().to_vec()))
        }
    }

    fn model() -> Model {
        let mut m = Model {
            dirs: vec!["a".into(), "a/b".into(), "c".into()],
            ..Default::default()
        };
        for (link, target) in [
            ("a/up", ".."),
            ("a/out", "../.."),
            ("abs", "/etc"),
            ("loop", "loop"),
            ("tob", "a/b"),
            ("a/b/back", "../../c"),
        ] {
            m.links.insert(link.into(), target.into());
        }
        m
    }

    fn walked(path: &str, follow: bool) -> Result<(Vec<String>, String, bool)> {
        let w = walk(&mut model(), path.as_bytes(), follow)?;
        Ok((w.dirs, String::from_utf8(w.name).unwrap(), w.dir_required))
    }

    #[test]
    fn paths_stay_beneath_their_directory() {
        assert_eq!(
            walked("a/b/f", false),
            Ok((vec!["a".into(), "a/b".into()], "f".into(), false))
        );
        assert_eq!(
            walked("a/../c/f", false),
            Ok((vec!["c".into()], "f".into(), false))
        );
        assert_eq!(
            walked("a/up/c/f", false),
            Ok((vec!["c".into()], "f".into(), false))
        );
        assert_eq!(
            walked("tob/back/f", false),
            Ok((vec!["c".into()], "f".into(), false))
        );
        assert_eq!(
            walked("a/b/", false),
            Ok((vec!["a".into()], "b".into(), true))
        );
        assert_eq!(walked(".", false), Ok((vec![], ".".into(), true)));
        assert_eq!(walked("a/..", false), Ok((vec![], ".".into(), true)));
        // A last name that is a symlink is left alone unless followed.
        assert_eq!(walked("tob", false), Ok((vec![], "tob".into(), false)));
        assert_eq!(
            walked("tob", true),
            Ok((vec!["a".into()], "b".into(), false))
        );
        for (bad, why) in [
            ("/etc", Errno::NOTCAPABLE),
            ("..", Errno::NOTCAPABLE),
            ("a/../../x", Errno::NOTCAPABLE),
            ("a/out/x", Errno::NOTCAPABLE),
            ("abs/x", Errno::NOTCAPABLE),
            ("loop/x", Errno::LOOP),
            ("", Errno::NOENT),
            ("nope/x", Errno::NOENT),
        ] {
            assert_eq!(walked(bad, false).map(|_| ()), Err(why), "{bad}");
        }
        assert_eq!(walked("abs", true).map(|_| ()), Err(Errno::NOTCAPABLE));
        assert_eq!(walked("loop", true).map(|_| ()), Err(Errno::LOOP));
    }

    proptest! {
        /// Whatever the path, a walk ends beneath its start: every directory it holds is
        /// one of the model's, and the last name is a single name.
        #[test]
        fn no_path_leaves_its_directory(parts in proptest::collection::vec(
            prop_oneof![Just("."), Just(".."), Just("a"), Just("b"), Just("c"), Just("up"),
                        Just("out"), Just("tob"), Just("back"), Just(""), Just("f")], 0..10),
            follow in any::<bool>())
        {
            let path = parts.join("/");
            let m = model();
            let known = m.dirs.clone();
            if let Ok(w) = walk(&mut model(), path.as_bytes(), follow) {
                for d in &w.dirs {
                    prop_assert!(known.contains(d), "{} -> {}", path, d);
                }
                prop_assert!(!w.name.is_empty() && !w.name.contains(&b'/'));
                prop_assert!(w.name != b".." );
            }
        }
    }

    #[test]
    fn the_host_walk_refuses_a_symlink_out_of_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(tmp.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../../secret", root.join("d/out")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("d", root.join("tod")).unwrap();
        let dir = openat(
            libc::AT_FDCWD,
            root.as_os_str().as_encoded_bytes(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .unwrap();
        let start = dir.as_raw_fd();
        assert_eq!(
            resolve(start, b"d/out", true).err(),
            Some(Errno::NOTCAPABLE)
        );
        assert_eq!(resolve(start, b"abs", true).err(), Some(Errno::NOTCAPABLE));
        let r = resolve(start, b"tod/out", false).ok().unwrap();
        assert_eq!(r.name, b"out");
        let st = statat(r.parent.fd(), b".", true).unwrap();
        assert_eq!(
            st.st_ino,
            std::fs::metadata(root.join("d"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .unwrap()
        );
        let names: Vec<Vec<u8>> = list(start, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        for want in [&b"."[..], b"..", b"d", b"abs", b"tod"] {
            assert!(names.iter().any(|n| n == want));
        }
    }
}
