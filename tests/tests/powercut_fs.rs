//! The power-cut filesystem ([`PowerCutFs`]) keeps exactly what was made durable: each test does
//! real system calls on the mounted filesystem, cuts the power, remounts and looks at what
//! survived. Every rule of the model is checked both ways (without the fsync it is lost, with it
//! it survives), so a model that kept too much or too little fails here.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use tally_tests::powercut::CutReport;
use tally_tests::{PowerCutFs, TempMount};

/// A mounted filesystem in a fresh temporary directory.
struct Mounted(TempMount);

impl Mounted {
    fn new() -> Mounted {
        Mounted(TempMount::mount())
    }

    fn fs(&self) -> &PowerCutFs {
        &self.0.fs
    }

    fn fs_mut(&mut self) -> &mut PowerCutFs {
        &mut self.0.fs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.fs().path().join(name)
    }

    fn cut(&mut self) -> CutReport {
        self.fs_mut()
            .power_cut_and_remount()
            .unwrap_or_else(|e| panic!("power cut: {e}"))
    }
}

fn write_new(path: &Path, data: &[u8]) -> File {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    file
}

fn fsync_dir(path: &Path) {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .unwrap_or_else(|e| panic!("fsync of directory {}: {e}", path.display()));
}

fn read(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(data) => Some(data),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("read_dir entry: {e}"))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn a_write_without_fsync_is_lost_and_an_fsynced_one_survives() {
    let mut m = Mounted::new();
    let synced = m.path("synced");
    let unsynced = m.path("unsynced");
    write_new(&synced, b"durable")
        .sync_all()
        .unwrap_or_else(|e| panic!("fsync: {e}"));
    let _ = write_new(&unsynced, b"volatile");
    fsync_dir(m.fs().path());
    // Before the cut everything reads back.
    assert_eq!(read(&synced).as_deref(), Some(&b"durable"[..]));
    assert_eq!(read(&unsynced).as_deref(), Some(&b"volatile"[..]));

    let report = m.cut();
    assert_eq!(read(&synced).as_deref(), Some(&b"durable"[..]));
    // The entry was made durable by the directory fsync, the data never was.
    assert_eq!(read(&unsynced).as_deref(), Some(&b""[..]));
    assert_eq!(report.files_reverted, 1, "{report:?}");
}

#[test]
fn an_append_after_the_last_fsync_is_cut_off_and_fdatasync_counts_too() {
    let mut m = Mounted::new();
    let path = m.path("log");
    let mut file = write_new(&path, b"one,");
    file.sync_data()
        .unwrap_or_else(|e| panic!("fdatasync: {e}"));
    fsync_dir(m.fs().path());
    file.write_all(b"two,").unwrap_or_else(|e| panic!("{e}"));
    file.sync_data()
        .unwrap_or_else(|e| panic!("fdatasync: {e}"));
    file.write_all(b"three").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read(&path).as_deref(), Some(&b"one,two,three"[..]));
    drop(file);

    m.cut();
    assert_eq!(read(&path).as_deref(), Some(&b"one,two,"[..]));
    let stats = m.fs().stats();
    assert_eq!(stats.fdatasyncs, 2, "{stats:?}");
    assert_eq!(stats.fsyncs, 0, "{stats:?}");
    assert_eq!(stats.dir_syncs, 1, "{stats:?}");
    assert_eq!(stats.cuts, 1, "{stats:?}");
}

#[test]
fn a_created_and_fsynced_file_disappears_when_its_directory_was_not_fsynced() {
    let mut m = Mounted::new();
    let path = m.path("new");
    write_new(&path, b"data")
        .sync_all()
        .unwrap_or_else(|e| panic!("fsync: {e}"));
    let report = m.cut();
    assert_eq!(read(&path), None, "the entry was never made durable");
    assert!(names(m.fs().path()).is_empty());
    assert_eq!(report.inodes_lost, 1, "{report:?}");

    // The same steps with the directory fsync keep it.
    write_new(&path, b"data")
        .sync_all()
        .unwrap_or_else(|e| panic!("fsync: {e}"));
    fsync_dir(m.fs().path());
    m.cut();
    assert_eq!(read(&path).as_deref(), Some(&b"data"[..]));
}

#[test]
fn a_rename_without_a_directory_fsync_is_undone_and_with_one_it_stays() {
    let mut m = Mounted::new();
    let (tmp, current) = (m.path("CURRENT.tmp"), m.path("CURRENT"));
    write_new(&current, b"MANIFEST-1")
        .sync_all()
        .unwrap_or_else(|e| panic!("{e}"));
    write_new(&tmp, b"MANIFEST-2")
        .sync_all()
        .unwrap_or_else(|e| panic!("{e}"));
    fsync_dir(m.fs().path());
    // Replacing rename, the way RocksDB installs CURRENT.
    fs::rename(&tmp, &current).unwrap_or_else(|e| panic!("rename: {e}"));
    assert_eq!(read(&current).as_deref(), Some(&b"MANIFEST-2"[..]));
    assert_eq!(read(&tmp), None);

    m.cut();
    assert_eq!(
        read(&current).as_deref(),
        Some(&b"MANIFEST-1"[..]),
        "the replaced file comes back"
    );
    assert_eq!(read(&tmp).as_deref(), Some(&b"MANIFEST-2"[..]));

    fs::rename(&tmp, &current).unwrap_or_else(|e| panic!("rename: {e}"));
    fsync_dir(m.fs().path());
    m.cut();
    assert_eq!(read(&current).as_deref(), Some(&b"MANIFEST-2"[..]));
    assert_eq!(read(&tmp), None);
    assert_eq!(names(m.fs().path()), ["CURRENT"]);
}

#[test]
fn an_unlink_without_a_directory_fsync_is_undone() {
    let mut m = Mounted::new();
    let path = m.path("old.log");
    write_new(&path, b"kept")
        .sync_all()
        .unwrap_or_else(|e| panic!("{e}"));
    fsync_dir(m.fs().path());
    fs::remove_file(&path).unwrap_or_else(|e| panic!("unlink: {e}"));
    assert_eq!(read(&path), None);
    m.cut();
    assert_eq!(read(&path).as_deref(), Some(&b"kept"[..]));

    fs::remove_file(&path).unwrap_or_else(|e| panic!("unlink: {e}"));
    fsync_dir(m.fs().path());
    m.cut();
    assert_eq!(read(&path), None);
}

#[test]
fn directories_need_their_parent_fsynced_and_their_own_entries_fsynced() {
    let mut m = Mounted::new();
    let dir = m.path("data");
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let file = dir.join("000001.log");
    write_new(&file, b"wal")
        .sync_all()
        .unwrap_or_else(|e| panic!("{e}"));
    fsync_dir(&dir);
    m.cut();
    assert!(
        !dir.exists(),
        "mkdir without an fsync of the parent is lost"
    );

    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    fsync_dir(m.fs().path());
    write_new(&file, b"wal")
        .sync_all()
        .unwrap_or_else(|e| panic!("{e}"));
    m.cut();
    assert!(dir.is_dir());
    assert!(
        names(&dir).is_empty(),
        "the file's entry was not made durable"
    );

    write_new(&file, b"wal")
        .sync_all()
        .unwrap_or_else(|e| panic!("{e}"));
    fsync_dir(&dir);
    m.cut();
    assert_eq!(read(&file).as_deref(), Some(&b"wal"[..]));
    // rmdir of a non-empty directory fails; of an empty one, it is undone without an fsync.
    assert!(fs::remove_dir(&dir).is_err());
    fs::remove_file(&file).unwrap_or_else(|e| panic!("{e}"));
    fs::remove_dir(&dir).unwrap_or_else(|e| panic!("rmdir: {e}"));
    m.cut();
    assert_eq!(read(&file).as_deref(), Some(&b"wal"[..]));
}

#[test]
fn truncate_and_writes_at_offsets_follow_the_same_rules() {
    let mut m = Mounted::new();
    let path = m.path("sst");
    // Crosses the model's 64 KiB chunks.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let file = write_new(&path, &big);
    file.sync_all().unwrap_or_else(|e| panic!("{e}"));
    fsync_dir(m.fs().path());

    file.write_all_at(b"XYZ", 70_000)
        .unwrap_or_else(|e| panic!("pwrite: {e}"));
    file.set_len(100_000)
        .unwrap_or_else(|e| panic!("ftruncate: {e}"));
    file.set_len(150_000)
        .unwrap_or_else(|e| panic!("ftruncate: {e}"));
    let mut expected = big[..100_000].to_vec();
    expected[70_000..70_003].copy_from_slice(b"XYZ");
    expected.resize(150_000, 0);
    assert_eq!(
        read(&path),
        Some(expected),
        "a shrunk and regrown file reads zeros past the cut"
    );
    let mut reader = File::open(&path).unwrap_or_else(|e| panic!("{e}"));
    reader
        .seek(SeekFrom::Start(69_999))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut four = [0u8; 4];
    reader
        .read_exact(&mut four)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&four, &[big[69_999], b'X', b'Y', b'Z']);
    drop(reader);
    drop(file);

    m.cut();
    assert_eq!(
        read(&path),
        Some(big.clone()),
        "unsynced pwrite and truncates are undone"
    );

    // truncate(2) by path, then fsync: durable.
    let file = OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{e}"));
    file.set_len(10).unwrap_or_else(|e| panic!("{e}"));
    file.sync_all().unwrap_or_else(|e| panic!("{e}"));
    drop(file);
    m.cut();
    assert_eq!(read(&path).as_deref(), Some(&big[..10]));
}

#[test]
fn fallocate_extends_or_keeps_the_size_and_other_modes_are_refused() {
    let m = Mounted::new();
    let path = m.path("prealloc");
    let file = write_new(&path, b"abc");
    let fd = file.as_raw_fd();
    // SAFETY: fallocate(2) on an open descriptor owned by `file`.
    let keep = unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20) };
    assert_eq!(keep, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(read(&path).as_deref(), Some(&b"abc"[..]));
    // SAFETY: as above.
    let extend = unsafe { libc::fallocate(fd, 0, 0, 10) };
    assert_eq!(extend, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(read(&path).as_deref(), Some(&b"abc\0\0\0\0\0\0\0"[..]));
    // SAFETY: as above.
    let punch = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            2,
        )
    };
    assert_eq!(punch, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
}

#[test]
fn an_unlinked_open_file_stays_usable_and_nothing_survives_that_was_not_synced() {
    let mut m = Mounted::new();
    let path = m.path("scratch");
    let mut file = write_new(&path, b"12345");
    fs::remove_file(&path).unwrap_or_else(|e| panic!("{e}"));
    file.write_all(b"678").unwrap_or_else(|e| panic!("{e}"));
    let mut back = Vec::new();
    file.seek(SeekFrom::Start(0))
        .unwrap_or_else(|e| panic!("{e}"));
    // The descriptor was opened write-only by File::create; read through /proc instead.
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    File::open(&proc_path)
        .and_then(|mut f| f.read_to_end(&mut back))
        .unwrap_or_else(|e| panic!("reading the unlinked file: {e}"));
    assert_eq!(back, b"12345678");
    drop(file);
    let report = m.cut();
    assert!(names(m.fs().path()).is_empty());
    assert_eq!(report.inodes_kept, 1, "only the root: {report:?}");
}

#[test]
fn after_a_cut_every_request_fails_until_the_remount() {
    let mut m = Mounted::new();
    let path = m.path("f");
    let mut file = write_new(&path, b"x");
    fsync_dir(m.fs().path());
    m.fs_mut()
        .power_cut()
        .unwrap_or_else(|e| panic!("power cut: {e}"));
    assert!(!m.fs().is_mounted());
    // The descriptor opened before the cut now points at a dead connection.
    assert!(file.write_all(b"y").is_err() || file.sync_all().is_err());
    drop(file);
    // The mount point is the empty directory underneath again.
    assert!(names(m.fs().path()).is_empty());
    m.fs_mut()
        .remount()
        .unwrap_or_else(|e| panic!("remount: {e}"));
    assert_eq!(read(&path).as_deref(), Some(&b""[..]));
}
