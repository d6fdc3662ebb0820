//! `mta dkim generate | dns | check | list`.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use dkim_keys::{Algorithm, PrivateKey, Publication, check_selector, key_path, record};

use crate::cli::{DkimCommand, load_config, table};
use crate::config::Config;
use crate::dns::{self, TxtAnswer};
use crate::policy::{DomainPattern, normalize_domain};

pub fn run(cmd: DkimCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DkimCommand::Generate {
            domain,
            selector,
            algorithm,
            bits,
            dir,
            config,
        } => {
            let config = load_config(config.config.as_deref())?;
            generate(&config, &domain, &selector, algorithm, bits, dir)
        }
        DkimCommand::Dns {
            domain,
            selector,
            dir,
            config,
        } => {
            let config = load_config(config.config.as_deref())?;
            dns_records(&config, &domain, selector.as_deref(), dir)
        }
        DkimCommand::Check {
            domain,
            json,
            config,
        } => {
            let config = load_config(config.config.as_deref())?;
            check(&config, domain.as_deref(), json)
        }
        DkimCommand::List { json, config } => {
            let config = load_config(config.config.as_deref())?;
            list(&config, json)
        }
    }
}

fn domain_arg(domain: &str) -> anyhow::Result<String> {
    match DomainPattern::parse(domain) {
        Ok(DomainPattern::Exact(d)) => Ok(d),
        Ok(DomainPattern::Subdomains(_)) => bail!("--domain takes one domain, not a wildcard"),
        Err(e) => bail!("--domain {e}"),
    }
}

fn generate(
    config: &Config,
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    bits: usize,
    dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let domain = domain_arg(domain)?;
    check_selector(selector).map_err(|e| anyhow::anyhow!("--selector {e}"))?;
    let dir = dir.unwrap_or_else(|| config.dkim_keys_dir());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the keys directory {}", dir.display()))?;
    let bits = match algorithm {
        Algorithm::RsaSha256 => bits,
        Algorithm::Ed25519Sha256 => 256,
    };
    let key = PrivateKey::generate(algorithm, bits)?;
    let path = key_path(&dir, &domain, selector);
    key.write_new(&path)?;
    let shown = std::fs::canonicalize(&path).unwrap_or(path);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Wrote an {} key ({} bits) to {} (mode 0600).\n",
        algorithm,
        key.bits,
        shown.display()
    )?;
    writeln!(out, "Publish this TXT record in DNS:\n")?;
    writeln!(out, "{}\n", record::zone_entry(selector, &domain, &key))?;
    writeln!(
        out,
        "Then add the key to the configuration and reload (SIGHUP) or restart:\n"
    )?;
    writeln!(
        out,
        "[[dkim.keys]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{algorithm}\"\nprivate_key = \"{}\"",
        shown.display()
    )?;
    writeln!(
        out,
        "\nCheck the published record with `mta dkim check --domain {domain}` once DNS has it."
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Key files to show for `dns`: the configured ones of the domain, else
/// the files in the keys directory.
fn key_files(
    config: &Config,
    domain: &str,
    selector: Option<&str>,
    dir: Option<PathBuf>,
) -> Vec<(String, PathBuf)> {
    let configured: Vec<(String, PathBuf)> = config
        .dkim
        .keys
        .iter()
        .filter(|k| k.domain.0 == domain && selector.is_none_or(|s| s == k.selector.get_ref()))
        .map(|k| (k.selector.get_ref().clone(), k.private_key.clone()))
        .collect();
    if !configured.is_empty() {
        return configured;
    }
    let dir = dir.unwrap_or_else(|| config.dkim_keys_dir());
    let prefix = format!("{domain}.");
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let sel = name.strip_prefix(&prefix)?.strip_suffix(".pem")?;
            (!sel.contains('.') && selector.is_none_or(|s| s == sel))
                .then(|| (sel.to_string(), p.clone()))
        })
        .collect();
    found.sort();
    found
}

fn dns_records(
    config: &Config,
    domain: &str,
    selector: Option<&str>,
    dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let domain = domain_arg(domain)?;
    let files = key_files(config, &domain, selector, dir);
    if files.is_empty() {
        bail!(
            "no key for {domain}{}: generate one with `mta dkim generate --domain {domain} --selector <name>`",
            selector
                .map(|s| format!(" with selector {s}"))
                .unwrap_or_default()
        );
    }
    let mut out = std::io::stdout().lock();
    for (sel, path) in files {
        let key = PrivateKey::load(&path)?;
        writeln!(
            out,
            "; {} ({} bits), {}",
            key.algorithm,
            key.bits,
            path.display()
        )?;
        writeln!(out, "{}", record::zone_entry(&sel, &domain, &key))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One configured key with what loading it found.
struct Row {
    domain: String,
    selector: String,
    algorithm: &'static str,
    active: bool,
    path: PathBuf,
    key: Result<PrivateKey, String>,
}

fn configured(config: &Config, domain: Option<&str>) -> anyhow::Result<Vec<Row>> {
    let domain = domain.map(normalize_domain);
    let rows: Vec<Row> = config
        .dkim_key_specs()
        .into_iter()
        .filter(|s| domain.as_ref().is_none_or(|d| *d == s.domain))
        .map(|s| Row {
            key: PrivateKey::load(&s.path).map_err(|e| e.to_string()),
            domain: s.domain,
            selector: s.selector,
            algorithm: s.algorithm.name(),
            active: s.active,
            path: s.path,
        })
        .collect();
    if rows.is_empty() {
        match domain {
            Some(d) => bail!("no [[dkim.keys]] for {d} in the configuration"),
            None => {
                bail!("the configuration has no [[dkim.keys]]: add one (see `mta dkim generate`)")
            }
        }
    }
    Ok(rows)
}

fn check(config: &Config, domain: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let rows = configured(config, domain)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let resolver = runtime
        .block_on(async { dns::resolver(&config.dns) })
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut results = Vec::new();
    for row in &rows {
        let outcome = match &row.key {
            Err(e) => Err(e.clone()),
            Ok(key) => {
                let name = record::record_name(&row.selector, &row.domain);
                let found = runtime.block_on(dns::txt(&resolver, &name));
                Ok(match found {
                    TxtAnswer::Records(r) => record::compare(&r, key),
                    TxtAnswer::NotFound => Publication::Missing,
                    TxtAnswer::Failed(e) => Publication::LookupFailed(e),
                })
            }
        };
        results.push(outcome);
    }
    let all_ok = results.iter().all(|r| matches!(r, Ok(p) if p.is_ok()));
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .zip(&results)
            .map(|(row, r)| {
                let (result, detail) = match r {
                    Ok(p) => (publication_name(p), p.describe()),
                    Err(e) => ("key-error", e.clone()),
                };
                serde_json::json!({
                    "domain": row.domain,
                    "selector": row.selector,
                    "algorithm": row.algorithm,
                    "active": row.active,
                    "record": record::record_name(&row.selector, &row.domain),
                    "result": result,
                    "ok": matches!(r, Ok(p) if p.is_ok()),
                    "detail": detail,
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .zip(&results)
            .map(|(row, r)| {
                vec![
                    row.domain.clone(),
                    row.selector.clone(),
                    row.algorithm.to_string(),
                    if row.active { "active" } else { "inactive" }.to_string(),
                    match r {
                        Ok(p) => p.describe(),
                        Err(e) => format!("key file error: {e}"),
                    },
                ]
            })
            .collect();
        write!(
            out,
            "{}",
            table(
                &["DOMAIN", "SELECTOR", "ALGORITHM", "STATE", "DNS"],
                &table_rows
            )
        )?;
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn publication_name(p: &Publication) -> &'static str {
    match p {
        Publication::Matching => "matching",
        Publication::DifferentKey => "different-key",
        Publication::Missing => "missing",
        Publication::SyntaxError(_) => "syntax-error",
        Publication::Revoked => "revoked",
        Publication::LookupFailed(_) => "lookup-failed",
    }
}

fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let rows = configured(config, None)?;
    let all_ok = rows.iter().all(|r| r.key.is_ok());
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "domain": r.domain,
                    "selector": r.selector,
                    "algorithm": r.algorithm,
                    "bits": r.key.as_ref().ok().map(|k| k.bits),
                    "file": r.path,
                    "active": r.active,
                    "error": r.key.as_ref().err(),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.domain.clone(),
                    r.selector.clone(),
                    r.algorithm.to_string(),
                    r.key.as_ref().map_or("-".into(), |k| k.bits.to_string()),
                    if r.active { "yes" } else { "no" }.to_string(),
                    match &r.key {
                        Ok(_) => r.path.display().to_string(),
                        Err(e) => format!("{} (error: {e})", r.path.display()),
                    },
                ]
            })
            .collect();
        write!(
            out,
            "{}",
            table(
                &["DOMAIN", "SELECTOR", "ALGORITHM", "BITS", "ACTIVE", "FILE"],
                &table_rows
            )
        )?;
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
