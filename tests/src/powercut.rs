//! [`PowerCutFs`]: an in-memory FUSE filesystem that keeps only what was made durable, so a test
//! can cut the power under a real process and see what a machine would find after the reboot.
//!
//! # The model
//!
//! Every inode has a *current* state (what reads, `stat` and `readdir` see) and a *durable* state
//! (what survives a power cut):
//!
//! - A regular file's content and size become durable only on `fsync(2)` or `fdatasync(2)` of
//!   that file; both make the whole current content durable (the model does not tell data from
//!   metadata, so `fdatasync` is as strong as `fsync` here).
//! - A directory's entries (the names it holds, made by `creat`/`open(O_CREAT)`, `mknod`, `mkdir`,
//!   `unlink`, `rmdir` and `rename`) become durable only on `fsync(2)` of that directory (FUSE
//!   `fsyncdir`), which makes the whole current list of names durable at once. So a new file
//!   whose data was fsynced but whose directory was not is gone after a cut, a rename without a
//!   directory fsync is undone, and an unlinked file comes back. `rename` across directories
//!   touches two directories' entry lists, each durable on its own fsync.
//! - `close`, `flush`, `sync_file_range(2)` and the passing of time make nothing durable.
//!
//! This is what POSIX guarantees and no more; real filesystems often keep more (ext4's
//! `data=ordered` journal, for one, commits a rename atomically with its directory). A program
//! that survives this model relies only on the guarantees it asked for.
//!
//! [`PowerCutFs::power_cut`] freezes the filesystem (every later request fails with `EIO`, so a
//! request still in flight from a killed process cannot change what survives), unmounts it and
//! rebuilds the tree from the durable states only, walking the durable entries from the root:
//! every surviving file's content is its durable content, every surviving directory's entries
//! are its durable entries, and everything unreachable that way is gone. The root directory
//! always survives: it stands for the mount point of a volume, which exists before and after.
//! [`PowerCutFs::remount`] mounts the survivors at the same path, on a new FUSE connection, so no
//! kernel cache (dentries, attributes, pages) from before the cut can show a state the disk
//! would not have. Files are opened with `FOPEN_DIRECT_IO` as well, so reads and writes always
//! reach this model rather than the page cache.
//!
//! # Limits
//!
//! - It models the *strictest* outcome only: at a cut, *everything* not made durable is lost.
//!   Real disks may also keep any subset of the unsynced writes, tear a write in the middle of a
//!   sector or reorder unsynced writes; those outcomes are not generated. (A program whose
//!   recovery reads a partially written tail is therefore tested only with tails cut exactly
//!   at an fsync boundary.)
//! - An inode reachable under two durable names after a cut (a directory renamed between two
//!   directories of which only one was fsynced) is kept under the first name the walk meets;
//!   the other entry is dropped, as `fsck` would.
//! - No hard links, symbolic links, special files, extended attributes or POSIX locks: `link`
//!   and `symlink` fail with `EPERM`, xattrs with `ENOSYS`, and locks (`flock`, `fcntl`) are
//!   left to the kernel, which handles them locally when the filesystem does not ask for them.
//! - `fallocate` supports mode 0 (extend the size with zeros) and `FALLOC_FL_KEEP_SIZE`
//!   (nothing to reserve in memory); other modes answer `EOPNOTSUPP`. The size a mode-0
//!   `fallocate` sets becomes durable on the next fsync, like a write.
//! - Direct I/O rules out shared memory mappings: `mmap(MAP_SHARED)` fails with `ENODEV`
//!   (RocksDB does not map files unless told to).
//! - Permissions are not checked (the tests run as root); ownership and mode are recorded.
//! - Content lives in memory, in copy-on-write chunks shared between the current and the
//!   durable state, so an fsync costs a pointer copy per chunk, not a copy of the file.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session,
    SessionUnmounter, TimeOrNow, WriteFlags,
};

/// How long the kernel may cache an entry or attributes. Nothing changes behind the kernel's
/// back while mounted (every change goes through it), and a cut remounts, so caching is safe.
const TTL: Duration = Duration::from_secs(1);
/// Size of a content chunk, the unit of copy-on-write between current and durable content.
const CHUNK: usize = 64 * 1024;
/// Block size reported by `stat` and `statfs`.
const BLOCK: u32 = 4096;
/// `FALLOC_FL_KEEP_SIZE`: reserve space without changing the size.
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const ROOT: u64 = INodeNo::ROOT.0;

/// Counters of what the filesystem saw, since it was first mounted (they survive cuts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` of regular files.
    pub fsyncs: u64,
    /// `fdatasync` of regular files.
    pub fdatasyncs: u64,
    /// `fsync`/`fdatasync` of directories.
    pub dir_syncs: u64,
    /// Write requests, and bytes written.
    pub writes: u64,
    pub bytes_written: u64,
    /// Power cuts.
    pub cuts: u64,
}

/// What one power cut dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Surviving files whose current content differed from their durable content.
    pub files_reverted: u64,
    /// Directories whose current entries differed from their durable entries.
    pub dirs_reverted: u64,
    /// Inodes that existed before the cut and are gone after it.
    pub inodes_lost: u64,
    /// Inodes that survive the cut.
    pub inodes_kept: u64,
}

/// An in-memory FUSE filesystem mounted at a directory, with power cuts on command; see the
/// module documentation for what survives a cut. Unmounted when dropped.
pub struct PowerCutFs {
    mountpoint: PathBuf,
    model: Arc<Mutex<Model>>,
    stall: Arc<Stall>,
    session: Option<MountedSession>,
}

/// A [`PowerCutFs`] mounted on a fresh temporary directory. The filesystem is the first field, so it is unmounted
/// before the directory is removed (a struct's fields are dropped in the order they are declared).
pub struct TempMount {
    pub fs: PowerCutFs,
    _dir: tempfile::TempDir,
}

impl TempMount {
    /// Mounts one, or panics saying what went wrong (mounting needs root and `/dev/fuse`).
    pub fn mount() -> TempMount {
        let dir = tempfile::Builder::new()
            .prefix("tally-powercut-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let fs = PowerCutFs::mount(dir.path()).unwrap_or_else(|e| {
            panic!("mounting the power-cut filesystem (needs root and /dev/fuse): {e}")
        });
        TempMount { fs, _dir: dir }
    }
}

/// A disk that stops answering: while closed, an `fsync` waits, and with it the whole filesystem (one FUSE
/// session thread answers every request in turn).
#[derive(Default)]
struct Stall {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicU64,
}

/// The disk stays stalled while this lives; see [`PowerCutFs::stall`].
#[must_use = "the disk is stalled only while the guard lives"]
pub struct Stalled {
    stall: Arc<Stall>,
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.stall.set(false);
    }
}

impl Stall {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = closed;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while *closed {
                closed = self.opened.wait(closed).unwrap_or_else(|e| e.into_inner());
            }
            self.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The FUSE session of one mount.
struct MountedSession {
    unmounter: SessionUnmounter,
    /// Runs the session until the connection ends.
    thread: JoinHandle<io::Result<()>>,
}

impl PowerCutFs {
    /// Mounts an empty filesystem at `dir` (an existing, empty directory). Needs root (or
    /// `CAP_SYS_ADMIN`) and `/dev/fuse`.
    pub fn mount(dir: &Path) -> io::Result<PowerCutFs> {
        let mut fs = PowerCutFs {
            mountpoint: dir.canonicalize()?,
            model: Arc::new(Mutex::new(Model::new())),
            stall: Arc::default(),
            session: None,
        };
        fs.remount()?;
        Ok(fs)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether it is mounted now (between [`power_cut`](Self::power_cut) and
    /// [`remount`](Self::remount) it is not).
    pub fn is_mounted(&self) -> bool {
        self.session.is_some()
    }

    /// The power cut: from this instant every request fails with `EIO` and nothing more becomes
    /// durable; then the filesystem is unmounted and everything that was not made durable is
    /// dropped. Stop the processes using it first (SIGKILL): a process still holding a file open
    /// keeps a lazily detached mount alive. Call [`remount`](Self::remount) to see the survivors.
    pub fn power_cut(&mut self) -> io::Result<CutReport> {
        self.model.lock().cut = true;
        self.unmount()?;
        Ok(self.model.lock().revert())
    }

    /// Mounts the surviving tree again at the same path, on a fresh FUSE connection. A no-op
    /// when mounted.
    pub fn remount(&mut self) -> io::Result<()> {
        if self.session.is_some() {
            return Ok(());
        }
        let generation = {
            let mut model = self.model.lock();
            model.cut = false;
            model.generation += 1;
            model.generation
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("tally-powercut".into()),
            MountOption::Subtype("powercut".into()),
        ];
        let fs = PowerCutFilesystem {
            model: self.model.clone(),
            stall: self.stall.clone(),
            generation,
        };
        let mut session = Session::new(fs, &self.mountpoint, &config)?;
        // Unmounting goes through this handle only: the session must never unmount the path by
        // itself later, when a newer mount may be there.
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("powercut-fuse".into())
            .spawn(move || session.run())?;
        self.session = Some(MountedSession { unmounter, thread });
        Ok(())
    }

    /// [`power_cut`](Self::power_cut), then [`remount`](Self::remount).
    pub fn power_cut_and_remount(&mut self) -> io::Result<CutReport> {
        let report = self.power_cut()?;
        self.remount()?;
        Ok(report)
    }

    /// Stalls the disk: from now on an `fsync` does not return, and every request behind it waits too, until the
    /// returned guard is dropped (or the filesystem unmounted). Declare the guard after the processes using the
    /// filesystem, so that a failing test lets them go before it waits for them to exit.
    pub fn stall(&self) -> Stalled {
        self.stall.set(true);
        Stalled {
            stall: self.stall.clone(),
        }
    }

    /// How many `fsync`s the [`stall`](Self::stall) holds now.
    pub fn stalled_fsyncs(&self) -> u64 {
        self.stall.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.model.lock().stats
    }

    /// Unmounts the filesystem. When something still holds it (a process that was not stopped,
    /// a descriptor opened before the cut), the mount is detached lazily: its session then lives
    /// on, answering `EIO` to everything (it belongs to an older generation), until the last
    /// reference goes; it is not waited for.
    fn unmount(&mut self) -> io::Result<()> {
        self.stall.set(false);
        let Some(MountedSession {
            mut unmounter,
            thread,
        }) = self.session.take()
        else {
            return Ok(());
        };
        match unmounter.unmount() {
            Ok(()) => match thread
                .join()
                .map_err(|_| io::Error::other("the FUSE session thread panicked"))?
            {
                // The kernel ends the session's reads with one of these once it is unmounted:
                // the normal end of a session, not a failure.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::ENODEV)
                    ) =>
                {
                    Ok(())
                }
                result => result,
            },
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                let path = CString::new(self.mountpoint.as_os_str().as_bytes())?;
                // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
                let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

impl std::fmt::Debug for PowerCutFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerCutFs")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

/// A file's content: a size and chunks of [`CHUNK`] bytes, shared copy-on-write between the
/// current and the durable state. A missing chunk reads as zeros.
#[derive(Debug, Clone, Default, PartialEq)]
struct Content {
    size: u64,
    chunks: Vec<Option<Arc<Vec<u8>>>>,
}

impl Content {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let index = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let take = (CHUNK - within).min((end - pos) as usize);
            match self.chunks.get(index).and_then(Option::as_ref) {
                Some(chunk) => out.extend_from_slice(&chunk[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            pos += take as u64;
        }
        out
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        let last = end.div_ceil(CHUNK as u64) as usize;
        if self.chunks.len() < last {
            self.chunks.resize(last, None);
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let take = (CHUNK - within).min(rest.len());
            let chunk = self.chunks[index].get_or_insert_with(|| Arc::new(vec![0; CHUNK]));
            // Copies the chunk only when the durable state shares it.
            Arc::make_mut(chunk)[within..within + take].copy_from_slice(&rest[..take]);
            pos += take as u64;
            rest = &rest[take..];
        }
        self.size = self.size.max(end);
    }

    fn set_size(&mut self, size: u64) {
        if size < self.size {
            let keep = size.div_ceil(CHUNK as u64) as usize;
            self.chunks.truncate(keep);
            // Bytes past the new end must read as zeros if the file grows again.
            let within = (size % CHUNK as u64) as usize;
            if within != 0
                && let Some(Some(chunk)) = self.chunks.last_mut()
            {
                Arc::make_mut(chunk)[within..].fill(0);
            }
        }
        self.size = size;
    }
}

#[derive(Debug, Clone)]
enum Body {
    File {
        current: Content,
        durable: Content,
    },
    Dir {
        /// The parent in the current tree, for `..`.
        parent: u64,
        current: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

#[derive(Debug, Clone)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Current directory entries naming this inode.
    links: u32,
    /// Durable directory entries (of inodes still held) naming this inode: while there is one,
    /// a cut may bring the inode back, so it is kept even when unlinked.
    durable_links: u32,
    /// Open file handles.
    open: u32,
}

impl Inode {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            body,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            links: 0,
            durable_links: 0,
            open: 0,
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, size, nlink) = match &self.body {
            Body::File { current, .. } => (FileType::RegularFile, current.size, self.links),
            Body::Dir { .. } => (FileType::Directory, u64::from(BLOCK), 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.ctime,
            kind,
            perm: self.perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn entries(&self) -> Option<&BTreeMap<OsString, u64>> {
        match &self.body {
            Body::Dir { current, .. } => Some(current),
            Body::File { .. } => None,
        }
    }
}

/// The whole filesystem state, behind one mutex shared by the FUSE session and [`PowerCutFs`].
#[derive(Debug)]
struct Model {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    next_fh: u64,
    /// Open handles: file handle to inode.
    handles: HashMap<u64, u64>,
    /// Set at a power cut: every request fails until the remount.
    cut: bool,
    /// Number of the current mount: requests reaching an older mount's session (lazily detached
    /// at a cut) fail.
    generation: u64,
    stats: Stats,
}

type Answer<T> = Result<T, Errno>;

impl Model {
    fn new() -> Model {
        let mut root = Inode::new(
            Body::Dir {
                parent: ROOT,
                current: BTreeMap::new(),
                durable: BTreeMap::new(),
            },
            0o755,
            0,
            0,
        );
        // The root always exists: the mount itself names it.
        root.links = 1;
        root.durable_links = 1;
        Model {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            next_fh: 1,
            handles: HashMap::new(),
            cut: false,
            generation: 0,
            stats: Stats::default(),
        }
    }

    fn live(&self, generation: u64) -> Answer<()> {
        if self.cut || self.generation != generation {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn inode(&self, ino: u64) -> Answer<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Answer<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64) -> Answer<FileAttr> {
        Ok(self.inode(ino)?.attr(ino))
    }

    fn dir_entries(&self, dir: u64) -> Answer<&BTreeMap<OsString, u64>> {
        self.inode(dir)?.entries().ok_or(Errno::ENOTDIR)
    }

    fn dir_entries_mut(&mut self, dir: u64) -> Answer<&mut BTreeMap<OsString, u64>> {
        match &mut self.inode_mut(dir)?.body {
            Body::Dir { current, .. } => Ok(current),
            Body::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Answer<&mut Content> {
        match &mut self.inode_mut(ino)?.body {
            Body::File { current, .. } => Ok(current),
            Body::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Answer<FileAttr> {
        let ino = *self.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    fn touch_dir(&mut self, dir: u64) {
        if let Some(inode) = self.inodes.get_mut(&dir) {
            let now = SystemTime::now();
            inode.mtime = now;
            inode.ctime = now;
        }
    }

    /// Creates `name` in `parent` (which must not hold it) with this body; returns its number.
    fn add(&mut self, parent: u64, name: &OsStr, body: Body, perm: u16, req: &Request) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut inode = Inode::new(body, perm, req.uid(), req.gid());
        inode.links = 1;
        self.inodes.insert(ino, inode);
        if let Ok(entries) = self.dir_entries_mut(parent) {
            entries.insert(name.to_os_string(), ino);
        }
        self.touch_dir(parent);
        ino
    }

    fn create_file(&mut self, parent: u64, name: &OsStr, mode: u32, req: &Request) -> Answer<u64> {
        if self.dir_entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let body = Body::File {
            current: Content::default(),
            durable: Content::default(),
        };
        Ok(self.add(parent, name, body, perm_of(mode), req))
    }

    fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32, req: &Request) -> Answer<u64> {
        if self.dir_entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let body = Body::Dir {
            parent,
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        Ok(self.add(parent, name, body, perm_of(mode), req))
    }

    /// Removes the entry `name` of `parent`; `dir` says whether it must be a directory (rmdir)
    /// or must not be one (unlink).
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Answer<()> {
        let ino = *self.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        match (self.inode(ino)?.entries(), dir) {
            (Some(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Some(_), false) => return Err(Errno::EISDIR),
            (None, true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir_entries_mut(parent)?.remove(name);
        self.touch_dir(parent);
        self.unlinked(ino);
        Ok(())
    }

    /// One current entry naming `ino` is gone.
    fn unlinked(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.links = inode.links.saturating_sub(1);
            inode.ctime = SystemTime::now();
        }
        self.collect(ino);
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Answer<()> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let ino = *self.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        let moving_dir = self.inode(ino)?.entries().is_some();
        let replaced = self.dir_entries(new_parent)?.get(new_name).copied();
        if let Some(target) = replaced {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (self.inode(target)?.entries(), moving_dir) {
                (Some(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
                (Some(_), false) => return Err(Errno::EISDIR),
                (None, true) => return Err(Errno::ENOTDIR),
                _ => {}
            }
        }
        if moving_dir && self.is_within(new_parent, ino) {
            return Err(Errno::EINVAL);
        }
        self.dir_entries_mut(parent)?.remove(name);
        self.dir_entries_mut(new_parent)?
            .insert(new_name.to_os_string(), ino);
        if let Ok(Body::Dir { parent: up, .. }) = self.inode_mut(ino).map(|i| &mut i.body) {
            *up = new_parent;
        }
        self.touch_dir(parent);
        self.touch_dir(new_parent);
        if let Ok(inode) = self.inode_mut(ino) {
            inode.ctime = SystemTime::now();
        }
        if let Some(target) = replaced {
            self.unlinked(target);
        }
        Ok(())
    }

    /// Whether `dir` is `ancestor` or below it in the current tree.
    fn is_within(&self, mut dir: u64, ancestor: u64) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            match self.inodes.get(&dir).map(|i| &i.body) {
                Some(Body::Dir { parent, .. }) if *parent != dir => dir = *parent,
                _ => return false,
            }
        }
    }

    /// Frees `ino` once nothing can reach it any more: no current entry, no durable entry (a cut
    /// could bring it back) and no open handle. A freed directory's durable entries no longer
    /// count for the inodes they name.
    fn collect(&mut self, ino: u64) {
        let mut pending = vec![ino];
        while let Some(ino) = pending.pop() {
            let free = self.inodes.get(&ino).is_some_and(|i| {
                ino != ROOT && i.links == 0 && i.durable_links == 0 && i.open == 0
            });
            if !free {
                continue;
            }
            if let Some(Inode {
                body: Body::Dir { durable, .. },
                ..
            }) = self.inodes.remove(&ino)
            {
                for child in durable.into_values() {
                    if let Some(inode) = self.inodes.get_mut(&child) {
                        inode.durable_links = inode.durable_links.saturating_sub(1);
                        pending.push(child);
                    }
                }
            }
        }
    }

    fn open(&mut self, ino: u64) -> Answer<u64> {
        self.inode_mut(ino)?.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, ino);
        Ok(fh)
    }

    fn release(&mut self, fh: u64) {
        if let Some(ino) = self.handles.remove(&fh) {
            if let Some(inode) = self.inodes.get_mut(&ino) {
                inode.open = inode.open.saturating_sub(1);
            }
            self.collect(ino);
        }
    }

    fn fsync_file(&mut self, ino: u64, datasync: bool) -> Answer<()> {
        match &mut self.inode_mut(ino)?.body {
            Body::File { current, durable } => *durable = current.clone(),
            Body::Dir { .. } => return self.fsync_dir(ino),
        }
        if datasync {
            self.stats.fdatasyncs += 1;
        } else {
            self.stats.fsyncs += 1;
        }
        Ok(())
    }

    fn fsync_dir(&mut self, ino: u64) -> Answer<()> {
        let (before, after) = match &mut self.inode_mut(ino)?.body {
            Body::Dir {
                current, durable, ..
            } => {
                let before = std::mem::replace(durable, current.clone());
                (before, current.clone())
            }
            Body::File { .. } => return Err(Errno::ENOTDIR),
        };
        self.stats.dir_syncs += 1;
        for child in after.values() {
            if let Some(inode) = self.inodes.get_mut(child) {
                inode.durable_links += 1;
            }
        }
        for child in before.values() {
            if let Some(inode) = self.inodes.get_mut(child) {
                inode.durable_links = inode.durable_links.saturating_sub(1);
            }
            self.collect(*child);
        }
        Ok(())
    }

    /// Replaces every inode by its durable state, keeping only what the durable entries reach
    /// from the root; see the module documentation.
    fn revert(&mut self) -> CutReport {
        let mut report = CutReport::default();
        let mut kept: HashMap<u64, Inode> = HashMap::new();
        // Durable entries not kept: (directory, name).
        let mut dropped: Vec<(u64, OsString)> = Vec::new();
        // (inode, its parent in the surviving tree, its name there)
        let mut walk = vec![(ROOT, ROOT, OsString::new())];
        while let Some((ino, parent, name)) = walk.pop() {
            let old = match self.inodes.get(&ino) {
                Some(old) if !kept.contains_key(&ino) => old,
                // Reachable twice, or (which the collection of inodes prevents) not held.
                _ => {
                    dropped.push((parent, name));
                    continue;
                }
            };
            let mut inode = old.clone();
            inode.open = 0;
            inode.links = 0;
            inode.durable_links = 0;
            match &mut inode.body {
                Body::File { current, durable } => {
                    if current != durable {
                        report.files_reverted += 1;
                        *current = durable.clone();
                    }
                }
                Body::Dir {
                    parent: up,
                    current,
                    durable,
                } => {
                    *up = parent;
                    if current != durable {
                        report.dirs_reverted += 1;
                        *current = durable.clone();
                    }
                    walk.extend(
                        durable
                            .iter()
                            .map(|(name, child)| (*child, ino, name.clone())),
                    );
                }
            }
            kept.insert(ino, inode);
        }
        for (dir, name) in dropped {
            if let Some(Inode {
                body: Body::Dir {
                    current, durable, ..
                },
                ..
            }) = kept.get_mut(&dir)
            {
                current.remove(&name);
                durable.remove(&name);
            }
        }
        // Count the links of the surviving tree, where current and durable entries agree.
        let children: Vec<u64> = kept
            .values()
            .filter_map(Inode::entries)
            .flat_map(|entries| entries.values().copied())
            .collect();
        for child in children {
            if let Some(inode) = kept.get_mut(&child) {
                inode.links += 1;
                inode.durable_links += 1;
            }
        }
        if let Some(root) = kept.get_mut(&ROOT) {
            root.links = 1;
            root.durable_links = 1;
        }
        report.inodes_kept = kept.len() as u64;
        report.inodes_lost = self.inodes.len().saturating_sub(kept.len()) as u64;
        self.inodes = kept;
        self.handles.clear();
        self.stats.cuts += 1;
        report
    }
}

fn perm_of(mode: u32) -> u16 {
    (mode & 0o7777) as u16
}

fn time_of(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// The FUSE side: each request locks the model, refuses with `EIO` after a cut, and answers.
struct PowerCutFilesystem {
    model: Arc<Mutex<Model>>,
    stall: Arc<Stall>,
    /// The mount this session serves; see [`Model::generation`].
    generation: u64,
}

impl PowerCutFilesystem {
    /// Runs `op` on the live model (`EIO` after a cut).
    fn with<T>(&self, op: impl FnOnce(&mut Model) -> Answer<T>) -> Answer<T> {
        let mut model = self.model.lock();
        model.live(self.generation)?;
        op(&mut model)
    }
}

/// Sends `answer` with `ok`, or its error.
macro_rules! answer {
    ($reply:expr, $answer:expr, |$value:pat_param| $ok:expr) => {
        match $answer {
            Ok($value) => $ok,
            Err(errno) => $reply.error(errno),
        }
    };
}

impl Filesystem for PowerCutFilesystem {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        answer!(reply, self.with(|m| m.lookup(parent.0, name)), |attr| reply
            .entry(&TTL, &attr, Generation(0)))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        answer!(reply, self.with(|m| m.attr(ino.0)), |attr| reply
            .attr(&TTL, &attr))
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let answer = self.with(|m| {
            if let Some(size) = size {
                m.file_mut(ino.0)?.set_size(size);
            }
            let inode = m.inode_mut(ino.0)?;
            let now = SystemTime::now();
            if let Some(mode) = mode {
                inode.perm = perm_of(mode);
            }
            if let Some(uid) = uid {
                inode.uid = uid;
            }
            if let Some(gid) = gid {
                inode.gid = gid;
            }
            if let Some(atime) = atime {
                inode.atime = time_of(atime);
            }
            if let Some(mtime) = mtime {
                inode.mtime = time_of(mtime);
            } else if size.is_some() {
                inode.mtime = now;
            }
            inode.ctime = now;
            m.attr(ino.0)
        });
        answer!(reply, answer, |attr| reply.attr(&TTL, &attr))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Only regular files are modelled.
            reply.error(Errno::EPERM);
            return;
        }
        let answer = self.with(|m| {
            let ino = m.create_file(parent.0, name, mode & !umask, req)?;
            m.attr(ino)
        });
        answer!(reply, answer, |attr| reply.entry(
            &TTL,
            &attr,
            Generation(0)
        ))
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let answer = self.with(|m| {
            let ino = m.mkdir(parent.0, name, mode & !umask, req)?;
            m.attr(ino)
        });
        answer!(reply, answer, |attr| reply.entry(
            &TTL,
            &attr,
            Generation(0)
        ))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(
            reply,
            self.with(|m| m.remove(parent.0, name, false)),
            |()| reply.ok()
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(reply, self.with(|m| m.remove(parent.0, name, true)), |()| {
            reply.ok()
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let answer = self.with(|m| m.rename(parent.0, name, newparent.0, newname, flags));
        answer!(reply, answer, |()| reply.ok())
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: no page cache between the process and the model.
        answer!(reply, self.with(|m| m.open(ino.0)), |fh| reply
            .opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let answer = self.with(|m| {
            // The kernel asks to create when its dentry is negative; another opener may have
            // created the name since, which O_EXCL refuses and a plain O_CREAT opens.
            let ino = match m.dir_entries(parent.0)?.get(name).copied() {
                Some(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(ino) => {
                    if flags & libc::O_TRUNC != 0 {
                        m.file_mut(ino)?.set_size(0);
                    }
                    ino
                }
                None => m.create_file(parent.0, name, mode & !umask, req)?,
            };
            let fh = m.open(ino)?;
            Ok((m.attr(ino)?, fh))
        });
        answer!(reply, answer, |(attr, fh)| reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO
        ))
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let answer = self.with(|m| match &m.inode(ino.0)?.body {
            Body::File { current, .. } => Ok(current.read(offset, size as usize)),
            Body::Dir { .. } => Err(Errno::EISDIR),
        });
        answer!(reply, answer, |data| reply.data(&data))
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let answer = self.with(|m| {
            m.file_mut(ino.0)?.write(offset, data);
            if let Ok(inode) = m.inode_mut(ino.0) {
                inode.mtime = SystemTime::now();
            }
            m.stats.writes += 1;
            m.stats.bytes_written += data.len() as u64;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        });
        answer!(reply, answer, |written| reply.written(written))
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        answer!(reply, self.with(|_| Ok(())), |()| reply.ok())
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // A handle of an older mount is gone with it.
        let _ = self.with(|m| {
            m.release(fh.0);
            Ok(())
        });
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stall.pass();
        answer!(reply, self.with(|m| m.fsync_file(ino.0, datasync)), |()| {
            reply.ok()
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let answer = self.with(|m| {
            m.dir_entries(ino.0)?;
            m.open(ino.0)
        });
        answer!(reply, answer, |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()))
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let answer = self.with(|m| {
            let inode = m.inode(ino.0)?;
            let Body::Dir {
                parent, current, ..
            } = &inode.body
            else {
                return Err(Errno::ENOTDIR);
            };
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (*parent, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in current {
                let kind = match m.inodes.get(child).map(|i| &i.body) {
                    Some(Body::Dir { .. }) => FileType::Directory,
                    _ => FileType::RegularFile,
                };
                entries.push((*child, kind, name.clone()));
            }
            Ok(entries)
        });
        answer!(reply, answer, |entries| {
            // The offset of an entry is its index + 1: the kernel passes back the last one it
            // took to continue a listing.
            for (index, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*child), index as u64 + 1, *kind, name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // A handle of an older mount is gone with it.
        let _ = self.with(|m| {
            m.release(fh.0);
            Ok(())
        });
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stall.pass();
        answer!(reply, self.with(|m| m.fsync_dir(ino.0)), |()| reply.ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Memory is the limit; report plenty of room (16 TiB, a billion inodes).
        let answer = self.with(|m| Ok(m.inodes.len() as u64));
        let (blocks, files) = (1u64 << 32, 1u64 << 30);
        answer!(reply, answer, |used| reply.statfs(
            blocks,
            blocks,
            blocks,
            files,
            files - used,
            BLOCK,
            255,
            BLOCK
        ))
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        answer!(reply, self.with(|m| m.inode(ino.0).map(|_| ())), |()| reply
            .ok())
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let answer = self.with(|m| {
            let content = m.file_mut(ino.0)?;
            match mode {
                0 => {
                    let end = offset.saturating_add(length);
                    if end > content.size {
                        content.set_size(end);
                    }
                    Ok(())
                }
                FALLOC_FL_KEEP_SIZE => Ok(()),
                _ => Err(Errno::EOPNOTSUPP),
            }
        });
        answer!(reply, answer, |()| reply.ok())
    }
}
