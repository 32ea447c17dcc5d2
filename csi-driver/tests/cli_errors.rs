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

/// `tidepool agent --peer-*` refuses a setting it cannot work with, in words that say
/// what to give, before it serves anything; the secret's bytes never appear.
#[test]
fn peer_settings_that_cannot_work_are_refused_in_words() {
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("secret");
    let agent = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["agent", "--node-name", "n1", "--no-kube", "--log", "off"])
            .arg("--cache-dir")
            .arg(work.path().join("pool"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let secret_arg = secret.to_str().unwrap();
    // Listening on every address without saying where peers reach this node.
    std::fs::write(&secret, "0123456789abcdef-and-more\n").unwrap();
    let err = agent(&[
        "--peer-listen",
        "0.0.0.0:0",
        "--peer-secret-file",
        secret_arg,
    ]);
    assert!(err.contains("--peer-advertise"), "{err}");
    // No secret file given.
    let err = agent(&["--peer-listen", "127.0.0.1:0"]);
    assert!(
        err.contains("--peer-listen needs --peer-secret-file"),
        "{err}"
    );
    // A secret too short to be one.
    std::fs::write(&secret, "short\n").unwrap();
    let err = agent(&[
        "--peer-listen",
        "127.0.0.1:0",
        "--peer-secret-file",
        secret_arg,
    ]);
    assert!(err.contains("at least 16"), "{err}");
    assert!(
        !err.contains("short\n") && !err.contains("\"short\""),
        "{err}"
    );
    // An advertised address that is not one.
    let err = agent(&[
        "--peer-listen",
        "127.0.0.1:0",
        "--peer-advertise",
        "node-1.example",
        "--peer-secret-file",
        secret_arg,
    ]);
    assert!(err.contains("neither IP:PORT nor an IP address"), "{err}");
}
