//! Many clients holding connections (issue 8, faults): 1,000 idle
//! connections and slowloris clients that send a byte at a time, under the
//! default limits (2,000 in all, 200 per address), while a new client
//! submits a message. The server must keep answering it; the time it took is
//! printed (the figure is in docs/performance.md, not asserted here).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spec_tests::client::{Client, message};
use spec_tests::server::{TestServer, eventually, queued_id};

/// Raises the open-file limit to its hard limit: 1,000 clients and their
/// 1,000 server ends live in this one process.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct we own.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn connect_from(local: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(local, 0).into()).unwrap();
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(10))
        .unwrap();
    socket.into()
}

#[test]
fn a_new_client_is_served_while_1000_idle_and_slowloris_connections_are_held() {
    raise_fd_limit();
    let server = TestServer::start("");
    // 1,000 idle connections from ten addresses (100 each, under the
    // per-address limit), that never say a word.
    let mut idle = Vec::new();
    for i in 0..1000u32 {
        let ip: IpAddr = format!("127.0.0.{}", 10 + i % 10).parse().unwrap();
        idle.push(connect_from(ip, server.addr));
    }
    // Twenty slowloris clients: a command a byte at a time, 100 ms apart,
    // for as long as the test runs.
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..20)
        .map(|i| {
            let mut s = connect_from(
                format!("127.0.0.{}", 30 + i % 5).parse().unwrap(),
                server.addr,
            );
            let stop = stop.clone();
            std::thread::spawn(move || {
                let line = b"EHLO slowly.example\r\nNOOP\r\n".repeat(1000);
                for b in line {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    eventually("every connection to be accepted", || {
        (server.connections() >= 1020).then_some(())
    });

    // A new client: greeting, EHLO and a whole message.
    let started = Instant::now();
    let mut c = Client::connect(server.addr);
    let greeted = started.elapsed();
    assert_eq!(c.greeting.code, 220);
    assert_eq!(c.ehlo().code, 250);
    let replies = c.send_message(
        "news@x.example",
        &["a@dest.example"],
        &message("news@x.example", "a@dest.example", "in a crowd"),
    );
    let done = started.elapsed();
    let id = queued_id(replies.last().unwrap());
    eprintln!(
        "with {} connections held: greeting after {greeted:?}, message accepted after {done:?}",
        server.connections()
    );
    server.wait_for("its Reception record", |records| {
        records
            .iter()
            .any(|r| r.kind() == "Reception" && r.queue_id() == Some(id.as_str()))
            .then_some(())
    });
    // The idle ones are still held (nothing was dropped to make room).
    assert!(server.connections() >= 1020);

    stop.store(true, Ordering::Relaxed);
    drop(idle);
    for t in slow {
        t.join().unwrap();
    }
}
