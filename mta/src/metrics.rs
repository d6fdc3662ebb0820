//! Prometheus metrics, served as text on `[metrics] listen` at `/metrics`.
//!
//! Names are `mta_*`; counters end in `_total`, durations in `_seconds`.
//! Label values are bounded: algorithms, tenants of the config, outcomes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// DKIM signatures added, by algorithm.
    pub dkim_signatures: IntCounterVec,
    /// Messages accepted without a DKIM signature (no usable key).
    pub dkim_unsigned: IntCounter,
    /// Time to sign one message (all its signatures).
    pub dkim_signing_seconds: Histogram,
    /// Messages accepted into the queue, by tenant (`-` without one).
    pub messages_received: IntCounterVec,
    /// Open SMTP sessions.
    pub smtp_sessions: IntGauge,
    /// Delivery attempts per recipient, by outcome (delivered, deferred,
    /// bounced, expired).
    pub delivery_attempts: IntCounterVec,
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
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let dkim_signatures = counter_vec(
            &registry,
            "mta_dkim_signatures_total",
            "DKIM signatures added to accepted messages, by algorithm.",
            &["algorithm"],
        );
        let dkim_unsigned = IntCounter::new(
            "mta_dkim_unsigned_total",
            "Messages accepted without a DKIM signature because no key could sign them.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(dkim_unsigned.clone()))
            .expect("unique metric");
        let dkim_signing_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mta_dkim_signing_duration_seconds",
                "Time to DKIM-sign one message (all of its signatures).",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(dkim_signing_seconds.clone()))
            .expect("unique metric");
        let messages_received = counter_vec(
            &registry,
            "mta_messages_received_total",
            "Messages accepted into the queue, by tenant.",
            &["tenant"],
        );
        let smtp_sessions =
            IntGauge::new("mta_smtp_sessions", "Open SMTP sessions.").expect("valid metric");
        registry
            .register(Box::new(smtp_sessions.clone()))
            .expect("unique metric");
        let delivery_attempts = counter_vec(
            &registry,
            "mta_delivery_attempts_total",
            "Delivery attempts per recipient, by outcome.",
            &["outcome"],
        );
        let outbound_sessions = counter_vec(
            &registry,
            "mta_outbound_sessions_total",
            "Outbound SMTP sessions, by TLS outcome.",
            &["tls"],
        );
        let outbound_connections = IntGauge::new(
            "mta_outbound_connections",
            "Open outbound SMTP connections.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(outbound_connections.clone()))
            .expect("unique metric");
        let delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mta_delivery_transaction_duration_seconds",
                "Time of one outbound transaction, MAIL FROM to the final reply.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(delivery_seconds.clone()))
            .expect("unique metric");
        let dsn_sent = counter_vec(
            &registry,
            "mta_dsn_sent_total",
            "Delivery status notifications queued for senders, by action.",
            &["action"],
        );
        let spf_pair = IntGaugeVec::new(
            Opts::new(
                "mta_spf_pair_result",
                "1 for the current SPF result of a configured sender domain and egress IP.",
            ),
            &["domain", "ip", "result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(spf_pair.clone()))
            .expect("unique metric");
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
        let build = IntCounterVec::new(
            Opts::new("mta_build_info", "Version of the running mta (always 1)."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).inc();
        registry.register(Box::new(build)).expect("unique metric");
        Arc::new(Metrics {
            registry,
            dkim_signatures,
            dkim_unsigned,
            dkim_signing_seconds,
            messages_received,
            smtp_sessions,
            delivery_attempts,
            outbound_sessions,
            outbound_connections,
            delivery_seconds,
            dsn_sent,
            spf_pair,
            spf_messages,
            dmarc_messages,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        out
    }
}

/// Serves `GET /metrics` until `shutdown` turns true. Deliberately tiny:
/// one request per connection, bounded reads, no keep-alive.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|&s| s) => return,
        };
        let Ok((mut socket, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                while n < buf.len() {
                    match socket.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let first = request.lines().next().unwrap_or("");
            let response = if first.starts_with("GET /metrics ") || first == "GET /metrics" {
                let body = metrics.render();
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            } else {
                let body = "metrics are served at /metrics\n";
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(10), socket.write_all(&response)).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Binds the metrics listener (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_names_and_types() {
        let m = Metrics::new();
        m.dkim_signatures.with_label_values(&["rsa-sha256"]).inc();
        m.dkim_signing_seconds.observe(0.0003);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("# TYPE mta_dkim_signatures_total counter"),
            "{text}"
        );
        assert!(text.contains("mta_dkim_signatures_total{algorithm=\"rsa-sha256\"} 1"));
        assert!(text.contains("mta_dkim_signing_duration_seconds_count 1"));
        assert!(text.contains("mta_build_info{version="));
    }
}
