//! A full disk under the coordinator, on a real (tmpfs) file system: the
//! job fails with the reason, nothing stays "running", and the next job
//! runs once there is room again (issue 10). Needs the right to mount a
//! tmpfs (root); skipped with a message elsewhere.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tessera_tests::{Federation, SITES, example_job};

/// A tmpfs of `size`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|out| out.status.success());
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Fills the file system of `path` with one file, leaving about `room`
/// bytes free.
fn fill(path: &Path, room: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while file.write_all(&block).is_ok() {
        written += block.len() as u64;
    }
    drop(file);
    let full = std::fs::metadata(path).unwrap().len().max(written);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(full.saturating_sub(room)).unwrap();
}

#[test]
fn a_coordinator_whose_disk_fills_fails_the_job_with_the_reason_and_recovers() {
    let mut federation = Federation::running(&SITES);
    let Some(tmpfs) = Tmpfs::mount(&federation.dir.path().join("dbfs"), "32m") else {
        eprintln!("skipped: cannot mount a tmpfs here (the test needs root)");
        return;
    };
    federation.move_db(&tmpfs.0);
    let job = example_job(&[("rounds", "500"), ("dropout_after_s", "5"), ("round_timeout_s", "20")]);
    let job_id = federation.submit(&federation.write_job("job.toml", &job));
    // Room for the job to start and run a few rounds, not for 500.
    for _ in 0..400 {
        if federation.status(job_id)["job"]["rounds_done"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let filler = tmpfs.0.join("filler");
    fill(&filler, 32 * 1024);
    // The job cannot go on. Its end is stored when it fits; when even that
    // does not, the coordinator says so once and keeps trying.
    let mut ended = false;
    for _ in 0..1200 {
        let stored = federation.status(job_id)["job"]["status"] == "failed";
        ended = stored || federation.log("coordinator").contains("cannot record the job's end");
        if ended {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ended, "{}", federation.logs());
    std::fs::remove_file(&filler).unwrap();
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    let error = status["job"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("the coordinator's disk is full: it cannot store the job's progress"),
        "{status:#}\n{}",
        federation.log("coordinator")
    );
    let log = federation.log("coordinator");
    assert!(log.matches("cannot record the job's end").count() <= 1, "{log}");
    // Nothing is left running, and the next job runs.
    let next = federation.submit(&federation.write_job("next.toml", &example_job(&[("rounds", "2")])));
    let status = federation.wait_for(next, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    let out = federation.tessera(&["ledger", "verify", "--allow-pending"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The lines of a site's egress log that are not one whole JSON record.
fn torn_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .map(str::to_owned)
        .collect()
}

/// A full disk under a site: it sends nothing it cannot log and cannot
/// follow the ledger, so it drops out of the rounds (the job goes on with
/// the others) and says why, once, backing off; its egress log holds no
/// torn line. Once there is room again it takes part again.
#[test]
fn a_site_whose_disk_fills_drops_out_with_the_reason_tears_no_record_and_comes_back() {
    let mut federation = Federation::start(&SITES);
    // Cleveland's state directory (its kit, egress log, ledger replica and
    // contribution records) on a small file system of its own.
    let state = federation.state_dir("cleveland");
    let kit = federation.dir.path().join("cleveland-kit");
    let copy = |from: &Path, to: &Path| {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(to)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cp -a {} {}", from.display(), to.display());
    };
    std::fs::create_dir_all(&kit).unwrap();
    copy(&state, &kit);
    let Some(tmpfs) = Tmpfs::mount(&state, "16m") else {
        eprintln!("skipped: cannot mount a tmpfs here (the test needs root)");
        return;
    };
    copy(&kit, &tmpfs.0);
    for site in SITES {
        federation.add_site(site);
    }
    let job = example_job(&[("rounds", "1000"), ("dropout_after_s", "5"), ("round_timeout_s", "20")]);
    let job_id = federation.submit(&federation.write_job("job.toml", &job));
    let rounds_done = |f: &Federation| f.status(job_id)["job"]["rounds_done"].as_u64().unwrap_or(0);
    for _ in 0..600 {
        if rounds_done(&federation) >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let filler = tmpfs.0.join("filler");
    fill(&filler, 0);
    // The job goes on with the three other sites.
    let full_at = rounds_done(&federation);
    let without = |f: &Federation| {
        f.status(job_id)["rounds"]
            .as_array()
            .map(|rounds| {
                rounds.iter().any(|r| {
                    r["round"].as_u64().unwrap_or(0) > full_at
                        && !r["sites"].as_array().unwrap().iter().any(|s| s == "cleveland")
                })
            })
            .unwrap_or(false)
    };
    for _ in 0..600 {
        if without(&federation) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        without(&federation),
        "no round went on without cleveland:\n{}",
        federation.logs()
    );
    assert_eq!(federation.status(job_id)["job"]["status"], "running");
    std::thread::sleep(Duration::from_secs(3));
    let log = federation.log("cleveland");
    assert!(
        // SQLite's words (its ledger replica) or the OS's (its egress log).
        log.contains("database or disk is full") || log.contains("No space left on device"),
        "the reason is not said:\n{log}"
    );
    assert!(
        log.lines().filter(|l| l.contains("ERROR")).count() < 40,
        "the site does not back off:\n{log}"
    );
    let egress = tmpfs.0.join("egress.jsonl");
    assert_eq!(torn_lines(&egress), Vec::<String>::new());

    // Room again: cleveland takes part again, its log still whole.
    std::fs::remove_file(&filler).unwrap();
    let back_at = rounds_done(&federation);
    let with = |f: &Federation| {
        f.status(job_id)["rounds"]
            .as_array()
            .map(|rounds| {
                rounds.iter().any(|r| {
                    r["round"].as_u64().unwrap_or(0) > back_at
                        && r["sites"].as_array().unwrap().iter().any(|s| s == "cleveland")
                })
            })
            .unwrap_or(false)
    };
    for _ in 0..1200 {
        if with(&federation) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(with(&federation), "cleveland never came back:\n{}", federation.logs());
    assert_eq!(torn_lines(&egress), Vec::<String>::new());
    let out = federation.tessera(&["job", "cancel", &job_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    federation.kill_site("cleveland");
    let out = federation.tessera(&["ledger", "verify", "--allow-pending"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
