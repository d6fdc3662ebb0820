//! What a SIGHUP may change in the running daemon, and what only a restart
//! can.
//!
//! [`compare`] sets a new configuration against the running one and sorts
//! every key that differs: reception's rules (networks, tenants, users,
//! limits, timeouts), the TLS files, DKIM and the SPF policy take effect
//! for new connections and messages; listeners, the data directory, the
//! queue, delivery, DNS, the log and metrics are bound or built once at
//! start, so a changed value there is reported as "needs a restart" and
//! the running value stays.
//!
//! The section structs are destructured without `..`: a key added to the
//! configuration does not compile until it is sorted here, so no change is
//! ever silently ignored.

use crate::config::{
    Config, DeliveryConfig, DkimConfig, DnsConfig, LogConfig, MetricsConfig, SmtpConfig, SpfConfig,
    SpfPolicy,
};

/// Compares one section key by key: `restart` keys against the started
/// configuration, `reload` keys against the applied one. The pattern lists
/// every field, so a new one must be put in one list or the other.
macro_rules! sort {
    ($d:ident, $section:ident : $ty:ident {
        restart: [$($r:ident),* $(,)?],
        reload: [$($l:ident),* $(,)?] $(,)?
    }) => {{
        let $ty { $($r: _,)* $($l: _,)* } = &$d.new.$section;
        $(
            if $d.started.$section.$r != $d.new.$section.$r {
                $d.restart(concat!(stringify!($section), ".", stringify!($r)));
            }
        )*
        $(
            if $d.applied.$section.$l != $d.new.$section.$l {
                $d.applied(concat!(stringify!($section), ".", stringify!($l)));
            }
        )*
    }};
}

/// The keys that differ, by what happens to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// In effect from now on.
    pub applied: Vec<String>,
    /// Different in the file, but the running value stays until a restart.
    pub needs_restart: Vec<String>,
}

/// Compares `new` with what runs: `started` is the configuration the
/// daemon started with (what restart-only keys still hold), `applied` the
/// last one applied (what reloadable keys hold).
pub fn compare(started: &Config, applied: &Config, new: &Config) -> Changes {
    let mut d = Diff {
        started,
        applied,
        new,
        out: Changes::default(),
    };
    // Every top-level key, so that a new section must be sorted too.
    let Config {
        hostname: _,
        data_dir: _,
        smtp: _,
        tenants: _,
        dkim: _,
        spf: _,
        egress: _,
        delivery: _,
        dns: _,
        log: _,
        metrics: _,
        queue: _,
        admin: _,
    } = new;
    // In the greeting, but also delivery's EHLO and the SPF checker's
    // receiver name, which are built once.
    if started.hostname != new.hostname {
        d.restart("hostname");
    }
    if started.data_dir != new.data_dir {
        d.restart("data_dir");
    }
    sort!(d, smtp: SmtpConfig {
        restart: [listen, listen_tls],
        reload: [
            tls_certificate,
            tls_private_key,
            allowed_networks,
            relay_networks,
            max_message_size,
            max_recipients,
            max_connections,
            max_connections_per_ip,
            command_timeout,
            data_timeout,
            tls_handshake_timeout,
            max_errors,
            max_auth_failures,
            max_auth_failures_per_ip,
            max_auth_failures_per_user,
            auth_failure_window,
            auth_failure_delay,
            shutdown_grace,
        ],
    });
    tenants(&mut d);
    sort!(d, dkim: DkimConfig {
        restart: [],
        reload: [unsigned, keys_dir, expiration, keys],
    });
    spf(&mut d);
    if started.egress != new.egress {
        d.restart("egress");
    }
    sort!(d, delivery: DeliveryConfig {
        restart: [
            enabled,
            port,
            tls,
            relay_host,
            max_connections_per_destination,
            max_connections,
            messages_per_connection,
            max_in_flight,
            retry_initial,
            retry_max,
            max_lifetime,
            bounces,
            connect_timeout,
            command_timeout,
            data_timeout,
            idle_timeout,
            tls_fallback_after,
            tls_trust_anchors,
            domains,
        ],
        reload: [],
    });
    sort!(d, dns: DnsConfig {
        restart: [nameservers, timeout],
        reload: [],
    });
    sort!(d, log: LogConfig {
        restart: [retention_days, max_file_mb],
        reload: [],
    });
    sort!(d, metrics: MetricsConfig {
        restart: [listen, top_destinations, top_destination_min_recipients, destination_groups],
        reload: [],
    });
    // Whole sections: the store and the admin socket are opened once.
    if started.queue != new.queue {
        d.restart("queue");
    }
    if started.admin != new.admin {
        d.restart("admin");
    }
    d.out
}

struct Diff<'a> {
    started: &'a Config,
    applied: &'a Config,
    new: &'a Config,
    out: Changes,
}

impl Diff<'_> {
    fn restart(&mut self, key: &str) {
        self.out.needs_restart.push(key.to_string());
    }

    fn applied(&mut self, key: &str) {
        self.out.applied.push(key.to_string());
    }
}

/// Tenants by name: `tenants.<name>` for each one added, removed or changed
/// (sender domains, users, signing domain).
fn tenants(d: &mut Diff<'_>) {
    let (old, new) = (&d.applied.tenants, &d.new.tenants);
    let find = |list: &[crate::config::TenantConfig], name: &str| {
        list.iter().position(|t| t.name.get_ref() == name)
    };
    let mut names: Vec<&str> = old
        .iter()
        .chain(new.iter())
        .map(|t| t.name.get_ref().as_str())
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let same = match (find(old, name), find(new, name)) {
            (Some(a), Some(b)) => old[a] == new[b],
            _ => false,
        };
        if !same {
            d.applied(&format!("tenants.{name}"));
        }
    }
}

/// `[spf]`: the checker exists only when the policy is not `off`, so
/// turning it on or off needs a restart; between `warn` and `enforce`, and
/// the interval, change in the running checker.
fn spf(d: &mut Diff<'_>) {
    let SpfConfig {
        policy: _,
        check_interval: _,
    } = &d.new.spf;
    let running = d.started.spf.policy != SpfPolicy::Off;
    let wanted = d.new.spf.policy != SpfPolicy::Off;
    if running != wanted {
        d.restart("spf.policy");
    } else if running && d.applied.spf.policy != d.new.spf.policy {
        d.applied("spf.policy");
    }
    if d.applied.spf.check_interval != d.new.spf.check_interval {
        d.applied("spf.check_interval");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("mta.toml")).unwrap()
    }

    #[test]
    fn the_same_file_changes_nothing_even_when_its_lines_move() {
        let a = parse("[smtp]\nmax_recipients = 5\n[[tenants]]\nname = \"acme\"\n");
        let b = parse("\n\n[[tenants]]\nname = \"acme\"\n\n[smtp]\nmax_recipients = 5\n");
        assert_eq!(compare(&a, &a, &b), Changes::default());
    }

    #[test]
    fn reception_rules_apply_and_listeners_need_a_restart() {
        let old = parse("");
        let new = parse(
            "hostname = \"mx2.test\"\n[smtp]\nlisten = [\"127.0.0.1:2600\"]\nrelay_networks = []\nmax_message_size = 1000\n[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\n[delivery]\nretry_initial = \"1m\"\n[queue]\ncache_mb = 8\n[metrics]\nlisten = \"127.0.0.1:9999\"\n",
        );
        let c = compare(&old, &old, &new);
        assert_eq!(
            c.applied,
            [
                "smtp.relay_networks",
                "smtp.max_message_size",
                "tenants.acme"
            ]
        );
        assert_eq!(
            c.needs_restart,
            [
                "hostname",
                "smtp.listen",
                "delivery.retry_initial",
                "metrics.listen",
                "queue"
            ]
        );
    }

    #[test]
    fn restart_keys_compare_with_what_started_and_others_with_what_was_applied() {
        let started = parse("");
        let applied = parse("[smtp]\nmax_recipients = 5\n");
        // Still different from the start: reported again, not forgotten.
        let new = parse("[smtp]\nmax_recipients = 5\nlisten = [\"127.0.0.1:2600\"]\n");
        let c = compare(&started, &applied, &new);
        assert!(c.applied.is_empty(), "{c:?}");
        assert_eq!(c.needs_restart, ["smtp.listen"]);
    }

    #[test]
    fn tenants_are_named_when_added_removed_or_changed() {
        let old = parse(
            "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"b\"\nsender_domains = [\"b.example\"]\n",
        );
        let new = parse(
            "[[tenants]]\nname = \"b\"\nsender_domains = [\"b.example\", \"c.example\"]\n[[tenants]]\nname = \"c\"\n",
        );
        assert_eq!(
            compare(&old, &old, &new).applied,
            ["tenants.a", "tenants.b", "tenants.c"]
        );
    }

    #[test]
    fn spf_turns_on_or_off_only_with_a_restart() {
        let warn = parse("");
        let enforce = parse("[spf]\npolicy = \"enforce\"\ncheck_interval = \"5m\"\n");
        let off = parse("[spf]\npolicy = \"off\"\n");
        let c = compare(&warn, &warn, &enforce);
        assert_eq!(c.applied, ["spf.policy", "spf.check_interval"]);
        assert!(c.needs_restart.is_empty());
        assert_eq!(compare(&warn, &warn, &off).needs_restart, ["spf.policy"]);
        assert_eq!(compare(&off, &off, &warn).needs_restart, ["spf.policy"]);
    }
}
