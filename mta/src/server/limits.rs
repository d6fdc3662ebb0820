//! Connection counting: in total and per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::smtp::{Reply, Status};

#[derive(Debug)]
pub struct ConnectionLimits {
    /// Atomics: SIGHUP changes them while connections come and go.
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A counted connection; the count drops with it.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.limits.state.lock().expect("limits lock");
        st.0 -= 1;
        if let Some(n) = st.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a slot, or says why not (`421 4.7.0`).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Reply> {
        let mut st = self.state.lock().expect("limits lock");
        if st.0 >= self.max_total.load(Ordering::Relaxed) {
            return Err(Reply::new(
                421,
                Status(4, 7, 0),
                "Too many connections; try again later",
            ));
        }
        let n = st.1.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(Reply::new(
                421,
                Status(4, 7, 0),
                "Too many connections from your address; try again later",
            ));
        }
        *n += 1;
        st.0 += 1;
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }

    /// New limits (SIGHUP). Connections above a lowered limit stay; new
    /// ones wait until the count is under it.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn active(&self) -> usize {
        self.state.lock().expect("limits lock").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_per_ip_limits_and_release() {
        let l = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        let e = l.acquire(a).unwrap_err();
        assert!(e.text.contains("your address"));
        let _s3 = l.acquire(b).unwrap();
        let e = l.acquire(b).unwrap_err();
        assert_eq!(e.code, 421);
        assert!(!e.text.contains("your address"), "total limit first");
        drop(s1);
        assert_eq!(l.active(), 2);
        let s4 = l.acquire(b).unwrap();
        // Lowered to the open count: open slots stay, new ones wait.
        l.set_limits(3, 2);
        assert!(l.acquire(a).is_err());
        drop(s4);
        l.acquire(a).unwrap();
    }
}
