//! Enrollment with real processes: keys are made by their owners
//! (`tessera-participant enroll`, `tessera ca request`), the CA signs their
//! requests (`tessera ca issue --csr`) and never holds a private key, and a
//! certificate issued that way works over mutual TLS with the owner's key.

use std::process::{Command, Output};

use tessera_protocol::enroll::Request;
use tessera_tests::{Federation, SITES, bin, files_under};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_ca_signs_requests_and_never_holds_a_members_private_key() {
    let federation = Federation::start(&SITES);
    let ca = federation.ca();

    // A hospital enrolls on its own host.
    let host = federation.dir.path().join("newsite-host");
    let out = Command::new(bin("tessera-participant"))
        .args(["enroll", "--site", "newsite", "--state-dir"])
        .arg(&host)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let request_path = host.join("site-newsite.enroll.toml");
    let request_text = std::fs::read_to_string(&request_path).unwrap();
    assert!(!request_text.contains("PRIVATE KEY"), "{request_text}");
    let request = Request::parse(&request_text).unwrap();

    // Without a request the CA refuses to make keys unless told to.
    let out = federation.ca_command(&["issue", "--site", "keyless"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--csr"), "{}", text(&out));
    // A request cannot be issued under another name.
    let out = federation.ca_command(&["issue", "--site", "va2", "--csr", request_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is a request for"), "{}", text(&out));
    // An edited request (another signing key) fails its proof of possession.
    let forged_path = host.join("forged.enroll.toml");
    let mut forged = request.clone();
    forged.signing_key = Some("11".repeat(32));
    std::fs::write(&forged_path, forged.to_toml()).unwrap();
    let out = federation.ca_command(&["issue", "--csr", forged_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("proof of possession"), "{}", text(&out));

    let out = federation.ca_command(&["issue", "--csr", request_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no private key"), "{}", text(&out));

    // The kit and the whole CA folder hold neither of the site's private
    // keys; the roster holds the site's own public signing key.
    let kit = ca.join("sites/newsite");
    assert!(kit.join("tls.pem").exists());
    for name in ["tls.key", "site.key"] {
        assert!(!kit.join(name).exists(), "{name} in the kit");
    }
    let secrets = [
        std::fs::read(host.join("tls.key")).unwrap(),
        std::fs::read(host.join("site.key")).unwrap(),
    ];
    for file in files_under(&ca) {
        let bytes = std::fs::read(&file).unwrap();
        if file.starts_with(&kit) {
            assert!(
                !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
                "{} holds a private key",
                file.display()
            );
        }
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{} holds a copy of the site's key",
                file.display()
            );
        }
    }
    let roster = std::fs::read_to_string(ca.join("roster.toml")).unwrap();
    let line = format!("newsite = \"{}\"", request.signing_key.as_deref().unwrap());
    assert!(roster.contains(&line), "{roster}");

    // A person enrolls the same way, and the certificate works over mutual
    // TLS with the key that never left its host...
    let alice = federation.dir.path().join("alice-host");
    let out = Command::new(bin("tessera"))
        .args(["ca", "request", "--operator", "alice", "--out"])
        .arg(&alice)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = federation.ca_command(&[
        "issue",
        "--csr",
        alice.join("operator-alice.enroll.toml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!ca.join("operators/alice/tls.key").exists());
    for name in ["tls.pem", "ca.pem"] {
        std::fs::copy(ca.join("operators/alice").join(name), alice.join(name)).unwrap();
    }
    let out = federation.tessera_as(&alice, &["job", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    // ...and not with anyone else's key.
    let mallory = federation.dir.path().join("mallory-host");
    let out = Command::new(bin("tessera"))
        .args(["ca", "request", "--operator", "mallory", "--out"])
        .arg(&mallory)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for name in ["tls.pem", "ca.pem"] {
        std::fs::copy(alice.join(name), mallory.join(name)).unwrap();
    }
    let out = federation.tessera_as(&mallory, &["job", "list"]);
    assert!(!out.status.success(), "{}", text(&out));
}
