//! The deployment units hospital IT installs from (`deploy/`), checked
//! where no container registry can be reached: the Dockerfile parsed (a
//! multi-stage build, a non-root runtime with the three binaries), the
//! compose demo parsed and every flag it passes checked against the
//! binaries, the systemd units verified by `systemd-analyze` (Debian's
//! systemd, installed by scripts/test.sh) with their hardening in place.

use std::path::Path;
use std::process::Command;

use tessera_tests::{bin, repo};

/// Runs a Python snippet on `file` (parsers from PyPI, installed by
/// scripts/test.sh) and parses the JSON it prints.
fn python(code: &str, file: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .arg(file)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The long options `binary SUBCOMMAND --help` lists.
fn options(binary: &str, subcommand: &[&str]) -> Vec<String> {
    let out = Command::new(bin(binary))
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{binary} {subcommand:?} --help");
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_owned())
        .collect()
}

/// Every `--flag` of a command line (`tessera-coordinator --listen …` or
/// `tessera-participant run --config …`) is one its binary accepts.
fn check_flags(args: &[String]) {
    let binary = Path::new(&args[0]).file_name().unwrap().to_str().unwrap();
    let subcommand: Vec<&str> = match binary {
        "tessera-participant" | "tessera" => args[1..]
            .iter()
            .take_while(|a| !a.starts_with("--"))
            .map(String::as_str)
            .collect(),
        _ => Vec::new(),
    };
    let known = options(binary, &subcommand);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            known.contains(flag),
            "{binary} {subcommand:?} has no option {flag}: {known:?}"
        );
    }
}

const DOCKERFILE: &str = r#"
import json, sys
from dockerfile_parse import DockerfileParser
p = DockerfileParser(path=sys.argv[1])
print(json.dumps([{"instruction": i["instruction"], "value": i["value"]} for i in p.structure]))
"#;

#[test]
fn the_dockerfile_builds_a_non_root_image_with_the_three_binaries() {
    let steps = python(DOCKERFILE, &repo().join("deploy/Dockerfile"));
    let steps: Vec<(String, String)> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["instruction"].as_str().unwrap().to_owned(),
                s["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let stages: Vec<usize> = steps
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {steps:?}");
    let (build, runtime) = (&steps[stages[0]..stages[1]], &steps[stages[1]..]);
    assert!(build[0].1.ends_with("AS build"), "{:?}", build[0]);
    assert!(
        build.iter().any(|(i, v)| i == "RUN"
            && v.contains("cargo build --release --locked")
            && v.contains("-p tessera-coordinator")
            && v.contains("-p tessera-participant")),
        "{build:?}"
    );
    // The runtime stage gets the three binaries from the build stage, and
    // its last USER is not root.
    let copied: Vec<&String> = runtime
        .iter()
        .filter(|(i, v)| i == "COPY" && v.starts_with("--from=build"))
        .map(|(_, v)| v)
        .collect();
    for binary in ["tessera", "tessera-coordinator", "tessera-participant"] {
        let path = format!("/src/target/release/{binary} ");
        assert!(
            copied.iter().any(|v| v.contains(&path)),
            "{binary} not copied: {copied:?}"
        );
    }
    let user = runtime.iter().rev().find(|(i, _)| i == "USER").map(|(_, v)| v.trim());
    assert!(
        user.is_some_and(|u| !matches!(u, "root" | "0" | "0:0")),
        "runtime user: {user:?}"
    );
    // What the build context leaves out: no multi-GB target directory.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
}

const COMPOSE: &str = r#"
import json, sys, yaml
print(json.dumps(yaml.safe_load(open(sys.argv[1]))))
"#;

#[test]
fn the_compose_demo_passes_only_flags_the_binaries_accept_and_files_that_exist() {
    let compose = python(COMPOSE, &repo().join("deploy/compose.yaml"));
    let services = compose["services"].as_object().unwrap();
    let args = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("a command as a list: {v}"))
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    // The kits: the coordinator's certificate names the host the sites dial.
    let kits = args(&services["kits"]["command"]).join(" ");
    assert!(kits.contains("--hostname coordinator"), "{kits}");
    for site in ["cleveland", "hungary", "switzerland"] {
        assert!(kits.contains(site), "{site} gets no kit: {kits}");
    }
    let coordinator = args(&services["coordinator"]["command"]);
    assert_eq!(coordinator[0], "tessera-coordinator");
    check_flags(&coordinator);
    for site in ["cleveland", "hungary", "switzerland"] {
        let service = &services[site];
        let command = args(&service["command"]);
        assert_eq!(&command[..2], ["tessera-participant", "run"], "{site}");
        check_flags(&command);
        let value = |flag: &str| &command[command.iter().position(|a| a == flag).unwrap() + 1];
        assert_eq!(value("--coordinator"), "https://coordinator:50051", "{site}");
        assert_eq!(value("--state-dir"), &format!("/kits/ca/sites/{site}"), "{site}");
        // The config is the repository's, mounted where its relative data
        // path resolves to the shared data, mounted read-only.
        let config = value("--config").strip_prefix("/srv/tessera/repo/").unwrap();
        assert_eq!(config, format!("examples/heart-disease/sites/{site}.toml"));
        assert!(repo().join(config).exists(), "{config}");
        let volumes: Vec<String> = service["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("{site}: no volumes"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let data = volumes
            .iter()
            .find(|v| v.ends_with(":/srv/tessera/shared/data:ro"))
            .unwrap_or_else(|| panic!("{site}: no read-only data mount: {volumes:?}"));
        let host = repo().join("deploy").join(data.split(':').next().unwrap());
        assert!(
            host.join("heart-disease/processed.cleveland.data").exists(),
            "{}",
            host.display()
        );
    }
    let lead = args(&services["lead"]["entrypoint"]);
    assert_eq!(lead[0], "tessera");
    let known = options("tessera", &[]);
    for flag in lead.iter().filter(|a| a.starts_with("--")) {
        assert!(known.contains(flag), "tessera has no option {flag}");
    }
}

#[test]
fn the_systemd_units_verify_and_confine_the_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = bin("tessera").parent().unwrap().to_owned();
    for (unit, binary) in [
        ("tessera-coordinator.service", "tessera-coordinator"),
        ("tessera-participant.service", "tessera-participant"),
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        for hardening in [
            "User=tessera",
            "ProtectSystem=strict",
            "ProtectHome=true",
            "NoNewPrivileges=true",
            "PrivateTmp=true",
            "CapabilityBoundingSet=\n",
            "StateDirectory=tessera",
            "Restart=on-failure",
        ] {
            assert!(text.contains(hardening), "{unit} lacks {hardening:?}");
        }
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit}: no ExecStart"));
        let args: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
        assert_eq!(args[0], format!("/usr/local/bin/{binary}"));
        check_flags(&args);
        // systemd checks that the command exists: the unit as installed
        // beside the binaries this test built.
        let local = dir.path().join(unit);
        std::fs::write(
            &local,
            text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display())),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&local)
            .output()
            .expect("systemd-analyze (Debian's systemd; scripts/test.sh installs it)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
}
