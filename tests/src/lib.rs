//! Harness for integration tests: builds the real binaries once, starts a
//! coordinator and participants as child processes on free loopback ports in
//! a temporary directory, drives them with the real `tessera` CLI, and kills
//! them all when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repo")
        .to_owned()
}

/// The heart-disease site ids of `examples/heart-disease/sites/`.
pub const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

/// Path of a workspace binary, built (once per test process) with the same
/// profile as the tests.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The same package and target selection as `cargo test --workspace`
        // (so the same feature unification): the dependencies built for the
        // tests are reused instead of being rebuilt with other features.
        cmd.current_dir(repo())
            .args(["build", "--quiet", "--workspace", "--bins", "--tests"]);
        // Cargo runs a test with its package's variables set; passed on,
        // they differ from the outer build's (`ring`'s build script tracks
        // CARGO_MANIFEST_DIR), and everything above `ring` was rebuilt:
        // three minutes of every CI run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key == "CARGO_MANIFEST_DIR"
                || key == "CARGO_MANIFEST_PATH"
                || key == "CARGO_CRATE_NAME"
                || key == "CARGO_PRIMARY_PACKAGE"
                || key == "CARGO_TARGET_TMPDIR"
                || key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
            {
                cmd.env_remove(key.as_ref());
            }
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        // target/<profile>/deps/<test-exe> -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent()
            .and_then(Path::parent)
            .expect("target profile dir")
            .to_owned()
    });
    dir.join(name)
}

/// A hospital's real heart-disease file in `../shared/data/heart-disease`.
pub fn heart_data(site: &str) -> PathBuf {
    let name = if site == "hungary" { "hungarian" } else { site };
    repo()
        .join("..")
        .join("shared/data/heart-disease")
        .join(format!("processed.{name}.data"))
}

/// A site config (absolute paths) over `data` read through `schema`, in
/// `dir`; the harness supplies the coordinator, kit and state directory.
pub fn site_config(dir: &Path, site: &str, data: &Path, schema: &Path) -> PathBuf {
    let path = dir.join(format!("{site}-site.toml"));
    let text = format!(
        "site_id = \"{site}\"\ncoordinator = \"http://127.0.0.1:1\"\nstate_dir = \"{}\"\n\n[data]\npath = \"{}\"\nschema = \"{}\"\n",
        dir.join(format!("unused-{site}")).display(),
        data.display(),
        schema.display()
    );
    std::fs::write(&path, text).expect("write site config");
    path
}

/// Every file under `dir`, recursively (what a test scans for a secret
/// that must not be there).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A running federation; every process is killed on drop.
pub struct Federation {
    pub dir: tempfile::TempDir,
    pub addr: String,
    children: Vec<(String, Child)>,
    /// The coordinator's --allow-site list and extra arguments, for restarts.
    allowed: String,
    coordinator_args: Vec<String>,
    /// Where the coordinator's database is, when a test moved it.
    db: Option<PathBuf>,
}

impl Federation {
    /// Provisions a consortium CA in a temp dir (`tessera ca init`), a kit
    /// for each of `allowed` and for an operator, and starts the coordinator
    /// over mutual TLS admitting those sites.
    pub fn start(allowed: &[&str]) -> Self {
        Self::start_with(allowed, &[])
    }

    /// `start`, then a participant for each of `sites`.
    pub fn running(sites: &[&str]) -> Self {
        let mut federation = Self::start(sites);
        for site in sites {
            federation.add_site(site);
        }
        federation
    }

    /// Runs `tessera-participant ARGS --config <site's example config>
    /// --state-dir <its kit>` (the offline site commands).
    pub fn site_command(&self, site: &str, args: &[&str]) -> Output {
        Command::new(bin("tessera-participant"))
            .args(args)
            .arg("--config")
            .arg(repo().join(format!("examples/heart-disease/sites/{site}.toml")))
            .arg("--state-dir")
            .arg(self.state_dir(site))
            .output()
            .expect("run tessera-participant")
    }

    /// `start` with extra coordinator arguments.
    pub fn start_with(allowed: &[&str], coordinator_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        let run = |args: &[&str]| {
            let out = Command::new(bin("tessera"))
                .args(args)
                .output()
                .expect("run tessera ca");
            assert!(
                out.status.success(),
                "tessera {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca_str = ca.to_str().expect("utf-8 path");
        run(&["ca", "init", "--consortium", "test", "--out", ca_str]);
        // The harness plays every host at once, so the CA makes the keys
        // (`--generate-key`); `tests/tests/enroll.rs` covers enrollment
        // with the keys made by their owners.
        for site in allowed {
            run(&["ca", "issue", "--ca", ca_str, "--site", site, "--generate-key"]);
        }
        run(&["ca", "issue", "--ca", ca_str, "--operator", "lead", "--generate-key"]);
        let mut federation = Self {
            dir,
            addr: String::new(),
            children: Vec::new(),
            allowed: allowed.join(","),
            coordinator_args: coordinator_args.iter().map(|a| a.to_string()).collect(),
            db: None,
        };
        federation.spawn_coordinator("127.0.0.1:0");
        federation
    }

    /// The consortium CA directory (kits under `sites/`, `operators/`...).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Runs `tessera ca ARGS --ca <this federation's CA>`.
    pub fn ca_command(&self, args: &[&str]) -> Output {
        Command::new(bin("tessera"))
            .args(["ca"])
            .args(args)
            .arg("--ca")
            .arg(self.ca())
            .output()
            .expect("run tessera ca")
    }

    /// Starts the coordinator on `listen` and waits for its port.
    fn spawn_coordinator(&mut self, listen: &str) {
        let port_file = self.dir.path().join("port");
        let _ = std::fs::remove_file(&port_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .expect("log file");
        let child = Command::new(bin("tessera-coordinator"))
            .arg("--listen")
            .arg(listen)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--db")
            .arg(self.db())
            .arg("--allow-site")
            .arg(&self.allowed)
            .arg("--roster")
            .arg(self.ca().join("roster.toml"))
            .arg("--tls-dir")
            .arg(self.ca().join("coordinator"))
            .args(&self.coordinator_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start coordinator");
        self.children.push(("coordinator".into(), child));
        for _ in 0..200 {
            if let Ok(port) = std::fs::read_to_string(&port_file)
                && !port.is_empty()
            {
                self.addr = format!("https://127.0.0.1:{port}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("coordinator did not write its port; log:\n{}", self.log("coordinator"));
    }

    /// The coordinator's database (which holds its ledger).
    pub fn db(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| self.dir.path().join("coordinator.db"))
    }

    /// Stops the coordinator, moves its database (with its WAL) into `dir`
    /// (another file system, say) and starts it again there, on its port.
    pub fn move_db(&mut self, dir: &Path) {
        self.stop_coordinator();
        let from = self.db();
        let to = dir.join("coordinator.db");
        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", from.display()));
            if file.exists() {
                let target = PathBuf::from(format!("{}{suffix}", to.display()));
                std::fs::copy(&file, &target).expect("copy the database");
                std::fs::remove_file(&file).expect("remove the old database");
            }
        }
        self.db = Some(to);
        let port = self.addr.rsplit(':').next().expect("address has a port").to_owned();
        self.spawn_coordinator(&format!("127.0.0.1:{port}"));
    }

    /// Kills the coordinator (SIGKILL: no clean shutdown) and starts it again
    /// on the same port and database; the sites reconnect by themselves.
    pub fn restart_coordinator(&mut self) {
        self.stop_coordinator();
        let port = self.addr.rsplit(':').next().expect("address has a port").to_owned();
        self.spawn_coordinator(&format!("127.0.0.1:{port}"));
    }

    /// Kills the coordinator (SIGKILL) and waits for it to exit.
    pub fn stop_coordinator(&mut self) {
        self.kill_site("coordinator");
    }

    /// Starts the participant of one example hospital.
    pub fn add_site(&mut self, site: &str) {
        self.add_site_with(site, &[]);
    }

    /// Starts a participant with extra command-line arguments.
    pub fn add_site_with(&mut self, site: &str, extra: &[&str]) {
        let config = repo().join(format!("examples/heart-disease/sites/{site}.toml"));
        self.add_site_config(site, &config, extra);
    }

    /// Starts a participant from its own config file (its data and schema),
    /// with the federation's address, kit and roster.
    pub fn add_site_config(&mut self, site: &str, config: &Path, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{site}.log"))).expect("log file");
        let child = Command::new(bin("tessera-participant"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--coordinator")
            .arg(&self.addr)
            .arg("--state-dir")
            .arg(self.state_dir(site))
            .arg("--tls-dir")
            .arg(self.state_dir(site))
            .arg("--roster")
            .arg(self.ca().join("roster.toml"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start participant");
        self.children.push((site.to_owned(), child));
    }

    /// A site's kit, which is also its state directory (keys, egress log,
    /// ledger replica).
    pub fn state_dir(&self, site: &str) -> PathBuf {
        self.ca().join("sites").join(site)
    }

    /// The kind of each request a site's egress log recorded, in order.
    pub fn egress_kinds(&self, site: &str) -> Vec<String> {
        std::fs::read_to_string(self.state_dir(site).join("egress.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let record: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                record["kind"].as_str().unwrap_or_default().to_owned()
            })
            .collect()
    }

    /// The log of the coordinator or of a site.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every log of the coordinator and the sites started, each headed by its
    /// name: what a failing test prints.
    pub fn logs(&self) -> String {
        let mut names: Vec<&str> = self.children.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        names
            .iter()
            .map(|n| format!("===== {n}.log =====\n{}", self.log(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs the `tessera` CLI against this coordinator, as the operator.
    pub fn tessera(&self, args: &[&str]) -> Output {
        self.tessera_as(&self.ca().join("operators/lead"), args)
    }

    /// Runs the `tessera` CLI with the kit in `kit`.
    pub fn tessera_as(&self, kit: &Path, args: &[&str]) -> Output {
        Command::new(bin("tessera"))
            .arg("--coordinator")
            .arg(&self.addr)
            .arg("--tls-dir")
            .arg(kit)
            .args(args)
            .output()
            .expect("run tessera")
    }

    /// Writes a job file into the federation's directory.
    pub fn write_job(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write job");
        path
    }

    /// Submits a job file and returns its id.
    pub fn submit(&self, job: &Path) -> u64 {
        let out = self.tessera(&["job", "submit", job.to_str().expect("utf-8 path"), "--json"]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("submit JSON");
        reply["job_id"].as_u64().expect("job id")
    }

    pub fn status(&self, job_id: u64) -> serde_json::Value {
        let out = self.tessera(&["job", "status", &job_id.to_string(), "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Polls the job until its status is one of `states` (bounded: a hung
    /// federation fails the test with the logs instead of hanging CI).
    pub fn wait_for(&self, job_id: u64, states: &[&str]) -> serde_json::Value {
        for _ in 0..1200 {
            let status = self.status(job_id);
            if states.contains(&status["job"]["status"].as_str().unwrap_or("")) {
                return status;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("job {job_id} never reached {states:?}; logs:\n{}", self.logs());
    }
}

impl Federation {
    /// The process id of the coordinator or of a participant.
    pub fn pid(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, child)| child.id())
            .unwrap_or_else(|| panic!("no process `{name}`"))
    }

    /// Kills one participant (as a crash would).
    pub fn kill_site(&mut self, site: &str) {
        self.children.retain_mut(|(name, child)| {
            if name != site {
                return true;
            }
            child.kill().expect("kill process");
            child.wait().expect("reap process");
            false
        });
    }

    /// Stops the coordinator or a participant as systemd would (SIGTERM)
    /// and returns how it exited.
    pub fn terminate(&mut self, name: &str) -> std::process::ExitStatus {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let (_, mut child) = self.children.remove(index);
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {name} failed");
        for _ in 0..600 {
            if let Some(status) = child.try_wait().expect("wait for process") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!("{name} did not exit within 30 s of SIGTERM");
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The example job with some keys replaced (`key = value` lines).
pub fn example_job(overrides: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(repo().join("examples/heart-disease/job.toml")).expect("example job");
    for (key, value) in overrides {
        let prefix = format!("{key} = ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("example job has no `{key}`"))
            .to_owned();
        text = text.replace(&line, &format!("{key} = {value}"));
    }
    text
}

/// The example job made plaintext (`insecure_plaintext = true`, no secure
/// aggregation section), with `overrides` applied.
pub fn plaintext_job(overrides: &[(&str, &str)]) -> String {
    let text = example_job(overrides);
    let start = text
        .find("[secure_aggregation]")
        .expect("example job has a secure_aggregation section");
    let end = text[start..].find("\n\n").map_or(text.len(), |i| start + i + 2);
    let text = format!("{}{}", &text[..start], &text[end..]);
    text.replacen("name = ", "insecure_plaintext = true\nname = ", 1)
}
