//! The checkpoint half as a VM user runs it: `tidepool mount --checkpoint`, a real
//! writer (a Python process writing the PyTorch DCP and Orbax patterns), `tidepool sync
//! status`, `tidepool sync` as a separate process, `tidepool restore`, against Azurite,
//! with `kill -9` of the mount while a rank is mid-write.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tidepool_csi::mounts::{detach_path, is_mounted};
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::{Azurite, MountProcess, within};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tidepool"))
}

fn writer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ckpt_writer.py")
}

/// Runs the framework-pattern writer; returns path → MD5 of what it wrote.
fn write_pattern(args: &[&str]) -> BTreeMap<String, String> {
    let out = Command::new("python3")
        .arg(writer())
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "writer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["path"].as_str().unwrap().to_owned(),
                v["md5"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn tidepool(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env("AZURE_STORAGE_KEY", ACCOUNT_KEY)
        .output()
        .unwrap()
}

fn status_json(cache: &Path) -> serde_json::Value {
    let out = tidepool(&[
        "sync",
        "status",
        "--json",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap()
            .as_bytes(),
    )
    .unwrap()
}

/// MD5 of every file under `dir`, by path relative to `dir`.
fn md5_tree(dir: &Path) -> BTreeMap<String, String> {
    use md5::{Digest, Md5};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let h = Md5::digest(std::fs::read(e.path()).unwrap());
                out.insert(rel, h.iter().map(|b| format!("{b:02x}")).collect());
            }
        }
    }
    out
}

fn durable_step(cache: &Path) -> Option<String> {
    status_json(cache)["latest_durable"]["step"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_checkpoints_through_the_volume_become_durable_and_restore_exactly() {
    let az = Azurite::start();
    az.create_container("ckpt").await;
    let url = az.url("ckpt", "run-1");
    let work = tempfile::tempdir().unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("pool"));
    std::fs::create_dir_all(&mnt).unwrap();
    let mut m = MountProcess::start(
        &bin(),
        &url,
        &mnt,
        &cache,
        // One machine: its steps wait for no other node.
        &["--checkpoint", "--node-name", "gpu-0", "--nodes", "1"],
    );
    let root = mnt.to_str().unwrap();
    let mut expect = BTreeMap::new();
    for step in ["step-1000", "step-2000"] {
        expect.extend(write_pattern(&["dcp", root, step, "3", "5000000"]));
    }
    expect.extend(write_pattern(&["orbax", root, "3000", "7000000"]));
    // The job sees exactly what it wrote.
    assert_eq!(md5_tree(&mnt), expect);
    let durable = within(Duration::from_secs(60), || {
        (durable_step(&cache).as_deref() == Some("3000")).then_some(())
    });
    assert!(
        durable.is_some(),
        "the last step never became durable: {}",
        status_json(&cache)
    );
    let st = status_json(&cache);
    assert_eq!(st["pending_bytes"], 0);
    assert_eq!(st["last_error"], serde_json::Value::Null);
    // Text status names the steps.
    let out = tidepool(&["sync", "status", "--cache-dir", cache.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("latest durable:   3000"), "{text}");

    // Restore into empty directories, as a job on another node would.
    let out_dir = work.path().join("restored");
    let r = tidepool(&["restore", &url, out_dir.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("restored 3000"));
    let r = tidepool(&["restore", &url, out_dir.to_str().unwrap(), "--step", "2000"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let restored = md5_tree(&out_dir);
    let wanted: BTreeMap<_, _> = expect
        .iter()
        .filter(|(p, _)| p.starts_with("3000/") || p.starts_with("step-2000/"))
        .map(|(p, m)| (p.clone(), m.clone()))
        .collect();
    assert_eq!(
        restored, wanted,
        "restored bytes differ from what the job wrote"
    );
    // A step that never was is refused in words.
    let r = tidepool(&["restore", &url, out_dir.to_str().unwrap(), "--step", "9999"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("not durable"));

    m.signal(libc::SIGTERM);
    assert!(m.wait().success(), "SIGTERM is a clean exit");
    assert!(!is_mounted(&mnt.canonicalize().unwrap()).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_mount_mid_write_keeps_what_committed_and_never_publishes_the_half() {
    let az = Azurite::start();
    az.create_container("ckpt").await;
    let url = az.url("ckpt", "run-2");
    let work = tempfile::tempdir().unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("pool"));
    std::fs::create_dir_all(&mnt).unwrap();
    let cache_s = cache.to_str().unwrap().to_owned();
    let mut m = MountProcess::start(
        &bin(),
        &url,
        &mnt,
        &cache,
        &["--checkpoint", "--node-name", "gpu-0", "--no-sync"],
    );
    let root = mnt.to_str().unwrap().to_owned();
    let step1 = write_pattern(&["dcp", &root, "step-1", "2", "3000000"]);
    // A rank mid-write in step-2 when the mount dies.
    let mut half = KillOnDrop(
        Command::new("python3")
            .arg(writer())
            .args(["half", &root, "step-2", "4000000"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(half.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "writing");
    // The commit of step-1 is in the journal before the kill (the mount commits within
    // its tick; the sync is a separate process here).
    let journal = cache.join("checkpoints");
    let committed = within(Duration::from_secs(10), || {
        let n = walk_count(&journal, ".commit");
        (n >= 1).then_some(n)
    });
    assert_eq!(committed, Some(1));
    // Status tells the half-written step apart from the committed one.
    let shown = within(Duration::from_secs(10), || {
        let st = status_json(&cache);
        (st["uncommitted"] == serde_json::json!(["step-2"])).then_some(())
    });
    assert!(shown.is_some(), "status: {}", status_json(&cache));
    m.signal(libc::SIGKILL);
    m.wait();
    drop(half);
    let canon = mnt.canonicalize().unwrap_or(mnt.clone());
    detach_path(&canon).unwrap();

    // The separate sync finishes what committed; the half-written step never commits.
    let out = tidepool(&["sync", "--once", "--cache-dir", &cache_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(durable_step(&cache).as_deref(), Some("step-1"));
    // Remounted: the half file is there for the job to see (and overwrite), still
    // uncommitted; another sync publishes nothing new.
    let mut m = MountProcess::start(
        &bin(),
        &url,
        &mnt,
        &cache,
        &["--checkpoint", "--node-name", "gpu-0", "--no-sync"],
    );
    assert_eq!(
        std::fs::metadata(mnt.join("step-2/__0_0.distcp"))
            .unwrap()
            .len(),
        2_000_000
    );
    std::thread::sleep(Duration::from_millis(500));
    m.signal(libc::SIGTERM);
    assert!(m.wait().success());
    let out = tidepool(&["sync", "--once", "--cache-dir", &cache_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(durable_step(&cache).as_deref(), Some("step-1"));
    let restored = work.path().join("r");
    let r = tidepool(&[
        "restore",
        &url,
        restored.to_str().unwrap(),
        "--step",
        "step-2",
    ]);
    assert!(
        !r.status.success(),
        "the half-written step is never durable"
    );
    let r = tidepool(&["restore", &url, restored.to_str().unwrap()]);
    assert!(r.status.success());
    assert_eq!(md5_tree(&restored), step1);
}

#[test]
fn bad_input_is_refused_in_words() {
    let work = tempfile::tempdir().unwrap();
    let out = tidepool(&["sync", "--cache-dir", work.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no checkpoint volume") && err.contains("tidepool mount --checkpoint"),
        "{err}"
    );
    let out = tidepool(&["sync"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache-dir"));
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let pool = work.path().join("pool");
    let out = tidepool(&[
        "mount",
        "--checkpoint",
        "http://127.0.0.1:1/devstoreaccount1/ckpt/p",
        mnt.to_str().unwrap(),
        "--cache-dir",
        pool.to_str().unwrap(),
        "--commit-marker",
        "a/b",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--commit-marker \"a/b\" is not a file name")
    );
    assert!(
        !is_mounted(&mnt.canonicalize().unwrap()).unwrap(),
        "nothing mounted on bad input"
    );
    // Checkpoint flags without --checkpoint, and dataset flags with it.
    let out = tidepool(&[
        "mount",
        "http://127.0.0.1:1/devstoreaccount1/ckpt/p",
        mnt.to_str().unwrap(),
        "--cache-dir",
        pool.to_str().unwrap(),
        "--keep-local",
        "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--checkpoint"),
        "{err}"
    );
    let out = tidepool(&[
        "mount",
        "--checkpoint",
        "http://127.0.0.1:1/devstoreaccount1/ckpt/p",
        mnt.to_str().unwrap(),
        "--cache-dir",
        pool.to_str().unwrap(),
        "--prefetch",
        "eager",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("apply to dataset mounts"),
        "{err}"
    );
}

/// A child killed (and reaped) when dropped, so a failing test leaves no writer behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn walk_count(dir: &Path, suffix: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name() != "tree" && e.file_name() != "staged" {
                    stack.push(e.path());
                }
            } else if e.file_name().to_string_lossy().ends_with(suffix) {
                n += 1;
            }
        }
    }
    n
}
