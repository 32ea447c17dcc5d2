//! What the `tidepool` binary says when it cannot do its job: one line that names what
//! failed and why, each cause once.

use std::process::Command;

#[test]
fn an_unreachable_lake_is_reported_once_per_cause() {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["mount", "http://127.0.0.1:1/devstoreaccount1/data/ds"])
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .args(["--deadline", "2s", "--log", "off"])
        .env(
            "AZURE_STORAGE_KEY",
            tidepool_csi::testing::azurite::ACCOUNT_KEY,
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with("tidepool: error: listing http://127.0.0.1:1/"),
        "{line}"
    );
    assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    assert_eq!(line.matches("listing").count(), 1, "{line}");
    assert!(line.contains("gave up after"), "{line}");
    assert!(!line.contains(tidepool_csi::testing::azurite::ACCOUNT_KEY));
}
