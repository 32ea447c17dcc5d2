//! A disk whose power can be cut: for tests of what survives a power loss.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A small ext4 file system on a loop device, and what it would hold after a power
/// loss at any moment: a copy of its device image, taken while it is mounted, holds
/// exactly the blocks the file system had written to the device, nothing still in its
/// page cache. Mounting the copy replays its journal, as a reboot would.
pub struct LoopExt4 {
    dir: tempfile::TempDir,
    /// Where it is mounted.
    pub mnt: PathBuf,
    dev: String,
}

#[allow(clippy::new_without_default)]
impl LoopExt4 {
    /// A new 256 MiB file system, mounted with a long journal interval.
    pub fn new() -> LoopExt4 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let dev = attach(&img);
        // A long journal interval: nothing reaches the device unless synced.
        run("mount", &["-o", "commit=600", &dev, mnt.to_str().unwrap()]);
        LoopExt4 { dir, mnt, dev }
    }

    /// The file system as a power loss now would leave it, mounted at the returned
    /// path.
    pub fn after_power_loss(&self) -> LoopExt4 {
        let copy = tempfile::tempdir().unwrap();
        let img = copy.path().join("disk.img");
        std::fs::copy(self.dir.path().join("disk.img"), &img).unwrap();
        let mnt = copy.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let dev = attach(&img);
        run("mount", &[&dev, mnt.to_str().unwrap()]);
        LoopExt4 {
            dir: copy,
            mnt,
            dev,
        }
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {} (needs root and loop devices)",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn attach(img: &Path) -> String {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
