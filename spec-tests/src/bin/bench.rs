//! Reception benchmark: submits N messages of S KB over C connections with
//! STARTTLS and pipelining to a freshly started daemon (its own process, so
//! its CPU time and peak memory are measured alone), and reports accepted
//! messages per second, time to 250, CPU seconds per message and peak RSS.
//!
//! ```text
//! cargo build --release -p mta -p spec-tests
//! target/release/bench --mta target/release/mta --messages 20000 --size-kb 10 --connections 50
//! ```
//!
//! With `--deliver` the same load goes end to end: the daemon delivers
//! every message (`[delivery] relay_host`) to a counting sink in this
//! process, and the report adds delivered messages per second and the time
//! from our 250 to the sink's 250, read from the daemon's transaction log.
//! `--sink-tls` makes the sink offer STARTTLS. `--deferred N` submits N
//! messages to a daemon whose relay host refuses every connection, waits
//! until all N are deferred, and reports the daemon's memory and the
//! store's size.
//!
//! ```text
//! target/release/bench --mta target/release/mta --deliver --messages 20000 --size-kb 10 --connections 20 --dkim rsa
//! target/release/bench --mta target/release/mta --deferred 100000 --size-kb 1
//! ```
//!
//! A benchmark, not a test: run it on a quiet machine, repeat, and compare
//! ratios within one run. `spec-tests/tests/bench_smoke.rs` only checks that
//! it works.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, Parser)]
#[command(about = "Reception and delivery benchmark of the mta")]
struct Args {
    /// The mta program; default: `mta` next to this program.
    #[arg(long)]
    mta: Option<PathBuf>,
    /// Messages in the measured run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Messages sent before measuring (connections, caches, the store warm up).
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Size of each message in KiB.
    #[arg(long, default_value_t = 10)]
    size_kb: usize,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Submit in plaintext (no STARTTLS).
    #[arg(long)]
    no_tls: bool,
    /// Start the daemon with `[queue] encrypt = false` (the default seals
    /// every queued envelope and content), to measure what encryption at
    /// rest costs.
    #[arg(long)]
    no_encrypt: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Keep the data directory (printed) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Load an SMTP server that is already running at this address (a
    /// daemon under a profiler, or another MTA) instead of starting one.
    /// Its CPU and memory are measured when --pid names its process.
    #[arg(long, value_name = "ADDR")]
    server: Option<SocketAddr>,
    /// A process to measure with --server, with all its descendants (their
    /// CPU, reaped ones included, and their summed memory); repeat for
    /// several (Postfix's master and OpenDKIM).
    #[arg(long)]
    pid: Vec<u32>,
    /// The counting sink listens here instead of on a free port. With
    /// --server the report adds delivery: the running server must relay to
    /// this address.
    #[arg(long, value_name = "ADDR")]
    sink: Option<SocketAddr>,
    /// With --server and --sink: a message counts as delivered once the
    /// sink has it and no file is left under these directories (the
    /// server's queue, e.g. Postfix's `active`, `incoming`, `deferred`).
    #[arg(long, value_name = "DIR", requires = "sink")]
    queue_dir: Vec<PathBuf>,
    /// With a sink: keep this many delivered messages of the measured run,
    /// evenly spread, as files in --sample-dir (to verify their
    /// signatures). With --deliver the daemon's DKIM TXT records are
    /// written there too (`dkim-records.txt`).
    #[arg(long, default_value_t = 0, requires = "sample_dir")]
    sample: usize,
    #[arg(long, value_name = "DIR")]
    sample_dir: Option<PathBuf>,
    /// DKIM keys for the daemon to sign with (the messages are From
    /// bench.example): none, rsa (2048), ed25519, or both (dual signing).
    #[arg(long, value_enum, default_value = "none")]
    dkim: DkimArg,
    /// Measure only the signing step, in this process: signatures per
    /// second on one core for messages of --size-kb, next to the raw sign
    /// rate of the same keys.
    #[arg(long)]
    sign_only: bool,
    /// End to end: the daemon delivers every message to a sink on loopback
    /// (`[delivery] relay_host`); adds delivered msgs/s and the time from
    /// our 250 to the sink's 250 to the report.
    #[arg(long, conflicts_with_all = ["server", "sign_only"])]
    deliver: bool,
    /// With --deliver: the sink offers STARTTLS (the daemon's opportunistic
    /// TLS then uses it).
    #[arg(long, requires = "deliver")]
    sink_tls: bool,
    /// With --deliver: receive with the project's test sink
    /// (spec_tests::sink::Sink, which keeps every message in memory)
    /// instead of the counting sink, to compare the two.
    #[arg(long, requires = "deliver")]
    project_sink: bool,
    /// With --deliver: the daemon's max_connections_per_destination
    /// (default: the daemon's default).
    #[arg(long, requires = "deliver")]
    delivery_connections: Option<usize>,
    /// Deferred-memory mode: submit N messages to a daemon whose relay host
    /// refuses every connection (retry_initial 1h), wait until the log has
    /// N TransientFailure records, and report the daemon's RSS and the
    /// store's size. --messages and --warmup do not apply.
    #[arg(long, value_name = "N", conflicts_with_all = ["server", "sign_only", "deliver"])]
    deferred: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DkimArg {
    None,
    Rsa,
    Ed25519,
    Both,
}

/// Writes keys for bench.example into `dir`; returns the config lines,
/// and writes the keys' TXT records (`name<TAB>value` lines) to
/// `dir/dkim-records.txt`.
fn dkim_config(dir: &Path, which: DkimArg) -> anyhow::Result<String> {
    use dkim_keys::{Algorithm, PrivateKey};
    let algs: &[(Algorithm, usize, &str)] = match which {
        DkimArg::None => &[],
        DkimArg::Rsa => &[(Algorithm::RsaSha256, 2048, "rsa")],
        DkimArg::Ed25519 => &[(Algorithm::Ed25519Sha256, 256, "ed")],
        DkimArg::Both => &[
            (Algorithm::RsaSha256, 2048, "rsa"),
            (Algorithm::Ed25519Sha256, 256, "ed"),
        ],
    };
    let (mut toml, mut records) = (String::new(), String::new());
    for (alg, bits, selector) in algs {
        let path = dir.join(format!("bench.example.{selector}.pem"));
        let key = PrivateKey::generate(*alg, *bits)?;
        key.write_new(&path)?;
        records.push_str(&format!(
            "{}\t{}\n",
            dkim_keys::record::record_name(selector, "bench.example"),
            dkim_keys::record::record_value(&key)
        ));
        toml.push_str(&format!(
            "[[dkim.keys]]\ndomain = \"bench.example\"\nselector = \"{selector}\"\nalgorithm = \"{alg}\"\nprivate_key = \"{}\"\n",
            path.display()
        ));
    }
    std::fs::write(dir.join("dkim-records.txt"), records)?;
    Ok(toml)
}

/// The signing micro-benchmark (one core, in this process).
fn sign_only(size_kb: usize) -> anyhow::Result<()> {
    use dkim_keys::{Algorithm, KeyRing, KeySpec, PrivateKey};
    let dir = tempfile::tempdir()?;
    let mut message = message(size_kb);
    message.truncate(message.len() - 3); // the benchmark body ends ".\r\n"
    let header_input = vec![b'h'; 600]; // about the canonical headers of a message
    println!(
        "signing step vs the cryptography it needs (SHA-256 of the body and the key's signature), one core, {size_kb} KiB campaign messages:"
    );
    for (alg, bits, name) in [
        (Algorithm::RsaSha256, 2048, "rsa-sha256 2048"),
        (Algorithm::Ed25519Sha256, 256, "ed25519-sha256"),
    ] {
        let path = dir.path().join(format!("{}.pem", alg.name()));
        PrivateKey::generate(alg, bits)?.write_new(&path)?;
        let ring = KeyRing::load(&[KeySpec {
            domain: "bench.example".into(),
            selector: "s".into(),
            algorithm: alg,
            path,
            active: true,
        }])?;
        let keys = ring.active_for("bench.example");
        // Alternate the two, 10 rounds of 0.5 s each, and take the best
        // round of each: on a shared machine the best is the least disturbed.
        let round = |f: &mut dyn FnMut()| {
            let start = Instant::now();
            let mut n = 0u32;
            while start.elapsed() < Duration::from_millis(500) {
                f();
                n += 1;
            }
            n as f64 / start.elapsed().as_secs_f64()
        };
        // The cryptography one signature of this message needs: SHA-256
        // of the body, and the key's signature over the header data.
        let body = &message[message.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        let mut raw_op = || {
            std::hint::black_box(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body));
            keys[0].key.sign(&header_input).expect("sign");
        };
        let mut step_op = || {
            mta::sign::sign_message(
                &keys,
                "bench.example",
                &message,
                std::time::SystemTime::now(),
                None,
            )
            .expect("sign");
        };
        let mut primitive_op = || {
            keys[0].key.sign(&header_input).expect("sign");
        };
        let (mut raw, mut step, mut primitive) = (0f64, 0f64, 0f64);
        for _ in 0..10 {
            raw = raw.max(round(&mut raw_op));
            step = step.max(round(&mut step_op));
            primitive = primitive.max(round(&mut primitive_op));
        }
        println!(
            "  {name:16} signature alone {primitive:8.0}/s   body hash + signature {raw:8.0}/s   signing step {step:8.0}/s   ratio {:.2}",
            step / raw
        );
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct Report {
    messages: usize,
    size_kb: usize,
    connections: usize,
    tls: bool,
    /// The daemon's queue sealed what it stored (`[queue] encrypt`).
    encrypted: bool,
    seconds: f64,
    accepted_per_second: f64,
    /// From sending MAIL to reading the final 250 (the whole transaction).
    transaction_p50_ms: f64,
    transaction_p99_ms: f64,
    /// From sending the final "." to reading the 250 (storage and fsync).
    after_data_p50_ms: f64,
    after_data_p99_ms: f64,
    server_cpu_seconds: Option<f64>,
    server_cpu_ms_per_message: Option<f64>,
    server_peak_rss_mb: Option<f64>,
    /// Sampled every 500 ms over the measured run: the largest sum of
    /// VmRSS and of Pss over every process of the server (the --pid trees,
    /// or the daemon), and the most processes seen at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<MemoryPeak>,
    client_cpu_seconds: f64,
    /// With --deliver; the server CPU above then covers reception, signing
    /// and delivery of the measured messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<DeliveryReport>,
}

#[derive(Debug, serde::Serialize)]
struct DeliveryReport {
    /// `counting` (this program's) or `project` (spec_tests::sink::Sink).
    sink: &'static str,
    sink_tls: bool,
    delivery_connections: Option<usize>,
    /// From the first submission of the measured run until the sink has
    /// received the last measured message.
    delivered_seconds: f64,
    delivered_per_second: f64,
    /// From our 250 (the Reception record) to the sink's 250 (the Delivery
    /// record's timestamp), measured messages only.
    after_250_p50_ms: f64,
    after_250_p99_ms: f64,
    /// Measured messages whose Delivery record is older than their Reception
    /// record: the sink's 250 came before ours.
    delivered_before_250: usize,
    /// The Delivery records' delay_seconds: from the end of DATA (before
    /// signing and fsync) to the sink's 250.
    delay_p50_ms: f64,
    delay_p99_ms: f64,
    /// Measured messages whose Delivery record says `tls`.
    delivered_over_tls: usize,
    /// CPU of the sink's thread over the measured run (client CPU excludes it).
    sink_cpu_seconds: f64,
}

#[derive(Debug, serde::Serialize)]
struct DeferredReport {
    messages: usize,
    size_kb: usize,
    connections: usize,
    tls: bool,
    encrypted: bool,
    submit_seconds: f64,
    accepted_per_second: f64,
    transaction_p99_ms: f64,
    /// From the first submission until the log has every TransientFailure.
    all_deferred_seconds: f64,
    /// VmRSS 2 s after everything is deferred.
    server_rss_mb: f64,
    server_peak_rss_mb: f64,
    /// Allocated on disk under data_dir/queue, and the files' total length.
    queue_disk_mb: f64,
    queue_files_mb: f64,
    log_disk_mb: f64,
    server_cpu_seconds: f64,
    server_cpu_ms_per_message: f64,
}

impl Report {
    /// The client's side of a run; the server's and delivery's left empty.
    fn of_load(
        args: &Args,
        elapsed: Duration,
        whole: &[Duration],
        after: &[Duration],
        encrypted: bool,
    ) -> Report {
        Report {
            messages: args.messages,
            size_kb: args.size_kb,
            connections: args.connections,
            tls: !args.no_tls,
            encrypted,
            seconds: elapsed.as_secs_f64(),
            accepted_per_second: args.messages as f64 / elapsed.as_secs_f64(),
            transaction_p50_ms: percentile(whole, 0.50),
            transaction_p99_ms: percentile(whole, 0.99),
            after_data_p50_ms: percentile(after, 0.50),
            after_data_p99_ms: percentile(after, 0.99),
            server_cpu_seconds: None,
            server_cpu_ms_per_message: None,
            server_peak_rss_mb: None,
            memory: None,
            client_cpu_seconds: 0.0,
            delivery: None,
        }
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// User plus system CPU seconds of a process, from /proc.
fn process_cpu(pid: u32) -> anyhow::Result<f64> {
    stat_cpu(Path::new(&format!("/proc/{pid}/stat")))
}

/// User plus system CPU seconds from a /proc stat file (process or thread).
fn stat_cpu(path: &Path) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted after the ')'.
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    Ok((utime + stime) / ticks_per_second())
}

/// Every process under /proc: pid → (parent, CPU seconds of the process
/// and of its reaped children: utime + stime + cutime + cstime).
fn all_processes() -> HashMap<u32, (u32, f64)> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // it just ended
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = after.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let ppid = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.insert(
            pid,
            (
                ppid,
                (num(11) + num(12) + num(13) + num(14)) / ticks_per_second(),
            ),
        );
    }
    out
}

/// The given processes and all their descendants.
fn process_tree(roots: &[u32], all: &HashMap<u32, (u32, f64)>) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(ppid, _)) in all {
        children.entry(ppid).or_default().push(pid);
    }
    let (mut seen, mut todo) = (Vec::new(), roots.to_vec());
    while let Some(pid) = todo.pop() {
        if all.contains_key(&pid) && !seen.contains(&pid) {
            seen.push(pid);
            todo.extend(children.get(&pid).into_iter().flatten());
        }
    }
    seen
}

/// CPU seconds of the process trees under `roots`: every live process and
/// every child they have reaped (a Postfix daemon that exited is in its
/// master's cutime/cstime).
fn tree_cpu(roots: &[u32]) -> f64 {
    let all = all_processes();
    process_tree(roots, &all).iter().map(|p| all[p].1).sum()
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct MemoryPeak {
    rss_sum_mb: f64,
    pss_sum_mb: f64,
    processes: usize,
}

/// How often the memory of the server's processes is sampled. Each sample
/// reads every /proc/*/stat and, per server process, its status and
/// smaps_rollup: with Postfix's 70 processes that costs the benchmark
/// about 10 ms of CPU, which at 100 ms was 0.1 of a core taken from the
/// server on this 2-core machine.
const MEMORY_SAMPLE: Duration = Duration::from_millis(500);

/// Samples the summed memory of process trees every [`MEMORY_SAMPLE`] until
/// stopped.
struct MemorySampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<MemoryPeak>,
}

impl MemorySampler {
    fn start(roots: Vec<u32>) -> anyhow::Result<MemorySampler> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-memory".into())
            .spawn(move || {
                let mut peak = MemoryPeak::default();
                loop {
                    let pids = process_tree(&roots, &all_processes());
                    let (mut rss, mut pss) = (0.0, 0.0);
                    for pid in &pids {
                        rss += status_mb(*pid, "VmRSS:").unwrap_or(0.0);
                        pss += smaps_pss_mb(*pid).unwrap_or(0.0);
                    }
                    peak.rss_sum_mb = peak.rss_sum_mb.max(rss);
                    peak.pss_sum_mb = peak.pss_sum_mb.max(pss);
                    peak.processes = peak.processes.max(pids.len());
                    if stopped.load(Ordering::Relaxed) {
                        return peak;
                    }
                    std::thread::sleep(MEMORY_SAMPLE);
                }
            })?;
        Ok(MemorySampler { stop, thread })
    }

    fn finish(self) -> MemoryPeak {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A process's proportional set size (shared pages divided among the
/// processes mapping them), from /proc/PID/smaps_rollup, in MiB.
fn smaps_pss_mb(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// Whether any file is left under these directories.
fn any_file_under(dirs: &[PathBuf]) -> bool {
    fn walk(dir: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path()),
            Ok(_) => true,
            Err(_) => false,
        })
    }
    dirs.iter().any(|d| walk(d))
}

/// Waits until no file is left under `dirs`; when that was seen.
fn wait_until_empty(dirs: &[PathBuf]) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + STALL;
    while any_file_under(dirs) {
        if Instant::now() > deadline {
            bail!("files still queued under {dirs:?} after {STALL:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Instant::now())
}

/// CPU seconds of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue; // the thread just ended
        };
        if name.starts_with(prefix) {
            total += stat_cpu(&path.join("stat")).unwrap_or(0.0);
        }
    }
    Ok(total)
}

fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    status_mb(pid, "VmHWM:")
}

/// A memory figure of /proc/PID/status (`VmHWM:`, `VmRSS:`) in MiB.
fn status_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("{field} value"))?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Bytes a directory tree takes on disk (allocated blocks), and the total
/// length of its files.
fn disk_usage(dir: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut blocks, mut len) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (b, l) = disk_usage(&entry.path())?;
            blocks += b;
            len += l;
        } else {
            blocks += meta.blocks() * 512;
            len += meta.len();
        }
    }
    Ok((blocks, len))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Like [`percentile`], of seconds (which may be negative), in ms.
fn percentile_s(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] * 1000.0
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts the daemon; `delivery` is the body of its `[delivery]` section.
fn start_daemon(
    mta: &Path,
    connections: usize,
    dkim: DkimArg,
    delivery: &str,
    encrypt: bool,
) -> anyhow::Result<Daemon> {
    let dir = tempfile::tempdir()?;
    let extra = dkim_config(dir.path(), dkim)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = dir.path().join("mta.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"bench.test\"\ndata_dir = \"{}\"\n[dkim]\n{}[smtp]\nlisten = [\"{addr}\"]\nmax_connections_per_ip = {}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[spf]\npolicy = \"off\"\n[queue]\nencrypt = {encrypt}\n[delivery]\n{delivery}",
            dir.path().join("data").display(),
            extra,
            connections + 10
        ),
    )?;
    let child = Command::new(mta)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env(
            "MTA_LOG",
            std::env::var("MTA_LOG").unwrap_or_else(|_| "warn,mta::daemon=info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", mta.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("the daemon did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Daemon { child, addr, dir })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn read_reply<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    line: &mut String,
) -> anyhow::Result<u16> {
    loop {
        line.clear();
        if r.read_line(line).await? == 0 {
            bail!("connection closed");
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.get(..3).context("short reply")?.parse()?);
        }
    }
}

async fn expect<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    line: &mut String,
    code: u16,
) -> anyhow::Result<()> {
    let got = read_reply(r, line).await?;
    if got != code {
        bail!("expected {code}, got {}", line.trim_end());
    }
    Ok(())
}

/// One client connection: sends messages while the shared counter lasts.
async fn client(
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    body: Arc<Vec<u8>>,
    remaining: Arc<AtomicUsize>,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut line = String::new();
    let mut r = BufReader::new(tcp);
    expect(&mut r, &mut line, 220).await?;
    r.get_mut().write_all(b"EHLO bench.client\r\n").await?;
    expect(&mut r, &mut line, 250).await?;
    let stream: Box<dyn Io> = match tls {
        Some(connector) => {
            r.get_mut().write_all(b"STARTTLS\r\n").await?;
            expect(&mut r, &mut line, 220).await?;
            let tcp = r.into_inner();
            let tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            let mut r = BufReader::new(tls);
            r.get_mut().write_all(b"EHLO bench.client\r\n").await?;
            expect(&mut r, &mut line, 250).await?;
            Box::new(r.into_inner())
        }
        None => Box::new(r.into_inner()),
    };
    let mut r = BufReader::with_capacity(16 * 1024, stream);
    let (mut whole, mut after_data) = (Vec::new(), Vec::new());
    let envelope = b"MAIL FROM:<news@bench.example>\r\nRCPT TO:<someone@dest.example>\r\nDATA\r\n";
    while remaining
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        let start = Instant::now();
        r.get_mut().write_all(envelope).await?;
        expect(&mut r, &mut line, 250).await?;
        expect(&mut r, &mut line, 250).await?;
        expect(&mut r, &mut line, 354).await?;
        r.get_mut().write_all(&body).await?;
        let dot = Instant::now();
        expect(&mut r, &mut line, 250).await?;
        let end = Instant::now();
        whole.push(end - start);
        after_data.push(end - dot);
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    Ok((whole, after_data))
}

/// A campaign-like message of about `size_kb` KiB, dot-stuffed and
/// terminated, ready to send after 354: multipart/alternative with a text
/// part and an indented HTML part in quoted-printable, as ESPs send them.
fn message(size_kb: usize) -> Vec<u8> {
    let mut m = String::from(
        "From: Acme News <news@bench.example>\r\nTo: <someone@dest.example>\r\nSubject: Your November offers\r\nDate: Sun, 22 Nov 2026 12:00:00 +0000\r\nMessage-ID: <bench@bench.example>\r\nMIME-Version: 1.0\r\nList-Unsubscribe: <https://bench.example/u/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
    );
    let text = "Dear customer, this month we have picked three offers for you. Follow the link=\r\n to see them, or reply to this message if you have a question.\r\n\r\n";
    let html_rows = [
        "    <tr>\r\n",
        "      <td class=3D\"content\" style=3D\"padding: 16px; font-family: Arial, sans-serif=\r\n; font-size: 14px; color: #333333;\">\r\n",
        "        <p>Dear customer, this month we have picked three offers for you.</p>\r\n",
        "        <a href=3D\"https://bench.example/offers?utm_source=3Dnewsletter&amp;utm=\r\n_campaign=3Dnov\">See the offers</a>\r\n",
        "      </td>\r\n",
        "    </tr>\r\n",
    ];
    let target = size_kb * 1024;
    while m.len() < target / 3 {
        m.push_str(text);
    }
    m.push_str("--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<html>\r\n  <body>\r\n  <table width=3D\"600\">\r\n");
    'outer: loop {
        for row in html_rows {
            if m.len() >= target {
                break 'outer;
            }
            m.push_str(row);
        }
    }
    m.push_str("  </table>\r\n  </body>\r\n</html>\r\n--b1--\r\n.\r\n");
    m.into_bytes()
}

async fn run(
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    body: Arc<Vec<u8>>,
    n: usize,
    c: usize,
) -> anyhow::Result<(Duration, Vec<Duration>, Vec<Duration>)> {
    let remaining = Arc::new(AtomicUsize::new(n));
    let started = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| tokio::spawn(client(addr, tls.clone(), body.clone(), remaining.clone())))
        .collect();
    let (mut whole, mut after) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for t in tasks {
        let (w, a) = t.await??;
        whole.extend(w);
        after.extend(a);
    }
    let elapsed = started.elapsed();
    if whole.len() != n {
        bail!("{} of {n} messages were accepted", whole.len());
    }
    whole.sort();
    after.sort();
    Ok((elapsed, whole, after))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sign_only {
        return sign_only(args.size_kb);
    }
    if let Some(n) = args.deferred {
        return deferred(&args, n);
    }
    if args.deliver {
        return deliver(&args);
    }
    if let (Some(server), Some(sink)) = (args.server, args.sink) {
        return deliver_external(&args, server, sink);
    }
    let daemon = match args.server {
        Some(_) => None,
        None => Some(start_daemon(
            &mta_program(&args)?,
            args.connections,
            args.dkim,
            "enabled = false\n",
            !args.no_encrypt,
        )?),
    };
    let addr = args
        .server
        .or(daemon.as_ref().map(|d| d.addr))
        .expect("an address");
    let pids: Vec<u32> = match &daemon {
        Some(d) => vec![d.child.id()],
        None => args.pid.clone(),
    };
    let tls = (!args.no_tls).then(|| TlsConnector::from(spec_tests::client::tls_config()));
    let body = Arc::new(message(args.size_kb));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    if args.warmup > 0 {
        runtime.block_on(run(
            addr,
            tls.clone(),
            body.clone(),
            args.warmup,
            args.connections,
        ))?;
    }
    let memory = (daemon.is_none() && !pids.is_empty())
        .then(|| MemorySampler::start(pids.clone()))
        .transpose()?;
    let cpu_before = tree_cpu(&pids);
    let client_before = self_cpu();
    let (elapsed, whole, after) =
        runtime.block_on(run(addr, tls, body, args.messages, args.connections))?;
    let server_cpu = (!pids.is_empty()).then(|| tree_cpu(&pids) - cpu_before);
    let sampler_cpu = threads_cpu("bench-memory")?;
    let memory = memory.map(MemorySampler::finish);
    let client_cpu = self_cpu() - client_before - sampler_cpu;

    if let Some(d) = &daemon {
        // Every accepted message has its Reception record.
        let log_dir = d.dir.path().join("data/log");
        let expected = args.warmup + args.messages;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let receptions = mta::log::read_dir(&log_dir)?
                .iter()
                .filter(|r| matches!(r, mta::log::Record::Reception(_)))
                .count();
            if receptions == expected {
                break;
            }
            if Instant::now() > deadline {
                bail!("{receptions} Reception records for {expected} accepted messages");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let report = Report {
        server_cpu_seconds: server_cpu,
        server_cpu_ms_per_message: server_cpu.map(|c| c * 1000.0 / args.messages as f64),
        server_peak_rss_mb: match &daemon {
            Some(d) => Some(peak_rss_mb(d.child.id())?),
            None => memory.map(|m| m.rss_sum_mb),
        },
        memory,
        client_cpu_seconds: client_cpu,
        ..Report::of_load(
            &args,
            elapsed,
            &whole,
            &after,
            !args.no_encrypt && args.server.is_none(),
        )
    };
    if let Some(d) = daemon {
        finish(d, args.keep);
    }
    print_report(&report, args.json)
}

/// Stops the daemon, or leaves it running with its data kept (--keep).
fn finish(d: Daemon, keep: bool) {
    if keep {
        let kept = d.dir.path().to_path_buf();
        std::mem::forget(d);
        eprintln!("data kept in {}", kept.display());
    }
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.3}{unit}"));
        println!(
            "{} msgs of {} KiB over {} connections ({}, queue {}): {:.0} msgs/s accepted in {:.2} s\n\
             time to 250: transaction p50 {:.2} ms, p99 {:.2} ms; after data p50 {:.2} ms, p99 {:.2} ms\n\
             server CPU {} = {}/msg; peak RSS {}; client CPU {:.2} s",
            report.messages,
            report.size_kb,
            report.connections,
            if report.tls { "STARTTLS" } else { "plaintext" },
            if report.encrypted {
                "encrypted"
            } else {
                "in clear"
            },
            report.accepted_per_second,
            report.seconds,
            report.transaction_p50_ms,
            report.transaction_p99_ms,
            report.after_data_p50_ms,
            report.after_data_p99_ms,
            opt(report.server_cpu_seconds, " s"),
            opt(report.server_cpu_ms_per_message, " ms"),
            opt(report.server_peak_rss_mb, " MiB"),
            report.client_cpu_seconds
        );
        if let Some(d) = &report.delivery {
            println!(
                "delivered to the {} sink ({}{}): {:.0} msgs/s in {:.2} s, {} over TLS\n\
                 250 to remote 250: p50 {:.2} ms, p99 {:.2} ms ({} delivered before our 250); from end of DATA: p50 {:.2} ms, p99 {:.2} ms; sink CPU {:.2} s",
                d.sink,
                if d.sink_tls { "STARTTLS" } else { "plaintext" },
                d.delivery_connections
                    .map_or(String::new(), |n| format!(", {n} connections")),
                d.delivered_per_second,
                d.delivered_seconds,
                d.delivered_over_tls,
                d.after_250_p50_ms,
                d.after_250_p99_ms,
                d.delivered_before_250,
                d.delay_p50_ms,
                d.delay_p99_ms,
                d.sink_cpu_seconds
            );
        }
    }
    Ok(())
}

/// The mta program to start: --mta, or `mta` next to this program.
fn mta_program(args: &Args) -> anyhow::Result<PathBuf> {
    let mta = match &args.mta {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("mta"),
    };
    if !mta.exists() {
        bail!(
            "{} not found: build it (`cargo build --release -p mta`) or pass --mta",
            mta.display()
        );
    }
    Ok(mta)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Waiting gives up when nothing moved for this long.
const STALL: Duration = Duration::from_secs(60);

/// `--deliver`: the load of the reception benchmark, delivered end to end.
fn deliver(args: &Args) -> anyhow::Result<()> {
    let mta = mta_program(args)?;
    let sink = if args.project_sink {
        BenchSink::Project(spec_tests::sink::Sink::start(
            "127.0.0.1:0".parse()?,
            spec_tests::sink::SinkConfig {
                starttls: args.sink_tls,
                ..Default::default()
            },
        ))
    } else {
        BenchSink::Counting(CountingSink::start(
            args.sink_tls,
            args.sink,
            Sampling::from_args(args)?,
        )?)
    };
    let mut delivery = format!("relay_host = \"{}\"\n", sink.addr());
    if let Some(n) = args.delivery_connections {
        delivery.push_str(&format!("max_connections_per_destination = {n}\n"));
    }
    let daemon = start_daemon(
        &mta,
        args.connections,
        args.dkim,
        &delivery,
        !args.no_encrypt,
    )?;
    let pid = daemon.child.id();
    if let Some(dir) = &args.sample_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::copy(
            daemon.dir.path().join("dkim-records.txt"),
            dir.join("dkim-records.txt"),
        )?;
    }
    let tls = (!args.no_tls).then(|| TlsConnector::from(spec_tests::client::tls_config()));
    let body = Arc::new(message(args.size_kb));
    let runtime = runtime()?;
    let mut log = LogTail::new(daemon.dir.path().join("data/log"), true);

    // The warm-up is delivered, and its outcomes settled, before measuring.
    if args.warmup > 0 {
        runtime.block_on(run(
            daemon.addr,
            tls.clone(),
            body.clone(),
            args.warmup,
            args.connections,
        ))?;
        sink.wait_for(args.warmup)?;
        log.wait_for_deliveries(args.warmup)?;
    }
    let total = args.warmup + args.messages;
    let memory = MemorySampler::start(vec![pid])?;
    let cpu_before = tree_cpu(&[pid]);
    let client_before = self_cpu();
    let sink_before = threads_cpu(sink.thread_name())?;
    let started = Instant::now();
    let (elapsed, whole, after) =
        runtime.block_on(run(daemon.addr, tls, body, args.messages, args.connections))?;
    let last = sink.wait_for(total)?;
    let delivered_in = last.saturating_duration_since(started);
    // The daemon's work ends when the outcomes are stored and logged.
    log.wait_for_deliveries(total)?;
    let server_cpu = tree_cpu(&[pid]) - cpu_before;
    // The sampler's CPU is neither the client's nor the server's.
    let sampler_cpu = threads_cpu("bench-memory")?;
    let memory = memory.finish();
    let sink_cpu = threads_cpu(sink.thread_name())? - sink_before;
    let client_cpu = self_cpu() - client_before - sink_cpu - sampler_cpu;
    let received = sink.count();
    if received != total {
        bail!("the sink received {received} messages for {total} submitted");
    }
    if log.seen.receptions != total {
        bail!(
            "{} Reception records for {total} accepted messages",
            log.seen.receptions
        );
    }

    // Matched only now: a Reception record can come after the Delivery.
    let measured = &log.seen.deliveries[args.warmup..];
    let mut after_250 = Vec::with_capacity(measured.len());
    for d in measured {
        let received = log
            .seen
            .received_at
            .get(&d.queue_id)
            .with_context(|| format!("no Reception record for {}", d.queue_id))?;
        after_250.push((d.at - received) as f64 / 1e9);
    }
    after_250.sort_by(f64::total_cmp);
    let mut delay: Vec<f64> = measured.iter().map(|d| d.delay).collect();
    delay.sort_by(f64::total_cmp);
    let report = Report {
        server_cpu_seconds: Some(server_cpu),
        server_cpu_ms_per_message: Some(server_cpu * 1000.0 / args.messages as f64),
        server_peak_rss_mb: Some(peak_rss_mb(pid)?),
        memory: Some(memory),
        client_cpu_seconds: client_cpu,
        delivery: Some(DeliveryReport {
            sink: sink.kind(),
            sink_tls: args.sink_tls,
            delivery_connections: args.delivery_connections,
            delivered_seconds: delivered_in.as_secs_f64(),
            delivered_per_second: args.messages as f64 / delivered_in.as_secs_f64(),
            after_250_p50_ms: percentile_s(&after_250, 0.50),
            after_250_p99_ms: percentile_s(&after_250, 0.99),
            delivered_before_250: after_250.iter().filter(|&&s| s < 0.0).count(),
            delay_p50_ms: percentile_s(&delay, 0.50),
            delay_p99_ms: percentile_s(&delay, 0.99),
            delivered_over_tls: measured.iter().filter(|d| d.tls).count(),
            sink_cpu_seconds: sink_cpu,
        }),
        ..Report::of_load(
            args,
            elapsed,
            &whole,
            &after,
            !args.no_encrypt && args.server.is_none(),
        )
    };
    finish(daemon, args.keep);
    drop(sink);
    print_report(&report, args.json)
}

/// `--server ADDR --sink ADDR`: the load of `--deliver`, to an SMTP server
/// that is already running and relays to our counting sink at `sink_addr`
/// (Postfix). Its CPU and memory are those of the --pid process trees.
fn deliver_external(args: &Args, server: SocketAddr, sink_addr: SocketAddr) -> anyhow::Result<()> {
    let sampling = Sampling::from_args(args)?;
    let sink = CountingSink::start(args.sink_tls, Some(sink_addr), sampling)?;
    let tls = (!args.no_tls).then(|| TlsConnector::from(spec_tests::client::tls_config()));
    let body = Arc::new(message(args.size_kb));
    let runtime = runtime()?;
    if any_file_under(&args.queue_dir) {
        bail!("the server's queue ({:?}) is not empty", args.queue_dir);
    }
    if args.warmup > 0 {
        runtime.block_on(run(
            server,
            tls.clone(),
            body.clone(),
            args.warmup,
            args.connections,
        ))?;
        sink.wait_for(args.warmup)?;
        wait_until_empty(&args.queue_dir)?;
    }
    let total = args.warmup + args.messages;
    let memory = MemorySampler::start(args.pid.clone())?;
    let cpu_before = tree_cpu(&args.pid);
    let client_before = self_cpu();
    let sink_before = threads_cpu("bench-sink")?;
    let started = Instant::now();
    let (elapsed, whole, after) =
        runtime.block_on(run(server, tls, body, args.messages, args.connections))?;
    let last = sink.wait_for(total)?;
    // Delivered means the sink has it and the server has let it go.
    let emptied = wait_until_empty(&args.queue_dir)?;
    let delivered_in = if args.queue_dir.is_empty() {
        last
    } else {
        last.max(emptied)
    }
    .saturating_duration_since(started);
    let server_cpu = (!args.pid.is_empty()).then(|| tree_cpu(&args.pid) - cpu_before);
    // The sampler's CPU is neither the client's nor the server's.
    let sampler_cpu = threads_cpu("bench-memory")?;
    let memory = memory.finish();
    let sink_cpu = threads_cpu("bench-sink")? - sink_before;
    let client_cpu = self_cpu() - client_before - sink_cpu - sampler_cpu;
    // A message delivered twice would show here.
    let received = sink.state().0;
    if received != total {
        bail!("the sink received {received} messages for {total} submitted");
    }
    let report = Report {
        server_cpu_seconds: server_cpu,
        server_cpu_ms_per_message: server_cpu.map(|c| c * 1000.0 / args.messages as f64),
        server_peak_rss_mb: (!args.pid.is_empty()).then_some(memory.rss_sum_mb),
        memory: (!args.pid.is_empty()).then_some(memory),
        client_cpu_seconds: client_cpu,
        delivery: Some(DeliveryReport {
            sink: "counting",
            sink_tls: args.sink_tls,
            delivery_connections: None,
            delivered_seconds: delivered_in.as_secs_f64(),
            delivered_per_second: args.messages as f64 / delivered_in.as_secs_f64(),
            // The server's own log would tell; not read here.
            after_250_p50_ms: f64::NAN,
            after_250_p99_ms: f64::NAN,
            delivered_before_250: 0,
            delay_p50_ms: f64::NAN,
            delay_p99_ms: f64::NAN,
            delivered_over_tls: 0,
            sink_cpu_seconds: sink_cpu,
        }),
        ..Report::of_load(args, elapsed, &whole, &after, false)
    };
    drop(sink);
    print_report(&report, args.json)
}

/// `--deferred N`: how much the daemon holds for N deferred messages.
fn deferred(args: &Args, n: usize) -> anyhow::Result<()> {
    let mta = mta_program(args)?;
    // A port nothing listens on: every attempt fails at connect and defers.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let delivery = format!("relay_host = \"127.0.0.1:{port}\"\nretry_initial = \"1h\"\n");
    let daemon = start_daemon(
        &mta,
        args.connections,
        args.dkim,
        &delivery,
        !args.no_encrypt,
    )?;
    let pid = daemon.child.id();
    let data = daemon.dir.path().join("data");
    let tls = (!args.no_tls).then(|| TlsConnector::from(spec_tests::client::tls_config()));
    let body = Arc::new(message(args.size_kb));
    let runtime = runtime()?;
    let mut log = LogTail::new(data.join("log"), false);

    let cpu_before = process_cpu(pid)?;
    let started = Instant::now();
    let submission = runtime.spawn(run(daemon.addr, tls, body, n, args.connections));
    let (mut last_count, mut last_change) = (0, Instant::now());
    let mut next_progress = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        log.poll()?;
        let seen = &log.seen;
        if seen.failed > 0 || !seen.deliveries.is_empty() {
            bail!(
                "expected only deferrals, got {} deliveries and {} failures ({})",
                seen.deliveries.len(),
                seen.failed,
                seen.first_failure.as_deref().unwrap_or("")
            );
        }
        if seen.transient >= n && submission.is_finished() {
            break;
        }
        if Instant::now() >= next_progress {
            eprintln!(
                "{:6.0} s: {} accepted, {} deferred, daemon RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                seen.receptions,
                seen.transient,
                status_mb(pid, "VmRSS:")?
            );
            next_progress += Duration::from_secs(10);
        }
        let progress = seen.receptions + seen.transient;
        if progress != last_count {
            (last_count, last_change) = (progress, Instant::now());
        } else if last_change.elapsed() > STALL && submission.is_finished() {
            // The client's error, if it had one, says more.
            runtime.block_on(submission)??;
            bail!(
                "stuck at {} deferred of {n} ({} accepted)",
                seen.transient,
                seen.receptions
            );
        }
    }
    let all_deferred = started.elapsed();
    let (elapsed, whole, _) = runtime.block_on(submission)??;
    let server_cpu = process_cpu(pid)? - cpu_before;
    if log.seen.receptions != n || log.seen.transient != n {
        bail!(
            "{} Reception and {} TransientFailure records for {n} messages",
            log.seen.receptions,
            log.seen.transient
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let (queue_disk, queue_files) = disk_usage(&data.join("queue"))?;
    let report = DeferredReport {
        messages: n,
        size_kb: args.size_kb,
        connections: args.connections,
        tls: !args.no_tls,
        encrypted: !args.no_encrypt && args.server.is_none(),
        submit_seconds: elapsed.as_secs_f64(),
        accepted_per_second: n as f64 / elapsed.as_secs_f64(),
        transaction_p99_ms: percentile(&whole, 0.99),
        all_deferred_seconds: all_deferred.as_secs_f64(),
        server_rss_mb: status_mb(pid, "VmRSS:")?,
        server_peak_rss_mb: peak_rss_mb(pid)?,
        queue_disk_mb: mib(queue_disk),
        queue_files_mb: mib(queue_files),
        log_disk_mb: mib(disk_usage(&data.join("log"))?.0),
        server_cpu_seconds: server_cpu,
        server_cpu_ms_per_message: server_cpu * 1000.0 / n as f64,
    };
    finish(daemon, args.keep);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} msgs of {} KiB deferred, submitted over {} connections ({}): {:.0} msgs/s accepted in {:.1} s (p99 {:.1} ms), all deferred after {:.1} s\n\
             daemon RSS {:.0} MiB, peak {:.0} MiB; queue on disk {:.0} MiB (files {:.0} MiB), log {:.0} MiB; server CPU {:.1} s = {:.3} ms/msg",
            report.messages,
            report.size_kb,
            report.connections,
            if report.tls { "STARTTLS" } else { "plaintext" },
            report.accepted_per_second,
            report.submit_seconds,
            report.transaction_p99_ms,
            report.all_deferred_seconds,
            report.server_rss_mb,
            report.server_peak_rss_mb,
            report.queue_disk_mb,
            report.queue_files_mb,
            report.log_disk_mb,
            report.server_cpu_seconds,
            report.server_cpu_ms_per_message
        );
    }
    Ok(())
}

/// What the daemon's transaction log says so far.
#[derive(Default)]
struct LogSeen {
    receptions: usize,
    /// When our 250 went out (the Reception record, ns since the epoch),
    /// by queue ID; kept with `detail` only.
    received_at: HashMap<String, i128>,
    /// The Delivery records, in the order written.
    deliveries: Vec<Delivered>,
    transient: usize,
    /// Bounce and Expiration records.
    failed: usize,
    /// The first failure record, for the error message.
    first_failure: Option<String>,
}

struct Delivered {
    queue_id: String,
    /// The Delivery record's time (ns since the epoch): the sink's 250.
    at: i128,
    delay: f64,
    tls: bool,
}

impl LogSeen {
    fn line(&mut self, line: &str, detail: bool) -> anyhow::Result<()> {
        use mta::log::Record;
        let is = |pattern: &str| line.contains(pattern);
        if is(r#""type":"Reception""#) {
            self.receptions += 1;
            if detail && let Record::Reception(r) = serde_json::from_str(line)? {
                self.received_at
                    .insert(r.queue_id, r.timestamp.unix_timestamp_nanos());
            }
        } else if is(r#""type":"Delivery""#) {
            if let Record::Delivery(a) = serde_json::from_str(line)? {
                self.deliveries.push(Delivered {
                    at: a.timestamp.unix_timestamp_nanos(),
                    queue_id: a.queue_id,
                    delay: a.delay_seconds,
                    tls: a.tls.as_deref() == Some("tls"),
                });
            }
        } else {
            let transient = is(r#""type":"TransientFailure""#);
            let failed = is(r#""type":"Bounce""#) || is(r#""type":"Expiration""#);
            self.transient += usize::from(transient);
            self.failed += usize::from(failed);
            if (transient || failed) && self.first_failure.is_none() {
                let record: Record = serde_json::from_str(line)?;
                let reply = &record.attempt().context("an attempt")?.reply;
                self.first_failure = Some(format!("{} {}", reply.code, reply.text));
            }
        }
        Ok(())
    }
}

/// Follows the daemon's transaction log files as they grow.
struct LogTail {
    dir: PathBuf,
    /// Per file: bytes read, and a line not yet complete.
    files: BTreeMap<PathBuf, (u64, Vec<u8>)>,
    /// Keep reception times, to match them with deliveries.
    detail: bool,
    seen: LogSeen,
}

impl LogTail {
    fn new(dir: PathBuf, detail: bool) -> LogTail {
        LogTail {
            dir,
            files: BTreeMap::new(),
            detail,
            seen: LogSeen::default(),
        }
    }

    /// Reads what was written since the last poll.
    fn poll(&mut self) -> anyhow::Result<()> {
        let mut paths = Vec::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry?.path();
                    if path.extension().is_some_and(|x| x == "jsonl") {
                        paths.push(path);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        paths.sort();
        let mut chunk = vec![0u8; 1 << 20];
        for path in paths {
            let (offset, partial) = self.files.entry(path.clone()).or_default();
            let mut file = std::fs::File::open(&path)?;
            file.seek(SeekFrom::Start(*offset))?;
            loop {
                let n = file.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                *offset += n as u64;
                partial.extend_from_slice(&chunk[..n]);
                let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
                    continue;
                };
                for line in partial[..end].split(|&b| b == b'\n') {
                    if !line.is_empty() {
                        self.seen.line(std::str::from_utf8(line)?, self.detail)?;
                    }
                }
                partial.drain(..=end);
            }
        }
        Ok(())
    }

    /// Waits until the log has `n` Delivery records; any failure record is
    /// an error (a deferred message would wait minutes for its retry).
    fn wait_for_deliveries(&mut self, n: usize) -> anyhow::Result<()> {
        let (mut last, mut since) = (0, Instant::now());
        loop {
            self.poll()?;
            let seen = &self.seen;
            if seen.transient + seen.failed > 0 {
                bail!(
                    "{} TransientFailure and {} Bounce/Expiration records (first: {})",
                    seen.transient,
                    seen.failed,
                    seen.first_failure.as_deref().unwrap_or("")
                );
            }
            if seen.deliveries.len() >= n {
                return Ok(());
            }
            if seen.deliveries.len() != last {
                (last, since) = (seen.deliveries.len(), Instant::now());
            } else if since.elapsed() > STALL {
                bail!("{last} Delivery records of {n}, none for {STALL:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where the daemon delivers to.
enum BenchSink {
    Counting(CountingSink),
    Project(spec_tests::sink::Sink),
}

impl BenchSink {
    fn addr(&self) -> SocketAddr {
        match self {
            BenchSink::Counting(s) => s.addr,
            BenchSink::Project(s) => s.addr,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            BenchSink::Counting(_) => "counting",
            BenchSink::Project(_) => "project",
        }
    }

    /// The name (prefix) of the sink's thread, to measure its CPU.
    fn thread_name(&self) -> &'static str {
        match self {
            BenchSink::Counting(_) => "bench-sink",
            BenchSink::Project(_) => "smtp-sink",
        }
    }

    fn count(&self) -> usize {
        match self {
            BenchSink::Counting(s) => s.state().0,
            BenchSink::Project(s) => s.messages().len(),
        }
    }

    /// Waits until `n` messages in all have arrived; when the last came.
    fn wait_for(&self, n: usize) -> anyhow::Result<Instant> {
        match self {
            BenchSink::Counting(s) => s.wait_for(n),
            BenchSink::Project(s) => {
                // It clones every message it holds when it returns, and
                // panics on the timeout.
                s.wait_for_messages(n, Duration::from_secs(600));
                Ok(Instant::now())
            }
        }
    }
}

/// A receiving SMTP server that only counts: PIPELINING, optional
/// STARTTLS (self-signed), DATA. Its own thread and single-threaded
/// runtime, so its CPU is measured apart from the client's.
struct CountingSink {
    addr: SocketAddr,
    shared: Arc<Mutex<Counted>>,
}

#[derive(Default)]
struct Counted {
    messages: usize,
    last: Option<Instant>,
    /// DATA commands seen, numbering the messages for sampling.
    data_started: usize,
}

/// Which messages the sink keeps (by the order of their DATA commands,
/// from 0), and where.
struct Sampling {
    wanted: std::collections::BTreeSet<usize>,
    dir: PathBuf,
}

impl Sampling {
    /// What --sample and --sample-dir ask for, over the measured run.
    fn from_args(args: &Args) -> anyhow::Result<Option<Sampling>> {
        match &args.sample_dir {
            Some(dir) if args.sample > 0 => Ok(Some(Sampling::spread(
                args.sample,
                args.warmup,
                args.messages,
                dir,
            )?)),
            _ => Ok(None),
        }
    }

    /// `n` messages evenly spread over the `messages` after `skip`.
    fn spread(n: usize, skip: usize, messages: usize, dir: &Path) -> anyhow::Result<Sampling> {
        std::fs::create_dir_all(dir)?;
        let n = n.min(messages);
        let wanted = (0..n).map(|i| skip + i * messages / n).collect();
        Ok(Sampling {
            wanted,
            dir: dir.to_path_buf(),
        })
    }

    /// Writes one kept message: its content, dot-unstuffed (RFC 5321
    /// §4.5.2), without the terminating ".".
    fn write(&self, index: usize, stuffed: &[u8]) {
        let mut out = Vec::with_capacity(stuffed.len());
        for line in stuffed.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        let path = self.dir.join(format!("msg-{index:07}.eml"));
        if let Err(e) = std::fs::write(&path, out) {
            eprintln!("sink: writing {}: {e}", path.display());
        }
    }
}

impl CountingSink {
    fn start(
        starttls: bool,
        at: Option<SocketAddr>,
        sampling: Option<Sampling>,
    ) -> anyhow::Result<CountingSink> {
        let listener = std::net::TcpListener::bind(at.unwrap_or("127.0.0.1:0".parse()?))
            .with_context(|| format!("the sink's address {at:?}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let acceptor = starttls.then(self_signed_acceptor).transpose()?;
        let shared = Arc::new(Mutex::new(Counted::default()));
        let counted = shared.clone();
        let sampling = sampling.map(Arc::new);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Lives until the program ends.
        std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("sink listener");
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        tokio::spawn(sink_session(
                            tcp,
                            acceptor.clone(),
                            counted.clone(),
                            sampling.clone(),
                        ));
                    }
                })
            })?;
        Ok(CountingSink { addr, shared })
    }

    fn state(&self) -> (usize, Option<Instant>) {
        let c = self.shared.lock().expect("sink lock");
        (c.messages, c.last)
    }

    fn wait_for(&self, n: usize) -> anyhow::Result<Instant> {
        let (mut seen, mut since) = (0, Instant::now());
        loop {
            let (count, last) = self.state();
            if count >= n {
                return last.context("messages without a time");
            }
            if count != seen {
                (seen, since) = (count, Instant::now());
            } else if since.elapsed() > STALL {
                bail!("the sink received {count} of {n} messages, none for {STALL:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn self_signed_acceptor() -> anyhow::Result<TlsAcceptor> {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![generated.cert.der().clone()], key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn sink_session(
    mut tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    counted: Arc<Mutex<Counted>>,
    sampling: Option<Arc<Sampling>>,
) {
    let sampling = sampling.as_deref();
    if tcp.write_all(b"220 sink.bench ESMTP\r\n").await.is_err() {
        return;
    }
    // Whatever the client pipelined after STARTTLS is dropped with the
    // first session's buffer (RFC 3207 §4.2).
    if let (Ok(SinkNext::StartTls), Some(acceptor)) = (
        sink_serve(&mut tcp, tls.is_some(), &counted, sampling).await,
        tls,
    ) && let Ok(mut stream) = acceptor.accept(tcp).await
    {
        let _ = sink_serve(&mut stream, false, &counted, sampling).await;
    }
}

enum SinkNext {
    Closed,
    StartTls,
}

/// Serves commands until QUIT, end of stream or STARTTLS (when `offer_tls`).
/// Replies to everything that arrived in one read go out in one write.
async fn sink_serve<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    offer_tls: bool,
    counted: &Mutex<Counted>,
    sampling: Option<&Sampling>,
) -> std::io::Result<SinkNext> {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    // Unprocessed input starts at `start`; in DATA, the search for CRLF.CRLF
    // resumes at `from` (which starts at the CRLF ending the DATA line).
    let (mut start, mut from, mut in_data) = (0, 0, false);
    // A message being kept: where its content starts, and its number.
    let mut kept: Option<(usize, usize)> = None;
    loop {
        loop {
            if in_data {
                match find_end_of_data(&buf[from..]) {
                    Some(end) => {
                        start = from + end;
                        in_data = false;
                        if let (Some((at, index)), Some(sampling)) = (kept.take(), sampling) {
                            sampling.write(index, &buf[at..start - 3]);
                        }
                        let mut c = counted.lock().expect("sink lock");
                        c.messages += 1;
                        c.last = Some(Instant::now());
                        drop(c);
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    }
                    None => {
                        // The content is not kept: only the bytes that could
                        // begin the terminator.
                        start = buf.len();
                        from = buf.len().saturating_sub(4).max(from);
                        break;
                    }
                }
            } else {
                let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') else {
                    break;
                };
                let line = &buf[start..start + nl + 1];
                start += nl + 1;
                let verb = line.get(..4).unwrap_or(line).to_ascii_uppercase();
                match &verb[..] {
                    b"EHLO" => {
                        out.extend_from_slice(b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n");
                        if offer_tls {
                            out.extend_from_slice(b"250-STARTTLS\r\n");
                        }
                        out.extend_from_slice(b"250 SMTPUTF8\r\n");
                    }
                    b"HELO" => out.extend_from_slice(b"250 sink.bench\r\n"),
                    b"MAIL" => out.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                    b"RCPT" => out.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                    b"DATA" => {
                        out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                        in_data = true;
                        from = start - 2;
                        let index = {
                            let mut c = counted.lock().expect("sink lock");
                            c.data_started += 1;
                            c.data_started - 1
                        };
                        if sampling.is_some_and(|s| s.wanted.contains(&index)) {
                            kept = Some((start, index));
                        }
                    }
                    b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                    b"QUIT" => {
                        out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                        s.write_all(&out).await?;
                        s.flush().await?;
                        return Ok(SinkNext::Closed);
                    }
                    b"STAR" if offer_tls => {
                        out.extend_from_slice(b"220 2.0.0 Ready\r\n");
                        s.write_all(&out).await?;
                        s.flush().await?;
                        return Ok(SinkNext::StartTls);
                    }
                    _ => out.extend_from_slice(b"500 5.5.1 command not recognized\r\n"),
                }
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
            out.clear();
        }
        let keep = match kept {
            Some((at, _)) if in_data => at,
            _ if in_data => from,
            _ => start,
        };
        buf.drain(..keep);
        start -= keep;
        from -= keep.min(from);
        if let Some((at, _)) = &mut kept {
            *at -= keep;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(SinkNext::Closed);
        }
    }
}

/// Just past the CRLF.CRLF in `hay`, which starts at a CRLF.
fn find_end_of_data(hay: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = hay[i..].iter().position(|&b| b == b'.') {
        let dot = i + p;
        if dot >= 2 && &hay[dot - 2..dot] == b"\r\n" && hay.get(dot + 1..dot + 3) == Some(b"\r\n") {
            return Some(dot + 3);
        }
        i = dot + 1;
    }
    None
}
