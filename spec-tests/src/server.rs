//! Starting the daemon for a test: in-process, or as a child process.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mta::clock::SystemClock;
use mta::config::Config;
pub use mta::daemon::Daemon as RunningDaemon;
use mta::daemon::{Daemon, log_path};
use mta::log::Record;
use queue::Queue;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Polls `f` until it returns `Some`, or panics after [`PATIENCE`] with `what`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the transaction log of a data directory.
pub fn read_log(data_dir: &Path) -> Vec<Record> {
    mta::log::read_dir(&log_path(data_dir)).expect("transaction log readable")
}

/// The daemon, in this process, on port 0.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config: Config,
    /// The STARTTLS listener.
    pub addr: SocketAddr,
    /// The implicit-TLS listener, if the config has one.
    pub tls_addr: Option<SocketAddr>,
    /// The metrics endpoint.
    pub metrics_addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    daemon: Option<Daemon>,
}

impl TestServer {
    /// Starts with this config text (listeners and data_dir are replaced).
    pub fn start(toml: &str) -> TestServer {
        Self::start_with(toml, |_| {})
    }

    /// Starts with this config text, changed by `tweak` before start.
    pub fn start_with(toml: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_with_clock(toml, tweak, Arc::new(SystemClock))
    }

    /// [`TestServer::start_with`] on an injected clock.
    pub fn start_with_clock(
        toml: &str,
        tweak: impl FnOnce(&mut Config),
        clock: Arc<dyn mta::clock::Clock>,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::parse(toml, Path::new("test.toml")).expect("test config parses");
        config.data_dir = dir.path().join("data");
        config.hostname = Some("mx.test".into());
        config.smtp.listen = vec!["127.0.0.1:0".parse().unwrap()];
        if !config.smtp.listen_tls.is_empty() {
            config.smtp.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
        }
        config.metrics.listen = "127.0.0.1:0".parse().unwrap();
        // Reception tests keep what they queue; delivery tests turn this on
        // with their own loopback DNS and sinks (no test reaches the internet).
        if !toml.contains("[delivery]") {
            config.delivery.enabled = false;
        }
        // SPF lookups only where a test serves the DNS for them.
        if !toml.contains("[spf]") {
            config.spf.policy = mta::config::SpfPolicy::Off;
        }
        tweak(&mut config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let daemon = runtime
            .block_on(Daemon::start(&config, clock))
            .expect("daemon starts");
        TestServer {
            addr: daemon.smtp_addrs[0],
            tls_addr: daemon.smtps_addrs.first().copied(),
            metrics_addr: daemon.metrics_addr,
            dir,
            config,
            runtime: Some(runtime),
            daemon: Some(daemon),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn queue(&self) -> &Queue {
        self.daemon.as_ref().expect("running").queue()
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    /// Runs a future on the server's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("running").block_on(f)
    }

    /// The metrics endpoint's text.
    pub fn scrape(&self) -> String {
        scrape(self.metrics_addr)
    }

    pub fn records(&self) -> Vec<Record> {
        read_log(self.data_dir())
    }

    /// Waits until `f` finds what it looks for in the transaction log.
    pub fn wait_for<T>(&self, what: &str, f: impl Fn(&[Record]) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let records = self.records();
            if let Some(v) = f(&records) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}; the log holds:\n{records:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Reception record of a queue ID.
    pub fn reception(&self, queue_id: &str) -> mta::log::Reception {
        self.wait_for(&format!("the Reception record of {queue_id}"), |rs| {
            rs.iter().find_map(|r| match r {
                Record::Reception(rec) if rec.queue_id == queue_id => Some(rec.clone()),
                _ => None,
            })
        })
    }

    /// Waits for the first Rejection record matching `f`.
    pub fn rejection(
        &self,
        what: &str,
        f: impl Fn(&mut mta::log::Rejection) -> bool,
    ) -> mta::log::Rejection {
        self.wait_for(what, |rs| {
            rs.iter().find_map(|r| match r {
                Record::Rejection(rej) => {
                    let mut rej = rej.clone();
                    f(&mut rej).then_some(rej)
                }
                _ => None,
            })
        })
    }

    /// Open connections, as the daemon counts them.
    pub fn connections(&self) -> usize {
        self.daemon.as_ref().expect("running").connections()
    }

    /// Shuts the daemon down and waits for it.
    pub fn stop(&mut self) {
        if let (Some(rt), Some(d)) = (self.runtime.as_ref(), self.daemon.take()) {
            rt.block_on(d.shutdown(Duration::from_secs(5)));
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ID in a `250 2.0.0 Ok: queued as ID` reply.
pub fn queued_id(reply: &crate::client::Reply) -> String {
    assert_eq!(reply.code, 250, "not accepted: {reply}");
    reply
        .text()
        .rsplit(' ')
        .next()
        .expect("queue id in the reply")
        .to_string()
}

/// A free TCP port on 127.0.0.1 (checked by binding it; the daemon binds
/// it again right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The program under test, built from this source tree: cargo builds
/// `spec-mta` for this package's integration tests, into the directory
/// above the test executables (`target/<profile>/`).
pub fn mta_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("spec-mta");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test -p spec-tests`, which builds it",
        bin.display()
    );
    bin
}

/// The real program as a child process, for kill -9 and restart tests.
pub struct DaemonProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub stderr_path: PathBuf,
}

impl DaemonProcess {
    /// Starts `spec-mta serve --config <dir>/mta.toml` with `toml` (whose
    /// `[smtp] listen` and `data_dir` this sets) and waits until it accepts.
    pub fn start(dir: &Path, toml: &str) -> DaemonProcess {
        Self::start_with_env(dir, toml, &[])
    }

    /// [`DaemonProcess::start`] with extra environment variables (e.g.
    /// systemd's `NOTIFY_SOCKET`).
    pub fn start_with_env(dir: &Path, toml: &str, env: &[(&str, &str)]) -> DaemonProcess {
        // A free port can be taken by another test between our check and
        // the daemon's bind: then start again on other ports.
        for _ in 0..4 {
            if let Some(d) = Self::try_start(dir, toml, env) {
                return d;
            }
        }
        Self::try_start(dir, toml, env).expect("the daemon to find free ports")
    }

    /// One start; `None` when a port it was given was taken meanwhile.
    fn try_start(dir: &Path, toml: &str, env: &[(&str, &str)]) -> Option<DaemonProcess> {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let data_dir = dir.join("data");
        let config_path = dir.join("mta.toml");
        let metrics_port = free_port();
        let text = format!(
            "hostname = \"mx.test\"\ndata_dir = \"{}\"\n{toml}\n",
            data_dir.display()
        );
        let text = if text.contains("[delivery]") {
            text
        } else {
            format!("{text}\n[delivery]\nenabled = false\n")
        };
        let text = if text.contains("[spf]") {
            text
        } else {
            format!("{text}\n[spf]\npolicy = \"off\"\n")
        };
        let text = if text.contains("[metrics]") {
            text
        } else {
            format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")
        };
        let text = if text.contains("[smtp]") {
            text.replace("[smtp]", &format!("[smtp]\nlisten = [\"{addr}\"]"))
        } else {
            format!("{text}\n[smtp]\nlisten = [\"{addr}\"]\n")
        };
        std::fs::write(&config_path, text).unwrap();
        let stderr_path = dir.join(format!("stderr-{port}.log"));
        let child = Command::new(mta_bin())
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start the daemon");
        let mut d = DaemonProcess {
            child,
            addr,
            config_path,
            data_dir,
            stderr_path,
        };
        let mut lost_port = false;
        eventually("the daemon to accept connections", || {
            if let Ok(Some(status)) = d.child.try_wait() {
                let stderr = d.stderr();
                if stderr.contains("Address already in use") {
                    lost_port = true;
                    return Some(());
                }
                panic!("the daemon exited with {status}:\n{stderr}");
            }
            std::net::TcpStream::connect(addr).ok().map(|_| ())
        });
        (!lost_port).then_some(d)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we own; no memory is touched.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "sending SIGTERM");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop on SIGTERM:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `spec-mta` with arguments; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(mta_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().expect("CLI output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tenants most tests use: `acme` owns `acme.example` (user `acme-app`,
/// password `s3cret`); `bank` owns `bank.example` (user `bank-app`,
/// password `vault`).
pub fn tenants_toml() -> String {
    static HASHES: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (acme, bank) = HASHES.get_or_init(|| {
        (
            mta::auth::hash_password("s3cret").unwrap(),
            mta::auth::hash_password("vault").unwrap(),
        )
    });
    format!(
        r#"
[[tenants]]
name = "acme"
sender_domains = ["acme.example"]
[[tenants.users]]
name = "acme-app"
password_hash = "{acme}"

[[tenants]]
name = "bank"
sender_domains = ["bank.example"]
[[tenants.users]]
name = "bank-app"
password_hash = "{bank}"
"#
    )
}

/// How a test opens a stopped daemon's queue itself: its path, and the key
/// the daemon generated beside the data directory (when encryption is on).
pub fn store_config(data_dir: &Path) -> queue::QueueConfig {
    let mut config = queue::QueueConfig::new(mta::daemon::queue_path(data_dir));
    let key = mta::queue_keys::default_key_file(data_dir).expect("a key place");
    if key.exists() {
        config.keys = Some(Arc::new(
            queue::QueueKeys::load(&key).expect("the daemon's queue key"),
        ));
    }
    config
}

/// Queue IDs listed by `mta queue list --offline --json`, oldest first.
pub fn offline_queue_ids(data_dir: &Path) -> Vec<String> {
    let dir = data_dir.to_str().expect("UTF-8 path");
    let (code, out, err) = run_cli(
        &["queue", "list", "--offline", "--json", "--data-dir", dir],
        None,
    );
    assert_eq!(code, 0, "queue list failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON from queue list");
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|m| m["id"].as_str().expect("an id").to_string())
        .collect()
}

/// `GET /metrics` over plain HTTP; returns the body.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("metrics response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of one sample in Prometheus text, e.g.
/// `metric(&text, "mta_dkim_signatures_total{algorithm=\"rsa-sha256\"}")`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
