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
//! A benchmark, not a test: run it on a quiet machine, repeat, and compare
//! ratios within one run. `spec-tests/tests/bench_smoke.rs` only checks that
//! it works.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Parser)]
#[command(about = "Reception benchmark of the mta")]
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
    /// The process to measure with --server.
    #[arg(long)]
    pid: Option<u32>,
    /// DKIM keys for the daemon to sign with (the messages are From
    /// bench.example): none, rsa (2048), ed25519, or both (dual signing).
    #[arg(long, value_enum, default_value = "none")]
    dkim: DkimArg,
    /// Measure only the signing step, in this process: signatures per
    /// second on one core for messages of --size-kb, next to the raw sign
    /// rate of the same keys.
    #[arg(long)]
    sign_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DkimArg {
    None,
    Rsa,
    Ed25519,
    Both,
}

/// Writes keys for bench.example into `dir`; returns the config lines.
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
    let mut toml = String::new();
    for (alg, bits, selector) in algs {
        let path = dir.join(format!("bench.example.{selector}.pem"));
        PrivateKey::generate(*alg, *bits)?.write_new(&path)?;
        toml.push_str(&format!(
            "[[dkim.keys]]\ndomain = \"bench.example\"\nselector = \"{selector}\"\nalgorithm = \"{alg}\"\nprivate_key = \"{}\"\n",
            path.display()
        ));
    }
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
    client_cpu_seconds: f64,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// User plus system CPU seconds of a process, from /proc.
fn process_cpu(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted after the ')'.
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    Ok((utime + stime) / ticks_per_second())
}

fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb / 1024.0)
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

fn start_daemon(mta: &Path, connections: usize, dkim: DkimArg) -> anyhow::Result<Daemon> {
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
            "hostname = \"bench.test\"\ndata_dir = \"{}\"\n[dkim]\n{}[smtp]\nlisten = [\"{addr}\"]\nmax_connections_per_ip = {}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[spf]\npolicy = \"off\"\n[delivery]\nenabled = false\n",
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
    let daemon = match args.server {
        Some(_) => None,
        None => {
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
            Some(start_daemon(&mta, args.connections, args.dkim)?)
        }
    };
    let addr = args
        .server
        .or(daemon.as_ref().map(|d| d.addr))
        .expect("an address");
    let pid = args.pid.or(daemon.as_ref().map(|d| d.child.id()));
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
    let cpu_before = pid.map(process_cpu).transpose()?;
    let client_before = self_cpu();
    let (elapsed, whole, after) =
        runtime.block_on(run(addr, tls, body, args.messages, args.connections))?;
    let server_cpu = match (pid, cpu_before) {
        (Some(p), Some(before)) => Some(process_cpu(p)? - before),
        _ => None,
    };
    let client_cpu = self_cpu() - client_before;

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
        messages: args.messages,
        size_kb: args.size_kb,
        connections: args.connections,
        tls: !args.no_tls,
        seconds: elapsed.as_secs_f64(),
        accepted_per_second: args.messages as f64 / elapsed.as_secs_f64(),
        transaction_p50_ms: percentile(&whole, 0.50),
        transaction_p99_ms: percentile(&whole, 0.99),
        after_data_p50_ms: percentile(&after, 0.50),
        after_data_p99_ms: percentile(&after, 0.99),
        server_cpu_seconds: server_cpu,
        server_cpu_ms_per_message: server_cpu.map(|c| c * 1000.0 / args.messages as f64),
        server_peak_rss_mb: pid.map(peak_rss_mb).transpose()?,
        client_cpu_seconds: client_cpu,
    };
    match daemon {
        Some(d) if args.keep => {
            let kept = d.dir.path().to_path_buf();
            std::mem::forget(d);
            eprintln!("data kept in {}", kept.display());
        }
        other => drop(other),
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.3}{unit}"));
        println!(
            "{} msgs of {} KiB over {} connections ({}): {:.0} msgs/s accepted in {:.2} s\n\
             time to 250: transaction p50 {:.2} ms, p99 {:.2} ms; after data p50 {:.2} ms, p99 {:.2} ms\n\
             server CPU {} = {}/msg; peak RSS {}; client CPU {:.2} s",
            report.messages,
            report.size_kb,
            report.connections,
            if report.tls { "STARTTLS" } else { "plaintext" },
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
    }
    Ok(())
}
