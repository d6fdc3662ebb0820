//! A real DNS server on loopback for the tests: hickory-server, serving
//! zones written in zone-file syntax, on UDP and TCP at one port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::{LowerName, Name, RecordSet, RrKey};
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::server::RequestHandler;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// A running DNS server; stops when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    running: Running,
}

/// A hickory-server task on its own thread and runtime, serving one
/// handler on UDP and TCP at one loopback port; stops when dropped.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Serves `handler` on `port` (0: a free one); the address, once bound.
    /// Panics if the port cannot be bound.
    pub fn serve<H: RequestHandler>(port: u16, handler: H) -> (SocketAddr, Running) {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut server = Server::new(handler);
                // UDP and TCP on the same port, as resolvers expect.
                let (udp, tcp) = loop {
                    let udp = tokio::net::UdpSocket::bind(("127.0.0.1", port))
                        .await
                        .unwrap_or_else(|e| panic!("bind UDP port {port}: {e}"));
                    let bound = udp.local_addr().unwrap().port();
                    match tokio::net::TcpListener::bind(("127.0.0.1", bound)).await {
                        Ok(tcp) => break (udp, tcp),
                        Err(e) if port != 0 => panic!("bind TCP port {port}: {e}"),
                        Err(_) => {}
                    }
                };
                addr_tx.send(udp.local_addr().unwrap()).unwrap();
                server.register_socket(udp);
                server.register_listener(tcp, Duration::from_secs(10), 4096);
                let _ = stop_rx.await;
                let _ = server.shutdown_gracefully().await;
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the DNS server starts");
        (
            addr,
            Running {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The SOA and NS every test zone needs, to be followed by its records.
pub fn zone_header(origin: &str) -> String {
    format!(
        "$ORIGIN {origin}.\n$TTL 300\n@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n@ IN NS ns.{origin}.\nns IN A 127.0.0.1\n"
    )
}

fn parse_zone(origin: &str, text: &str) -> BTreeMap<RrKey, RecordSet> {
    let origin_name = Name::from_str(&format!("{origin}.")).expect("zone origin");
    let (_, records) = Parser::new(text, None, Some(origin_name))
        .parse()
        .unwrap_or_else(|e| panic!("zone {origin} does not parse: {e}\n{text}"));
    records
}

impl DnsServer {
    /// Serves the zones: `(origin, records)`, where records are zone-file
    /// lines relative to the origin ([`zone_header`] is prepended).
    pub fn start(zones: &[(&str, &str)]) -> DnsServer {
        let (addr, running) = Running::serve(0, catalog(zones));
        DnsServer { addr, running }
    }

    /// Serves new zones at the same address (a test that edits DNS).
    pub fn replace(&mut self, zones: &[(&str, &str)]) {
        let port = self.addr.port();
        // Stop the old server first: the port must be free.
        self.running = Running {
            stop: None,
            thread: None,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::panic::catch_unwind(|| Running::serve(port, catalog(zones))) {
                Ok((_, running)) => {
                    self.running = running;
                    return;
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }
}

/// The zones as hickory's catalog.
fn catalog(zones: &[(&str, &str)]) -> Catalog {
    let mut catalog = Catalog::new();
    for (origin, records) in zones {
        let text = format!("{}{records}\n", zone_header(origin));
        let name = Name::from_str(&format!("{origin}.")).unwrap();
        let handler =
            InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::new(
                name.clone(),
                parse_zone(origin, &text),
                ZoneType::Primary,
                AxfrPolicy::Deny,
            )
            .expect("zone loads");
        catalog.upsert(LowerName::from(name), vec![Arc::new(handler)]);
    }
    catalog
}

/// A TXT record line with a long value split into 255-octet strings.
pub fn txt_line(owner: &str, value: &str) -> String {
    let parts: Vec<String> = dkim_keys::record::split_strings(value)
        .into_iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    format!("{owner} IN TXT {}\n", parts.join(" "))
}
