//! The threads that check AUTH passwords.
//!
//! An argon2id check takes 19 MiB and tens of milliseconds of a core. On
//! tokio's blocking pool a crowd of sessions sending AUTH together would
//! take a thread and a fresh 19 MiB block each (up to 512 of them); and
//! even one at a time, malloc placed each new block past the small
//! allocations made meanwhile, so the heap kept growing (120 wrong
//! passwords at once left the daemon at 300–770 MiB). Here a fixed set of
//! threads, one per two cores, each keeps its own argon2 memory for good: the
//! checks queue for a thread, and the memory is threads × 19 MiB, however
//! many sessions ask.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::auth::Users;
use crate::smtp::Identity;

/// A check to run, given the thread's argon2 memory.
type Job = Box<dyn FnOnce(&mut Vec<argon2::Block>) + Send>;

/// A fixed pool of password-checking threads; they end when it is dropped.
pub struct PasswordChecks {
    jobs: Mutex<mpsc::Sender<Job>>,
    threads: usize,
}

impl PasswordChecks {
    /// `threads` threads (at least one).
    pub fn new(threads: usize) -> PasswordChecks {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    let mut memory = Vec::new();
                    loop {
                        // The lock is held only while waiting for a job, so
                        // the threads take turns at the queue, not at work.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return,
                        }
                    }
                })
                .expect("start a password-check thread");
        }
        PasswordChecks {
            jobs: Mutex::new(tx),
            threads,
        }
    }

    /// One thread per two cores (at least one): a crowd sending AUTH can
    /// take at most half the machine from reception, signing and delivery.
    pub fn half_the_cores() -> PasswordChecks {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get() / 2))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Checks `password` for `user` on one of the threads; `None` if the
    /// credentials are wrong, `Err` if the check could not run.
    pub async fn verify(
        &self,
        users: Arc<Users>,
        user: String,
        password: String,
    ) -> Result<Option<Identity>, &'static str> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = tx.send(users.verify_in(&user, &password, memory));
        });
        self.jobs
            .lock()
            .map_err(|_| "password check queue poisoned")?
            .send(job)
            .map_err(|_| "password check threads stopped")?;
        rx.await.map_err(|_| "password check thread failed")
    }
}

impl std::fmt::Debug for PasswordChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordChecks")
            .field("threads", &self.threads)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PasswordHashString, TenantConfig, UserConfig};

    #[tokio::test]
    async fn checks_run_on_the_pool_and_answer_each_caller() {
        let tenants = vec![TenantConfig {
            name: toml::Spanned::new(0..0, "acme".into()),
            sender_domains: vec![],
            users: vec![UserConfig {
                name: toml::Spanned::new(0..0, "acme-app".into()),
                password_hash: PasswordHashString(crate::auth::hash_password("s3cret").unwrap()),
            }],
            signing_domain: None,
        }];
        let users = Arc::new(Users::from_config(&tenants));
        let pool = Arc::new(PasswordChecks::new(2));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (pool, users) = (pool.clone(), users.clone());
            let password = if i % 2 == 0 { "s3cret" } else { "wrong" };
            tasks.push(tokio::spawn(async move {
                pool.verify(users, "acme-app".into(), password.into())
                    .await
                    .unwrap()
                    .is_some()
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        assert_eq!(got, [true, false, true, false, true, false]);
    }
}
