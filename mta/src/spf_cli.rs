//! `mta spf check`: every sender domain against every egress IP, on demand.

use std::io::Write;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::cli::table;
use crate::config::Config;
use crate::daemon::{spf_domains, spf_sources};
use crate::spf::checker::Source;
use crate::spf::{Evaluation, HickoryDns, MAX_DNS_TERMS, Options, SpfResult, check_mail_from};

/// Evaluates each (domain, IP) pair; exit 1 unless every pair passes.
pub fn check(
    config: &Config,
    domain: Option<&str>,
    ip: Option<IpAddr>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let domains = match domain {
        Some(d) => vec![d.trim_end_matches('.').to_ascii_lowercase()],
        None => spf_domains(config),
    };
    if domains.is_empty() {
        bail!(
            "no sender domain to check: the configuration's tenants list none (exact ones); name one with --domain"
        );
    }
    let sources: Vec<Source> = match ip {
        Some(ip) => vec![Source {
            ip,
            ehlo: config
                .egress
                .iter()
                .find(|e| e.address == Some(ip))
                .and_then(|e| e.ehlo.clone())
                .unwrap_or_else(|| config.hostname()),
        }],
        None => spf_sources(config),
    };
    if sources.is_empty() {
        bail!("no egress IP known: configure [[egress]] address, or name one with --ip");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let resolver = runtime
        .block_on(async { crate::dns::resolver(&config.dns) })
        .map_err(|e| anyhow::anyhow!(e))?;
    let dns = HickoryDns::new(resolver);
    let options = Options {
        receiver: config.hostname(),
        ..Options::default()
    };
    let mut results: Vec<Evaluation> = Vec::new();
    for d in &domains {
        for s in &sources {
            let sender = format!("postmaster@{d}");
            results.push(runtime.block_on(check_mail_from(&dns, &options, s.ip, &sender, &s.ehlo)));
        }
    }
    let all_pass = results.iter().all(|e| e.result == SpfResult::Pass);
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<serde_json::Value> = results
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).expect("an evaluation serializes");
                v["fix"] = serde_json::json!(e.suggestion());
                v
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|e| {
                vec![
                    e.domain.clone(),
                    e.ip.to_string(),
                    e.result.to_string(),
                    e.matched
                        .as_ref()
                        .map_or("-".into(), |m| m.directive.clone()),
                    format!("{}/{MAX_DNS_TERMS}", e.dns_lookups),
                    detail(e),
                ]
            })
            .collect();
        write!(
            out,
            "{}",
            table(
                &[
                    "DOMAIN",
                    "IP",
                    "RESULT",
                    "MATCHED",
                    "LOOKUPS",
                    "RECORD / FIX"
                ],
                &rows
            )
        )?;
    }
    Ok(if all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn detail(e: &Evaluation) -> String {
    let record = e
        .record
        .as_ref()
        .map_or_else(|| "(no record)".to_string(), |r| format!("\"{r}\""));
    match (&e.error, e.suggestion()) {
        (Some(err), _) => format!("{record}: {err}"),
        (None, Some(fix)) => format!("{record}: add {fix}"),
        (None, None) => record,
    }
}
