//! The checkpoint volume through a real FUSE mount (needs root and /dev/fuse, as in
//! CI): the POSIX a training framework uses, byte-exact, and the commit rules as the
//! frameworks' write patterns trigger them. The lake side is in `checkpoint_sync.rs`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tidepool_csi::checkpoint::commit::CommitRule;
use tidepool_csi::checkpoint::journal::CommitState;
use tidepool_csi::checkpoint::store::{Committed, Store, VolumeConfig, VolumeLayout};
use tidepool_csi::checkpoint::sync::{SyncConfig, Syncer};
use tidepool_csi::checkpoint::tree::{CheckpointTree, OpenWriters, TreeConfig};
use tidepool_csi::fs::{Mount, MountStats};
use tidepool_csi::fuse::{MountOptions, SessionConfig};
use tidepool_csi::testing::{pattern, within};

struct Volume {
    _pool: tempfile::TempDir,
    mnt: tempfile::TempDir,
    layout: VolumeLayout,
    store: Arc<Store>,
    tree: Arc<CheckpointTree>,
    mount: Option<Mount>,
}

impl Volume {
    fn mount(rule: CommitRule, passthrough: bool) -> Volume {
        Self::mount_in(tempfile::tempdir().unwrap(), rule, passthrough)
    }

    fn mount_in(pool: tempfile::TempDir, rule: CommitRule, passthrough: bool) -> Volume {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mnt = tempfile::tempdir().unwrap();
        let layout = VolumeLayout::for_url(pool.path(), "http://127.0.0.1:1/a/c/run");
        layout
            .create(&VolumeConfig {
                url: "http://127.0.0.1:1/a/c/run/".into(),
                node: "n1".into(),
                keep_local: None,
                keep_remote: None,
                nodes: Some(1),
                owner_uid: None,
            })
            .unwrap();
        let store = Arc::new(Store::open(layout.clone(), rule).unwrap());
        let tree = Arc::new(
            CheckpointTree::new(&layout.tree(), TreeConfig::default(), store.clone()).unwrap(),
        );
        store.attach(Arc::downgrade(&tree) as std::sync::Weak<dyn OpenWriters>);
        let mount = Mount::serve(
            tree.clone(),
            Arc::new(MountStats::default()),
            mnt.path(),
            &MountOptions {
                fsname: "test".into(),
                subtype: "tidepool".into(),
                read_only: false,
                allow_other: true,
                default_permissions: true,
            },
            SessionConfig::read_write(4, passthrough),
        )
        .expect("mount (needs root and /dev/fuse)");
        Volume {
            _pool: pool,
            mnt,
            layout,
            store,
            tree,
            mount: Some(mount),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    fn backing(&self, rel: &str) -> PathBuf {
        self.layout.tree().join(rel)
    }

    /// The commits made once the kernel's RELEASEs have arrived (they are sent after
    /// close(2) returns), waiting up to 5 s for at least one.
    fn commits(&self) -> Vec<Committed> {
        let mut out = Vec::new();
        within(Duration::from_secs(5), || {
            out.extend(self.store.tick().into_iter().map(|r| r.unwrap()));
            (!out.is_empty()).then_some(())
        });
        out
    }

    /// Asserts that nothing commits, after giving pending RELEASEs time to arrive.
    fn assert_no_commit(&self, why: &str) {
        std::thread::sleep(Duration::from_millis(300));
        let c: Vec<_> = self.store.tick().into_iter().map(|r| r.unwrap()).collect();
        assert!(c.is_empty(), "{why}: {c:?}");
    }

    /// The files of commit `seq` as the journal lists them: (path, size).
    fn commit_files(&self, seq: u64) -> Vec<(String, u64)> {
        let mut r = self.store.journal().read_commit(seq).unwrap();
        let mut v = Vec::new();
        while let Some(f) = r.next_file().unwrap() {
            v.push((f.path, f.size));
        }
        v.sort();
        v
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn posix_semantics(passthrough: bool) {
    let v = Volume::mount(CommitRule::default(), passthrough);
    fs::create_dir(v.p("step-1")).unwrap();
    // Write at any offset, read back, sparse holes read as zeros.
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(v.p("step-1/a.bin"))
        .unwrap();
    let data = pattern(1, 3 << 20);
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(b"XYZ", 5 << 20).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == data, "bytes read back through the volume differ");
    assert_eq!(f.metadata().unwrap().len(), (5 << 20) + 3);
    let mut hole = vec![1u8; 4096];
    f.read_exact_at(&mut hole, 4 << 20).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "a hole reads as zeros");
    // fsync and ftruncate.
    f.sync_all().unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    assert_eq!(fs::metadata(v.p("step-1/a.bin")).unwrap().len(), 1 << 20);
    assert_eq!(
        fs::read(v.backing("step-1/a.bin")).unwrap(),
        data[..1 << 20],
        "the backing file holds the same bytes"
    );
    // truncate by path, O_TRUNC, O_APPEND.
    // SAFETY: a NUL-terminated path.
    assert_eq!(
        unsafe { libc::truncate(c(&v.p("step-1/a.bin")).as_ptr(), 10) },
        0
    );
    assert_eq!(fs::read(v.p("step-1/a.bin")).unwrap(), data[..10]);
    fs::write(v.p("step-1/log.txt"), b"one\n").unwrap();
    let mut app = OpenOptions::new()
        .append(true)
        .open(v.p("step-1/log.txt"))
        .unwrap();
    app.write_all(b"two\n").unwrap();
    drop(app);
    assert_eq!(fs::read(v.p("step-1/log.txt")).unwrap(), b"one\ntwo\n");
    let mut t = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(v.p("step-1/log.txt"))
        .unwrap();
    t.write_all(b"3").unwrap();
    drop(t);
    assert_eq!(fs::read(v.p("step-1/log.txt")).unwrap(), b"3");
    // O_EXCL on an existing file.
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(v.p("step-1/log.txt"))
        ),
        libc::EEXIST
    );
    // Rename replacing an existing file; rename of a directory; unlink; rmdir.
    fs::write(v.p("step-1/new"), b"new").unwrap();
    fs::rename(v.p("step-1/new"), v.p("step-1/log.txt")).unwrap();
    assert_eq!(fs::read(v.p("step-1/log.txt")).unwrap(), b"new");
    assert!(!v.p("step-1/new").exists());
    fs::create_dir_all(v.p("step-1/d1/d2")).unwrap();
    fs::write(v.p("step-1/d1/d2/f"), b"deep").unwrap();
    fs::rename(v.p("step-1/d1"), v.p("step-1/moved")).unwrap();
    assert_eq!(fs::read(v.p("step-1/moved/d2/f")).unwrap(), b"deep");
    assert_eq!(
        errno_of(fs::remove_dir(v.p("step-1/moved"))),
        libc::ENOTEMPTY
    );
    fs::remove_file(v.p("step-1/moved/d2/f")).unwrap();
    fs::remove_dir(v.p("step-1/moved/d2")).unwrap();
    assert!(!v.backing("step-1/moved/d2").exists());
    // A file opened before its directory was renamed keeps working and lands in place.
    fs::create_dir(v.p("tmp-2")).unwrap();
    let mut open_before = File::create(v.p("tmp-2/w")).unwrap();
    fs::rename(v.p("tmp-2"), v.p("step-2")).unwrap();
    open_before.write_all(b"after rename").unwrap();
    fs::write(v.p("step-2/.metadata"), b"m").unwrap();
    v.assert_no_commit("step-2 has a file open for writing (opened before the rename)");
    drop(open_before);
    assert_eq!(fs::read(v.p("step-2/w")).unwrap(), b"after rename");
    let commits = v.commits();
    assert!(
        commits.iter().any(|x| x.step == "step-2"),
        "the close after the rename lets step-2 commit: {commits:?}"
    );
    // A directory lists `.` and `..` too (as `ls -a` shows them), at the root and in a
    // step.
    let raw = tidepool_csi::testing::raw_dir_names(&v.p("step-2")).unwrap();
    assert!(raw.starts_with(&[".".into(), "..".into()]), "{raw:?}");
    let raw = tidepool_csi::testing::raw_dir_names(v.mnt.path()).unwrap();
    assert!(raw.starts_with(&[".".into(), "..".into()]), "{raw:?}");
    // Inode numbers are the backing files', the same in stat and readdir (tar and du
    // rely on them).
    {
        use std::os::unix::fs::DirEntryExt;
        let ino = fs::metadata(v.p("step-2/w")).unwrap().ino();
        assert_eq!(ino, fs::metadata(v.backing("step-2/w")).unwrap().ino());
        let listed = fs::read_dir(v.p("step-2"))
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == "w")
            .unwrap()
            .ino();
        assert_eq!(listed, ino);
    }
    // chmod and utimes are kept.
    fs::set_permissions(v.p("step-2/w"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(v.p("step-2/w")).unwrap().mode() & 0o777, 0o600);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(v.p("step-2/w"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(
        fs::metadata(v.p("step-2/w")).unwrap().mtime(),
        1_000_000_000
    );
    // Readdir lists what is there (more entries than one reply holds).
    fs::create_dir(v.p("step-3")).unwrap();
    for i in 0..300 {
        fs::write(
            v.p(&format!("step-3/file-with-a-long-name-{i:04}")),
            [i as u8],
        )
        .unwrap();
    }
    let mut names: Vec<_> = fs::read_dir(v.p("step-3"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 300);
    assert_eq!(names[299], "file-with-a-long-name-0299");
    // Refused with clear errnos: hard links, symlinks, xattrs.
    assert_eq!(
        errno_of(fs::hard_link(v.p("step-2/w"), v.p("step-2/link"))),
        libc::EPERM
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("w", v.p("step-2/sym"))),
        libc::EPERM
    );
    let name = CString::new("user.x").unwrap();
    // SAFETY: NUL-terminated path and name, a 1-byte value.
    let rc = unsafe {
        libc::setxattr(
            c(&v.p("step-2/w")).as_ptr(),
            name.as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    // A large sequential write through the volume, read back through it.
    let big = pattern(9, 64 << 20);
    let mut w = File::create(v.p("step-3/big")).unwrap();
    for chunk in big.chunks(1 << 20) {
        w.write_all(chunk).unwrap();
    }
    drop(w);
    let mut r = File::open(v.p("step-3/big")).unwrap();
    r.seek(SeekFrom::Start(0)).unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert!(got == big, "64 MiB read back differ");
    // One file open twice (and for reading and writing at once), as a framework's
    // loader and a checkpoint thread may.
    let a = OpenOptions::new()
        .read(true)
        .write(true)
        .open(v.p("step-3/big"))
        .unwrap();
    let b = File::open(v.p("step-3/big")).unwrap();
    a.write_all_at(b"twice", 0).unwrap();
    let mut five = [0u8; 5];
    b.read_exact_at(&mut five, 0).unwrap();
    assert_eq!(
        &five, b"twice",
        "the second open sees the first one's write"
    );
    drop((a, b));
    // O_DIRECT with aligned buffers, as some checkpoint writers use.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
        // SAFETY: a non-zero size; freed below with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        // SAFETY: ptr is valid for 1 MiB and initialised.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 1 << 20) };
        buf.copy_from_slice(&pattern(11, 1 << 20));
        let d = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(v.p("step-3/direct"))
            .unwrap();
        d.write_all_at(buf, 0).unwrap();
        buf.fill(0);
        d.read_exact_at(buf, 0).unwrap();
        assert!(
            buf == &pattern(11, 1 << 20)[..],
            "O_DIRECT bytes read back differ"
        );
        drop(d);
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
        assert_eq!(
            fs::read(v.p("step-3/direct")).unwrap(),
            pattern(11, 1 << 20)
        );
    }
    // Another user (a pod running as uid 1000) creates steps, with its own umask.
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            "umask 0 && mkdir step-9 && touch step-9/f && mkdir step-9/d",
        ])
        .current_dir(v.p(""))
        .uid(1000)
        .gid(1000)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uid 1000: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = fs::metadata(v.p("step-9/f")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (1000, 1000, 0o666),
        "owner and the caller's umask"
    );
    assert_eq!(fs::metadata(v.p("step-9/d")).unwrap().mode() & 0o777, 0o777);
    // Behind the mount, on the host, the volume's directory is the server's alone: that
    // user can neither read what it wrote there nor swap anything into the tree (the
    // pool's own directories opened up to show it is the volume's that closes).
    assert_eq!(
        fs::metadata(&v.layout.dir).unwrap().mode() & 0o777,
        0o700,
        "{}",
        v.layout.dir.display()
    );
    let mut up = v.layout.dir.parent();
    while let Some(d) = up {
        if d == Path::new("/") || d == std::env::temp_dir() {
            break;
        }
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        up = d.parent();
    }
    let behind = v.layout.tree().join("step-9");
    for cmd in [
        format!("cat {}/f", behind.display()),
        format!("ln -s /etc/shadow {}/link", behind.display()),
    ] {
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .uid(1000)
            .gid(1000)
            .output()
            .unwrap();
        assert!(!out.status.success(), "uid 1000 on the host: {cmd}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // statfs answers with the pool's file system.
    let st = nix_statfs(&v.p(""));
    assert!(st > 0, "statfs reports blocks");
    if passthrough && kernel_at_least(6, 9) {
        assert!(
            v.tree.kernel_passthrough(),
            "Linux 6.9+ offers passthrough; the volume did not take it"
        );
    }
    if passthrough && v.tree.kernel_passthrough() {
        assert!(
            v.tree.passthrough_opens() > 0,
            "the kernel offers passthrough and no open used it"
        );
    }
    if !passthrough {
        assert_eq!(v.tree.passthrough_opens(), 0);
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let r = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = r
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

fn nix_statfs(p: &Path) -> u64 {
    // SAFETY: zeroed statvfs is a valid out-buffer; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(c(p).as_ptr(), &mut s) }, 0);
    s.f_blocks
}

#[test]
fn posix_as_frameworks_use_it_with_passthrough() {
    posix_semantics(true);
}

#[test]
fn posix_as_frameworks_use_it_without_passthrough() {
    posix_semantics(false);
}

#[test]
fn the_dcp_pattern_commits_when_the_metadata_appears_and_every_file_is_closed() {
    let v = Volume::mount(CommitRule::default(), true);
    fs::create_dir(v.p("step-100")).unwrap();
    let mut rank0 = File::create(v.p("step-100/__0_0.distcp")).unwrap();
    let mut rank1 = File::create(v.p("step-100/__1_0.distcp")).unwrap();
    rank0.write_all(&pattern(1, 1 << 20)).unwrap();
    rank1.write_all(&pattern(2, 1 << 20)).unwrap();
    drop(rank0);
    // DCP writes the metadata to a temporary name and renames it into place.
    fs::write(v.p("step-100/.metadata.tmp"), b"meta").unwrap();
    fs::rename(v.p("step-100/.metadata.tmp"), v.p("step-100/.metadata")).unwrap();
    v.assert_no_commit("rank 1's file is still open: no commit");
    rank1.write_all(b"tail").unwrap();
    drop(rank1);
    let c = v.commits();
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].step, "step-100");
    assert_eq!(
        v.commit_files(c[0].seq),
        vec![
            (".metadata".into(), 4),
            ("__0_0.distcp".into(), 1 << 20),
            ("__1_0.distcp".into(), (1 << 20) + 4)
        ]
    );
    // The staged links hold the committed bytes even after the job deletes the step.
    fs::remove_dir_all(v.p("step-100")).unwrap();
    let staged = v.layout.staged(c[0].seq);
    assert_eq!(
        fs::read(staged.join("__0_0.distcp")).unwrap(),
        pattern(1, 1 << 20)
    );
    assert_eq!(v.store.journal().state(c[0].seq), CommitState::Pending);
    v.assert_no_commit("fires once");
}

#[test]
fn the_orbax_pattern_commits_on_the_rename_of_the_temporary_directory() {
    let v = Volume::mount(CommitRule::default(), true);
    let tmp = "10.orbax-checkpoint-tmp-1733300000";
    fs::create_dir_all(v.p(&format!("{tmp}/state"))).unwrap();
    fs::write(v.p(&format!("{tmp}/state/array.zarr")), pattern(3, 300_000)).unwrap();
    fs::write(v.p(&format!("{tmp}/commit_success.txt")), b"ok").unwrap();
    v.assert_no_commit("a temporary directory never commits");
    fs::rename(v.p(tmp), v.p("10")).unwrap();
    let c = v.commits();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].step, "10");
    assert_eq!(c[0].files, 2);
    assert!(c[0].reason.contains("renamed"), "{}", c[0].reason);
    assert_eq!(
        v.commit_files(c[0].seq)[1],
        ("state/array.zarr".into(), 300_000)
    );
}

#[test]
fn a_finished_step_the_job_removes_before_any_tick_is_committed_first_and_whole() {
    // No ticker runs here: only the removal can commit the step. The job closes its
    // files, renames the marker into place and deletes the step at once (a framework
    // rotating away a step right after saving it), before the kernel's RELEASEs may
    // even have arrived.
    let v = Volume::mount(CommitRule::default(), true);
    fs::create_dir(v.p("step-7")).unwrap();
    fs::write(v.p("step-7/__0_0.distcp"), pattern(7, 300_000)).unwrap();
    fs::write(v.p("step-7/__1_0.distcp"), pattern(8, 1 << 20)).unwrap();
    fs::write(v.p("step-7/.metadata.tmp"), b"meta").unwrap();
    fs::rename(v.p("step-7/.metadata.tmp"), v.p("step-7/.metadata")).unwrap();
    fs::remove_dir_all(v.p("step-7")).unwrap();
    let seqs = v.store.journal().seqs().unwrap();
    assert_eq!(
        seqs.len(),
        1,
        "the removal committed the step once: {seqs:?}"
    );
    assert_eq!(
        v.commit_files(seqs[0]),
        vec![
            (".metadata".into(), 4),
            ("__0_0.distcp".into(), 300_000),
            ("__1_0.distcp".into(), 1 << 20)
        ],
        "the whole step, as it was before the removal"
    );
    let staged = v.layout.staged(seqs[0]);
    assert_eq!(
        fs::read(staged.join("__1_0.distcp")).unwrap(),
        pattern(8, 1 << 20)
    );
    assert_eq!(v.store.journal().state(seqs[0]), CommitState::Pending);
    v.assert_no_commit("committed once, nothing left to commit");

    // A file removed while another of the step's files is still open for writing:
    // the step is not finished, and what is left of it is never committed as it.
    fs::create_dir(v.p("step-8")).unwrap();
    let mut open = File::create(v.p("step-8/__0_0.distcp")).unwrap();
    open.write_all(&pattern(9, 4096)).unwrap();
    fs::write(v.p("step-8/__1_0.distcp"), pattern(10, 4096)).unwrap();
    fs::write(v.p("step-8/.metadata"), b"meta").unwrap();
    fs::remove_file(v.p("step-8/__1_0.distcp")).unwrap();
    drop(open);
    v.assert_no_commit("a step that lost a file before its commit is not committed");
    assert_eq!(v.store.journal().seqs().unwrap(), seqs);
    // Saved again, it commits by its marker as usual.
    fs::write(v.p("step-8/__1_0.distcp"), pattern(10, 4096)).unwrap();
    fs::write(v.p("step-8/.metadata"), b"meta2").unwrap();
    let c = v.commits();
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].step, "step-8");
    assert_eq!(c[0].files, 3);
}

#[test]
fn without_a_marker_a_step_commits_only_by_quiescence_when_asked() {
    let v = Volume::mount(CommitRule::default(), true);
    fs::create_dir(v.p("step-5")).unwrap();
    fs::write(v.p("step-5/model.pt"), b"weights").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    v.assert_no_commit("no rule fired");
    drop(v);

    let v = Volume::mount(
        CommitRule {
            quiescence: Some(Duration::from_secs(1)),
            ..CommitRule::default()
        },
        true,
    );
    fs::create_dir(v.p("step-6")).unwrap();
    let mut f = File::create(v.p("step-6/model.pt")).unwrap();
    f.write_all(b"w").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    v.assert_no_commit("an open file is never quiet");
    drop(f);
    v.assert_no_commit("not quiet long enough yet");
    std::thread::sleep(Duration::from_millis(1000));
    let c = v.commits();
    assert_eq!(c.len(), 1);
    assert!(c[0].reason.starts_with("quiet"), "{}", c[0].reason);
}

#[test]
fn a_volume_remounted_after_a_crash_commits_a_step_whose_marker_was_written() {
    let v = Volume::mount(CommitRule::default(), true);
    fs::create_dir(v.p("step-7")).unwrap();
    fs::write(v.p("step-7/a"), b"a").unwrap();
    // As if the process died right after the marker was written: the store never
    // ticked.
    fs::write(v.backing("step-7/.metadata"), b"m").unwrap();
    let layout = v.layout.clone();
    let store = Store::open(layout, CommitRule::default()).unwrap();
    let c: Vec<_> = store.tick().into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(c.len(), 1, "the marker found at start commits");
    // And a committed step is not committed again at the next start.
    let again = Store::open(v.layout.clone(), CommitRule::default()).unwrap();
    assert!(again.tick().is_empty());
}

/// A small tmpfs for the pool, detached on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let d = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs (needs root)");
        SmallDisk(d)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_pool_gives_the_writer_enospc_and_loses_nothing_committed() {
    let disk = SmallDisk::new("24m");
    let pool = tempfile::tempdir_in(disk.0.path()).unwrap();
    let v = Volume::mount_in(pool, CommitRule::default(), true);
    // The sync, uploading to an in-memory lake (the Azurite side is checkpoint_sync.rs).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lake: Arc<dyn tidepool_csi::lake::Lake> =
        Arc::new(tidepool_csi::lake::memory::MemoryLake::new());
    let mut sync = rt
        .block_on(Syncer::start(
            lake.clone(),
            v.layout.clone(),
            "run/",
            SyncConfig::default(),
        ))
        .unwrap();
    fs::create_dir(v.p("step-1")).unwrap();
    let committed = pattern(1, 6 << 20);
    fs::write(v.p("step-1/w.bin"), &committed).unwrap();
    fs::write(v.p("step-1/.metadata"), b"m").unwrap();
    let c = v.commits();
    assert_eq!(c.len(), 1);
    // The next step does not fit.
    fs::create_dir(v.p("step-2")).unwrap();
    let mut f = File::create(v.p("step-2/w.bin")).unwrap();
    let mut err = None;
    for chunk in pattern(2, 32 << 20).chunks(1 << 20) {
        if let Err(e) = f.write_all(chunk).and_then(|()| f.sync_all()) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("writing 32 MiB into a 24 MiB pool fails");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    // What committed is intact, in the tree and in the staged copy the sync reads.
    assert!(fs::read(v.p("step-1/w.bin")).unwrap() == committed);
    assert!(fs::read(v.layout.staged(c[0].seq).join("w.bin")).unwrap() == committed);
    // The sync cannot record its progress on the full disk: the pass fails in words.
    let e = rt.block_on(sync.pass()).unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    // Space freed: writing works again, and the sync catches up.
    fs::remove_file(v.p("step-2/w.bin")).unwrap();
    fs::write(v.p("step-2/w.bin"), pattern(3, 4 << 20)).unwrap();
    assert!(fs::read(v.p("step-2/w.bin")).unwrap() == pattern(3, 4 << 20));
    let r = rt.block_on(sync.pass()).unwrap();
    assert_eq!(r.durable, vec!["step-1".to_owned()]);
    let meta = rt.block_on(lake.head("run/step-1/w.bin")).unwrap();
    assert_eq!(meta.size, 6 << 20);
    rt.block_on(sync.stop());
}

/// A pool sized to its whole disk, its cache full of a dataset's files, and a job
/// writing a checkpoint bigger than the disk's free space: the cache evicts ahead of
/// the writer (it keeps `CacheConfig::free_space` of the disk free, checked more often
/// the closer the disk is to that), so the writer, whose writes the kernel makes
/// straight to the disk, never sees ENOSPC while the cache holds files it could evict.
/// The checkpoint reads back exact, and so does the dataset (what was evicted comes
/// from the lake again). Without the check, the cache's budget shrank only when the
/// checkpoint volumes' files were counted (every 10 s), and a writer like this one got
/// ENOSPC as soon as the disk was full (here after 47 of its 48 MiB).
fn a_checkpoint_writer_never_gets_enospc_while_the_cache_could_evict(passthrough: bool) {
    use tidepool_csi::cache::dataset::Dataset;
    use tidepool_csi::cache::{CacheConfig, CachePool};
    use tidepool_csi::lake::memory::MemoryLake;
    use tidepool_csi::lake::{Lake, LakeUrl};
    const MIB: usize = 1 << 20;
    let disk = SmallDisk::new("96m");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lake = Arc::new(MemoryLake::new());
    let files: Vec<Vec<u8>> = (0..48).map(|i| pattern(500 + i, MIB)).collect();
    for (i, data) in files.iter().enumerate() {
        lake.insert(&format!("ds/f{i:02}"), data.clone());
    }
    let mut cfg = CacheConfig::new(disk.0.path().join("cache"), 96 << 20);
    cfg.block_size = MIB as u64;
    cfg.get_size = MIB as u64;
    assert_eq!(
        cfg.free_space,
        12 << 20,
        "the default: an eighth of the capacity"
    );
    let pool = rt.block_on(CachePool::open(cfg)).unwrap();
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/ds").unwrap();
    let ds = rt
        .block_on(Dataset::open(
            pool.clone(),
            url,
            lake.clone() as Arc<dyn Lake>,
            false,
            |_| {},
        ))
        .unwrap();
    let read_all = |ds: &Dataset| {
        let (_, snap) = ds.current();
        let entries = snap.files_from(0, 100).unwrap();
        assert_eq!(entries.len(), files.len());
        for (e, want) in entries.iter().zip(&files) {
            let b = ds.blob(e).unwrap();
            let got = rt.block_on(b.read(0, b.size as usize)).unwrap();
            assert!(got == *want, "{} reads back exact", e.name);
        }
    };
    read_all(&ds);
    pool.flush().unwrap();
    let cached = pool.used();
    assert_eq!(
        cached,
        (48 * MIB) as u64,
        "the whole dataset is in the cache"
    );

    let v = Volume::mount_in(
        tempfile::tempdir_in(disk.0.path()).unwrap(),
        CommitRule::default(),
        passthrough,
    );
    fs::create_dir(v.p("step-1")).unwrap();
    let mut f = File::create(v.p("step-1/model.pt")).unwrap();
    // More than the disk's free space less the reserve (about 46 - 12 MiB).
    let checkpoint = pattern(7, 48 * MIB);
    // 1 MiB every 5 ms (200 MB/s at most; unpaced it passes too, but a test machine
    // under load may hold the check's thread back for tens of milliseconds, and the
    // reserve here is only 12 MiB: 60 ms of this writer).
    for (i, chunk) in checkpoint.chunks(MIB).enumerate() {
        if let Err(e) = f.write_all(chunk).and_then(|()| f.sync_data()) {
            panic!(
                "the checkpoint writer failed after {i} MiB ({e}) while the cache held {} bytes",
                pool.used()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(f);
    assert!(
        fs::read(v.p("step-1/model.pt")).unwrap() == checkpoint,
        "the checkpoint reads back exact"
    );
    // The writer needed at least 48 - (46 - 12) = 14 MiB of the cache's; each eviction
    // frees up to twice the reserve, so it takes at most 48 - 46 + 24 MiB and a few
    // blocks' slack (index pages, a block landing meanwhile).
    assert!(
        pool.evicted() >= (12 * MIB) as u64,
        "the cache made room: {} bytes evicted",
        pool.evicted()
    );
    assert!(
        pool.used() >= (16 * MIB) as u64,
        "and only about what the writer needed: {} bytes left in the cache",
        pool.used()
    );
    // The dataset still reads exact (what was evicted comes from the lake again).
    read_all(&ds);
}

#[test]
fn a_checkpoint_writer_never_gets_enospc_while_the_cache_could_evict_with_passthrough() {
    a_checkpoint_writer_never_gets_enospc_while_the_cache_could_evict(true);
}

#[test]
fn a_checkpoint_writer_never_gets_enospc_while_the_cache_could_evict_without_passthrough() {
    a_checkpoint_writer_never_gets_enospc_while_the_cache_could_evict(false);
}

/// A committed step rewritten in place before its upload finished (torch.save opens
/// with `O_TRUNC`; a writer opens `r+` and writes at an offset; `truncate(2)` by path)
/// keeps its committed version for the upload: the upload under way finishes with the
/// committed bytes, then the rewrite, once it commits, becomes durable too.
fn a_rewrite_in_place_keeps_the_committed_version(passthrough: bool) {
    use tidepool_csi::checkpoint::upload::UploadConfig;
    use tidepool_csi::lake::faults::{Fault, FaultyLake};
    use tidepool_csi::lake::memory::MemoryLake;
    use tidepool_csi::lake::{Lake, Op};
    let v = Volume::mount(CommitRule::default(), passthrough);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let memory = Arc::new(MemoryLake::new());
    let faulty = Arc::new(FaultyLake::new(memory.clone()));
    let lake: Arc<dyn Lake> = faulty.clone();
    let v1 = [
        ("a.bin", pattern(1, 3 << 20)),
        ("b.bin", pattern(2, 1 << 20)),
        ("c.bin", pattern(3, 700_000)),
    ];
    fs::create_dir(v.p("step-1")).unwrap();
    for (name, data) in &v1 {
        fs::write(v.p(&format!("step-1/{name}")), data).unwrap();
    }
    fs::write(v.p("step-1/.metadata"), b"v1").unwrap();
    let c1 = v.commits();
    assert_eq!(c1.len(), 1);
    // The upload starts (the marker goes in, one put) and breaks off (a.bin's blocks).
    let mut sync = rt
        .block_on(Syncer::start(
            lake.clone(),
            v.layout.clone(),
            "run/",
            SyncConfig {
                parallel_files: 1,
                upload: UploadConfig {
                    single_put_max: 1 << 20,
                    block_size: 1 << 20,
                    parallel: 2,
                    budget: None,
                },
                ..SyncConfig::default()
            },
        ))
        .unwrap();
    faulty.fail_always(Op::PutBlock, Fault::Throttle);
    assert!(rt.block_on(sync.pass()).is_err());
    assert!(v.store.journal().upload_started(c1[0].seq));
    // The job rewrites the step in place.
    let mut a = File::create(v.p("step-1/a.bin")).unwrap();
    a.write_all(&pattern(11, 2 << 20)).unwrap();
    drop(a);
    let b = OpenOptions::new()
        .write(true)
        .open(v.p("step-1/b.bin"))
        .unwrap();
    b.write_all_at(&pattern(12, 5000), 100).unwrap();
    drop(b);
    let c_path = c(&v.p("step-1/c.bin"));
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(c_path.as_ptr(), 10) }, 0);
    let staged = v.layout.staged(c1[0].seq);
    for (name, data) in &v1 {
        assert!(
            fs::read(staged.join(name)).unwrap() == *data,
            "{name}: the committed version is kept for the upload"
        );
    }
    fs::write(v.p("step-1/.metadata"), b"v2").unwrap();
    let c2 = v.commits();
    assert_eq!(c2.len(), 1, "the rewrite commits");
    faulty.heal();
    // The upload under way finishes first, with the committed bytes.
    let r = rt.block_on(sync.pass()).unwrap();
    assert_eq!(r.durable, ["step-1"], "{r:?}");
    for (name, data) in &v1 {
        let got = memory.content(&format!("run/step-1/{name}")).unwrap();
        assert!(
            got == *data,
            "{name} in the lake is the committed version ({} bytes, want {})",
            got.len(),
            data.len()
        );
    }
    assert_eq!(v.store.journal().state(c1[0].seq), CommitState::Durable);
    // Then the rewrite.
    let r = rt.block_on(sync.pass()).unwrap();
    assert_eq!(r.durable, ["step-1"], "{r:?}");
    for name in ["a.bin", "b.bin", "c.bin", ".metadata"] {
        assert!(
            memory.content(&format!("run/step-1/{name}")).unwrap()
                == fs::read(v.p(&format!("step-1/{name}"))).unwrap(),
            "{name} in the lake is the rewrite"
        );
    }
    rt.block_on(sync.stop());
}

#[test]
fn a_rewrite_in_place_keeps_the_committed_version_with_passthrough() {
    a_rewrite_in_place_keeps_the_committed_version(true);
}

#[test]
fn a_rewrite_in_place_keeps_the_committed_version_without_passthrough() {
    a_rewrite_in_place_keeps_the_committed_version(false);
}
