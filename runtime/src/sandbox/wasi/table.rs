//! A module's file descriptors: what each WASI fd is, with its rights. Pure: the
//! rules of opening, closing and renumbering are tested here against a model.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::host::DirEntry;
use super::types::{rights, Errno};
use crate::sandbox::capture::Sink;

/// At most this many fds are open at once (kilnd's workers also have an rlimit on
/// host descriptors, which is lower).
pub const MAX_FDS: usize = 1024;

/// What an fd is.
pub enum Kind {
    /// Standard input: kilnd's own (`kilnd run`) or an empty one (workers).
    Stdin { host: bool },
    /// Standard output or error: into a sink, reported as `filetype`.
    Output { sink: Arc<dyn Sink>, filetype: u8 },
    /// A host file (or device) beneath a preopened directory.
    File(OwnedFd),
    /// A host directory; its listing is kept while `fd_readdir` pages through it.
    Dir {
        fd: OwnedFd,
        listing: Option<Vec<DirEntry>>,
    },
}

pub struct Entry {
    pub kind: Kind,
    pub base: u64,
    pub inheriting: u64,
    /// The name `fd_prestat_dir_name` gives, for a preopened directory.
    pub preopen: Option<String>,
}

impl Entry {
    pub fn new(kind: Kind, base: u64, inheriting: u64) -> Self {
        Self {
            kind,
            base,
            inheriting,
            preopen: None,
        }
    }

    /// The entry, if it has every right in `need`; `NOTCAPABLE` if it lacks one.
    pub fn with(&self, need: u64) -> Result<&Self, Errno> {
        if self.base & need == need {
            Ok(self)
        } else {
            Err(Errno::NOTCAPABLE)
        }
    }
}

#[derive(Default)]
pub struct Table {
    fds: BTreeMap<u32, Entry>,
}

impl Table {
    /// Puts `entry` at the lowest free fd.
    pub fn insert(&mut self, entry: Entry) -> Result<u32, Errno> {
        if self.fds.len() >= MAX_FDS {
            return Err(Errno::MFILE);
        }
        let mut fd = 0u32;
        for &used in self.fds.keys() {
            if used != fd {
                break;
            }
            fd += 1;
        }
        self.fds.insert(fd, entry);
        Ok(fd)
    }

    /// Puts `entry` at `fd` (setting up stdio and preopens).
    pub fn put(&mut self, fd: u32, entry: Entry) {
        self.fds.insert(fd, entry);
    }

    pub fn get(&self, fd: i32) -> Result<&Entry, Errno> {
        u32::try_from(fd)
            .ok()
            .and_then(|fd| self.fds.get(&fd))
            .ok_or(Errno::BADF)
    }

    pub fn get_mut(&mut self, fd: i32) -> Result<&mut Entry, Errno> {
        u32::try_from(fd)
            .ok()
            .and_then(|fd| self.fds.get_mut(&fd))
            .ok_or(Errno::BADF)
    }

    /// The entry at `fd` with the rights in `need`.
    pub fn with(&self, fd: i32, need: u64) -> Result<&Entry, Errno> {
        self.get(fd)?.with(need)
    }

    pub fn close(&mut self, fd: i32) -> Result<(), Errno> {
        let fd = u32::try_from(fd).map_err(|_| Errno::BADF)?;
        self.fds.remove(&fd).map(drop).ok_or(Errno::BADF)
    }

    /// WASI's renumber: `from` moves onto `to`, closing what `to` was. `to` must be
    /// open, as in wasmtime, except a standard stream: programs redirect one by closing
    /// it and renumbering a file onto it (`close(1); dup2(fd, 1)`, as Yosys does).
    pub fn renumber(&mut self, from: i32, to: i32) -> Result<(), Errno> {
        self.get(from)?;
        if self.get(to).is_err() && !(0..=2).contains(&to) {
            return Err(Errno::BADF);
        }
        if from == to {
            return Ok(());
        }
        let entry = self.fds.remove(&(from as u32)).ok_or(Errno::BADF)?;
        self.fds.insert(to as u32, entry);
        Ok(())
    }

    /// Narrows `fd`'s rights; asking for a right it does not have is `NOTCAPABLE`.
    pub fn set_rights(&mut self, fd: i32, base: u64, inheriting: u64) -> Result<(), Errno> {
        let entry = self.get_mut(fd)?;
        if base & !entry.base != 0 || inheriting & !entry.inheriting != 0 {
            return Err(Errno::NOTCAPABLE);
        }
        entry.base = base;
        entry.inheriting = inheriting;
        Ok(())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.fds.len()
    }
}

/// The rights a file or directory opened through a directory gets: what was asked
/// for, within what the directory hands on; a directory never carries file rights.
pub fn opened_rights(dir_inheriting: u64, base: u64, inheriting: u64, is_dir: bool) -> (u64, u64) {
    let mut base = base & dir_inheriting;
    if is_dir {
        base &= rights::DIRECTORY;
    }
    (base, inheriting & dir_inheriting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(tag: u64) -> Entry {
        Entry::new(Kind::Stdin { host: false }, tag, 0)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Open,
        Close(i32),
        Renumber(i32, i32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Open),
            2 => (0i32..8).prop_map(Op::Close),
            2 => (0i32..8, 0i32..8).prop_map(|(a, b)| Op::Renumber(a, b)),
        ]
    }

    proptest! {
        /// The table against a model: a map of fd to a tag, the lowest free fd taken.
        #[test]
        fn the_table_behaves_as_its_model(ops in proptest::collection::vec(op(), 0..40)) {
            let mut table = Table::default();
            let mut model: BTreeMap<i32, u64> = BTreeMap::new();
            let mut next_tag = 0u64;
            for op in ops {
                match op {
                    Op::Open => {
                        next_tag += 1;
                        let fd = table.insert(entry(next_tag)).unwrap() as i32;
                        let want = (0..).find(|f| !model.contains_key(f)).unwrap();
                        prop_assert_eq!(fd, want);
                        model.insert(fd, next_tag);
                    }
                    Op::Close(fd) => {
                        let got = table.close(fd);
                        prop_assert_eq!(got.is_ok(), model.remove(&fd).is_some());
                    }
                    Op::Renumber(from, to) => {
                        let ok = model.contains_key(&from)
                            && (model.contains_key(&to) || (0..=2).contains(&to));
                        prop_assert_eq!(table.renumber(from, to).is_ok(), ok);
                        if ok && from != to {
                            let tag = model.remove(&from).unwrap();
                            model.insert(to, tag);
                        }
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                for (fd, tag) in &model {
                    prop_assert_eq!(table.get(*fd).unwrap().base, *tag);
                }
            }
        }
    }

    #[test]
    fn rights_only_narrow() {
        let mut t = Table::default();
        let fd = t
            .insert(Entry::new(Kind::Stdin { host: false }, 0b110, 0b1))
            .unwrap() as i32;
        assert_eq!(t.set_rights(fd, 0b111, 0), Err(Errno::NOTCAPABLE));
        assert_eq!(t.set_rights(fd, 0b010, 0), Ok(()));
        assert_eq!(t.with(fd, 0b100).err(), Some(Errno::NOTCAPABLE));
        assert_eq!(t.with(fd, 0b010).map(|e| e.base).ok(), Some(0b010));
        assert_eq!(t.with(99, 0).err(), Some(Errno::BADF));
        let (b, i) = opened_rights(
            rights::ALL & !rights::FD_WRITE,
            rights::ALL,
            rights::FD_READ,
            true,
        );
        assert_eq!((b, i), (rights::DIRECTORY, rights::FD_READ));
    }
}
