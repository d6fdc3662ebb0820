//! Prometheus metrics, served as text on `[metrics] listen` at `/metrics`.
//!
//! Names are `mta_*`; counters end in `_total`, durations in `_seconds`.
//! Every label value comes from a bounded set: algorithms, outcomes and
//! reasons of our own, tenants of the config (`-` without one), and
//! destinations grouped by [`Destinations`]. docs/metrics.md lists them all.
//!
//! Most metrics are counted where things happen. The queue's shape and the
//! store's state are read at each scrape from what the queue maintains
//! ([`queue::Queue::shape`]), so a scrape costs no scan.

mod destinations;
mod http;
pub mod reasons;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use queue::{MessageState, Queue};

use crate::config::MetricsConfig;
pub use destinations::{Destinations, OTHER};
pub use http::{bind, serve};
pub use reasons::RejectReason;

/// The tenant label of messages without a tenant.
pub const NO_TENANT: &str = "-";

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// DKIM signatures added, by algorithm.
    pub dkim_signatures: IntCounterVec,
    /// Messages accepted without a DKIM signature (no usable key).
    pub dkim_unsigned: IntCounter,
    /// Time to sign one message (all its signatures).
    pub dkim_signing_seconds: Histogram,
    messages_received: IntCounterVec,
    recipients_received: IntCounterVec,
    rejections: IntCounterVec,
    auth_failures: IntCounterVec,
    /// Open SMTP sessions (inbound connections past the connect checks).
    pub smtp_sessions: IntGauge,
    delivery_attempts: IntCounterVec,
    time_in_queue: HistogramVec,
    /// One delivery attempt of a job (up to 100 recipients of a message
    /// for one destination), connection set-up included, by connection.
    pub delivery_attempt_seconds: HistogramVec,
    /// Outbound sessions opened, by TLS outcome (tls,
    /// plaintext-not-offered, plaintext-after-failed-handshakes,
    /// plaintext-disabled) and failed handshakes (handshake-failed).
    pub outbound_sessions: IntCounterVec,
    /// Open outbound connections.
    pub outbound_connections: IntGauge,
    /// One transaction (MAIL to the final reply) on an open connection.
    pub delivery_seconds: Histogram,
    /// DSNs queued for senders, by action (failed).
    pub dsn_sent: IntCounterVec,
    /// 1 for the current SPF result of each (sender domain, egress IP)
    /// pair, 0 for its earlier ones.
    pub spf_pair: IntGaugeVec,
    /// Accepted messages by the SPF result of their MAIL FROM domain.
    pub spf_messages: IntCounterVec,
    /// Messages by DMARC alignment outcome (pass, fail, none, temperror).
    pub dmarc_messages: IntCounterVec,
    store_flush_seconds: Histogram,
    store_flush_writes: IntCounter,
    queue_messages: IntGaugeVec,
    queue_recipients: IntGaugeVec,
    queue_bytes: IntGaugeVec,
    store_failed: IntGauge,
    destinations: Destinations,
    queue: OnceLock<Queue>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid metric"),
    )
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric"),
    )
}

/// Time in queue, from a second to beyond the default five-day lifetime.
const QUEUE_TIME_BUCKETS: &[f64] = &[
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    2.0 * 86400.0,
    5.0 * 86400.0,
    7.0 * 86400.0,
];
/// One attempt: local sinks answer in a millisecond, slow MX hosts in many
/// seconds, and connect plus command timeouts reach minutes.
const ATTEMPT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// One group commit: an fdatasync round, from tmpfs to a slow disk.
const FLUSH_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl Metrics {
    /// The registry with every metric; `config` shapes the destination label.
    pub fn new(config: &MetricsConfig) -> Arc<Metrics> {
        let registry = Registry::new();
        let dkim_signatures = counter_vec(
            &registry,
            "mta_dkim_signatures_total",
            "DKIM signatures added to accepted messages, by algorithm.",
            &["algorithm"],
        );
        let dkim_unsigned = register(
            &registry,
            IntCounter::new(
                "mta_dkim_unsigned_total",
                "Messages accepted without a DKIM signature because no key could sign them.",
            )
            .expect("valid metric"),
        );
        let dkim_signing_seconds = histogram(
            &registry,
            "mta_dkim_signing_duration_seconds",
            "Time to DKIM-sign one message (all of its signatures).",
            &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            ],
        );
        let messages_received = counter_vec(
            &registry,
            "mta_messages_received_total",
            "Messages accepted into the queue, by tenant.",
            &["tenant"],
        );
        let recipients_received = counter_vec(
            &registry,
            "mta_recipients_received_total",
            "Recipients of messages accepted into the queue, by tenant and destination group.",
            &["tenant", "destination"],
        );
        let rejections = counter_vec(
            &registry,
            "mta_rejections_total",
            "Connections, commands and messages refused by reception, by reason.",
            &["reason"],
        );
        for r in RejectReason::ALL {
            rejections.with_label_values(&[r.as_str()]);
        }
        let auth_failures = counter_vec(
            &registry,
            "mta_auth_failures_total",
            "Failed AUTH attempts, by reason.",
            &["reason"],
        );
        for r in reasons::AUTH_FAILURE_LABELS {
            auth_failures.with_label_values(&[r]);
        }
        let smtp_sessions = register(
            &registry,
            IntGauge::new("mta_smtp_sessions", "Open SMTP sessions.").expect("valid metric"),
        );
        let delivery_attempts = counter_vec(
            &registry,
            "mta_delivery_attempts_total",
            "Delivery attempts per recipient, by outcome, tenant and destination group.",
            &["outcome", "tenant", "destination"],
        );
        let time_in_queue = histogram_vec(
            &registry,
            "mta_time_in_queue_seconds",
            "Time from reception to a recipient's final outcome, by outcome.",
            &["outcome"],
            QUEUE_TIME_BUCKETS,
        );
        let delivery_attempt_seconds = histogram_vec(
            &registry,
            "mta_delivery_attempt_duration_seconds",
            "One delivery attempt for a destination, connection set-up included, by connection (new, reused).",
            &["connection"],
            ATTEMPT_BUCKETS,
        );
        let outbound_sessions = counter_vec(
            &registry,
            "mta_outbound_sessions_total",
            "Outbound SMTP sessions, by TLS outcome.",
            &["tls"],
        );
        let outbound_connections = register(
            &registry,
            IntGauge::new(
                "mta_outbound_connections",
                "Open outbound SMTP connections.",
            )
            .expect("valid metric"),
        );
        let delivery_seconds = histogram(
            &registry,
            "mta_delivery_transaction_duration_seconds",
            "Time of one outbound transaction, MAIL FROM to the final reply.",
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        );
        let dsn_sent = counter_vec(
            &registry,
            "mta_dsn_sent_total",
            "Delivery status notifications queued for senders, by action.",
            &["action"],
        );
        let spf_pair = gauge_vec(
            &registry,
            "mta_spf_pair_result",
            "1 for the current SPF result of a configured sender domain and egress IP.",
            &["domain", "ip", "result"],
        );
        let spf_messages = counter_vec(
            &registry,
            "mta_spf_messages_total",
            "Accepted messages by the SPF result of their MAIL FROM domain for our egress IPs.",
            &["result"],
        );
        let dmarc_messages = counter_vec(
            &registry,
            "mta_dmarc_messages_total",
            "Messages by the DMARC alignment outcome of what we send (pass, fail, none, temperror).",
            &["outcome"],
        );
        let store_flush_seconds = histogram(
            &registry,
            "mta_store_flush_duration_seconds",
            "One group commit of the queue store: fdatasync of the content segments, sled's flush and fdatasync of its file.",
            FLUSH_BUCKETS,
        );
        let store_flush_writes = register(
            &registry,
            IntCounter::new(
                "mta_store_flush_writes_total",
                "Writes (messages stored, outcomes, admin changes) made durable by group commits.",
            )
            .expect("valid metric"),
        );
        let queue_messages = gauge_vec(
            &registry,
            "mta_queue_messages",
            "Messages in the queue, by state (queued, deferred, held).",
            &["state"],
        );
        let queue_recipients = gauge_vec(
            &registry,
            "mta_queue_recipients",
            "Recipients not yet final in the queue, by their message's state.",
            &["state"],
        );
        let queue_bytes = gauge_vec(
            &registry,
            "mta_queue_bytes",
            "Stored content bytes of the messages in the queue, by state.",
            &["state"],
        );
        let store_failed = register(
            &registry,
            IntGauge::new(
                "mta_store_failed",
                "1 once a queue write failed or timed out: reception answers 451 until mta is restarted.",
            )
            .expect("valid metric"),
        );
        let build = gauge_vec(
            &registry,
            "mta_build_info",
            "The running mta: version and the git commit it was built from (always 1).",
            &["version", "commit"],
        );
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("MTA_GIT_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        Arc::new(Metrics {
            registry,
            dkim_signatures,
            dkim_unsigned,
            dkim_signing_seconds,
            messages_received,
            recipients_received,
            rejections,
            auth_failures,
            smtp_sessions,
            delivery_attempts,
            time_in_queue,
            delivery_attempt_seconds,
            outbound_sessions,
            outbound_connections,
            delivery_seconds,
            dsn_sent,
            spf_pair,
            spf_messages,
            dmarc_messages,
            store_flush_seconds,
            store_flush_writes,
            queue_messages,
            queue_recipients,
            queue_bytes,
            store_failed,
            destinations: Destinations::new(config),
            queue: OnceLock::new(),
        })
    }

    /// Reads the queue's shape at every scrape and times its group commits.
    /// Only the first queue given is watched.
    pub fn watch_queue(self: &Arc<Self>, queue: &Queue) {
        if self.queue.set(queue.clone()).is_err() {
            return;
        }
        let (seconds, writes) = (
            self.store_flush_seconds.clone(),
            self.store_flush_writes.clone(),
        );
        queue.observe_flushes(move |took: Duration, n: usize| {
            seconds.observe(took.as_secs_f64());
            writes.inc_by(n as u64);
        });
    }

    /// A message accepted into the queue: its tenant, and its recipients
    /// (counted once each, as the queue stores them) by destination.
    pub fn received(&self, tenant: Option<&str>, recipients: &[String]) {
        let tenant = tenant.unwrap_or(NO_TENANT);
        self.messages_received.with_label_values(&[tenant]).inc();
        let mut seen = HashSet::new();
        for r in recipients {
            if !seen.insert(r.to_lowercase()) {
                continue;
            }
            let group = self.destinations.count(&queue::domain_of(r));
            self.recipients_received
                .with_label_values(&[tenant, &group])
                .inc();
        }
    }

    /// Reception refused a connection, a command or a message.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejections.with_label_values(&[reason.as_str()]).inc();
    }

    /// An AUTH attempt failed (counted as a rejection too).
    pub fn auth_failed(&self, reason: &str) {
        self.auth_failures
            .with_label_values(&[reasons::auth_failure_label(reason)])
            .inc();
        self.rejected(RejectReason::AuthFailed);
    }

    /// One recipient's attempt settled as `outcome` (delivered, deferred,
    /// bounced, expired); final outcomes also record the time since
    /// reception.
    pub fn settled(&self, outcome: &str, tenant: Option<&str>, domain: &str, queued: Duration) {
        let group = self.destinations.label(domain);
        self.delivery_attempts
            .with_label_values(&[outcome, tenant.unwrap_or(NO_TENANT), &group])
            .inc();
        if outcome != "deferred" {
            self.time_in_queue
                .with_label_values(&[outcome])
                .observe(queued.as_secs_f64());
        }
    }

    /// Domains that have a destination label of their own so far.
    pub fn top_destinations(&self) -> Vec<String> {
        self.destinations.top()
    }

    fn refresh_queue(&self) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        self.store_failed.set(i64::from(queue.is_failed()));
        let Some(shape) = queue.shape() else {
            return;
        };
        for state in [
            MessageState::Queued,
            MessageState::Deferred,
            MessageState::Held,
        ] {
            let t = shape.get(state);
            let label = [state.as_str()];
            self.queue_messages
                .with_label_values(&label)
                .set(t.messages);
            self.queue_recipients
                .with_label_values(&label)
                .set(t.recipients);
            self.queue_bytes.with_label_values(&label).set(t.bytes);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        self.refresh_queue();
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_names_and_types() {
        let m = Metrics::new(&MetricsConfig::default());
        m.dkim_signatures.with_label_values(&["rsa-sha256"]).inc();
        m.dkim_signing_seconds.observe(0.0003);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("# TYPE mta_dkim_signatures_total counter"),
            "{text}"
        );
        assert!(text.contains("mta_dkim_signatures_total{algorithm=\"rsa-sha256\"} 1"));
        assert!(text.contains("mta_dkim_signing_duration_seconds_count 1"));
        assert!(text.contains("# TYPE mta_build_info gauge"), "{text}");
        assert!(text.contains("mta_build_info{commit="), "{text}");
        // Every reason is there from the start, at 0.
        assert!(
            text.contains("mta_rejections_total{reason=\"spf\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn received_counts_recipients_once_by_destination() {
        let config = crate::config::Config::parse(
            "[metrics]\ntop_destinations = 1\ntop_destination_min_recipients = 1\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap()
        .metrics;
        let m = Metrics::new(&config);
        m.received(
            Some("acme"),
            &[
                "a@x.example".into(),
                "A@X.example".into(),
                "b@y.example".into(),
            ],
        );
        m.settled(
            "delivered",
            Some("acme"),
            "X.example",
            Duration::from_secs(2),
        );
        m.settled("deferred", None, "y.example", Duration::from_secs(2));
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "mta_messages_received_total{tenant=\"acme\"} 1",
            "mta_recipients_received_total{destination=\"x.example\",tenant=\"acme\"} 1",
            "mta_recipients_received_total{destination=\"other\",tenant=\"acme\"} 1",
            "mta_delivery_attempts_total{destination=\"x.example\",outcome=\"delivered\",tenant=\"acme\"} 1",
            "mta_delivery_attempts_total{destination=\"other\",outcome=\"deferred\",tenant=\"-\"} 1",
            "mta_time_in_queue_seconds_count{outcome=\"delivered\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("mta_time_in_queue_seconds_count{outcome=\"deferred\"}"));
    }
}
