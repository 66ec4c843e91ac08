//! Mutual TLS through the binaries: `coordinator certs`, a coordinator serving TLS, and
//! clients with no TLS, with a certificate of another CA, and with the right one.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use taming_tests::process::{bin, spawn_announcing, succeed};

fn certs(dir: &Path) {
    succeed(
        Command::new(bin("coordinator"))
            .args(["certs", "--names", "localhost", "--out"])
            .arg(dir),
    );
}

/// `coordinator status` against `addr` with these TLS files (none: plaintext).
fn status(addr: &str, files: Option<(&Path, &Path)>) -> Output {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["status", "--coordinator", addr]);
    if let Some((ca_dir, id_dir)) = files {
        cmd.arg("--tls-ca")
            .arg(ca_dir.join("ca.pem"))
            .arg("--tls-cert")
            .arg(id_dir.join("localhost.pem"))
            .arg("--tls-key")
            .arg(id_dir.join("localhost.key"));
    }
    cmd.env("TAMING_CLUSTER_TOKEN", "t").output().unwrap()
}

#[test]
fn a_tls_coordinator_takes_only_clients_with_a_certificate_of_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    certs(&ours);
    certs(&theirs);
    let (_coord, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args(["serve", "--bind", "127.0.0.1:0", "--state"])
            .arg(tmp.path().join("state"))
            .arg("--tls-ca")
            .arg(ours.join("ca.pem"))
            .arg("--tls-cert")
            .arg(ours.join("localhost.pem"))
            .arg("--tls-key")
            .arg(ours.join("localhost.key"))
            .env("TAMING_CLUSTER_TOKEN", "t")
            .stderr(Stdio::null()),
        &["coordinator listening on "],
    );
    let addr = said[0].clone();
    let plain = status(&addr, None);
    assert!(!plain.status.success(), "a plaintext client is refused");
    let stranger = status(&addr, Some((&ours, &theirs)));
    assert!(
        !stranger.status.success(),
        "a client certificate of another CA is refused"
    );
    let wrong_ca = status(&addr, Some((&theirs, &ours)));
    assert!(
        !wrong_ca.status.success(),
        "a client that trusts another CA refuses the server"
    );
    let ok = status(&addr, Some((&ours, &ours)));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn plaintext_off_loopback_is_refused_unless_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        Command::new(bin("coordinator"))
            .args(["serve", "--bind", "0.0.0.0:0", "--state"])
            .arg(tmp.path().join("state"))
            .args(extra)
            .env("TAMING_CLUSTER_TOKEN", "t")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = serve(&[]).wait_with_output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("plaintext") && err.contains("--insecure"),
        "{err}"
    );
    let (_coord, said) = spawn_announcing(
        Command::new(bin("coordinator"))
            .args(["serve", "--bind", "0.0.0.0:0", "--insecure", "--state"])
            .arg(tmp.path().join("state2"))
            .env("TAMING_CLUSTER_TOKEN", "t")
            .stderr(Stdio::null()),
        &["coordinator listening on "],
    );
    assert!(said[0].starts_with("0.0.0.0:"), "{}", said[0]);
    // A client does not send the token in plaintext to a host that is not loopback.
    let out = Command::new(bin("coordinator"))
        .args(["status", "--coordinator", "example.invalid:1"])
        .env("TAMING_CLUSTER_TOKEN", "t")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("plaintext"), "{err}");
}
