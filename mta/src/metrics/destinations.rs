//! The `destination` label: recipient domains grouped so that the number
//! of series stays bounded however many domains mail goes to.
//!
//! A domain's label is, in this order: the name of the configured group it
//! belongs to (`[metrics.destination_groups]`); the domain itself if it is
//! one of the `top_destinations` busiest; else `other`.
//!
//! "Busiest" is learned from the recipients received, with the
//! space-saving algorithm (Metwally, Agrawal, El Abbadi, 2005): a fixed
//! number of counters, where a domain not counted yet takes over the
//! smallest counter and records it as its possible overcount. A domain
//! takes a label of its own once its guaranteed count (count minus
//! overcount) reaches `top_destination_min_recipients`, while labels are
//! free. A label once given is kept until restart: counters stay
//! monotonic, no series disappears, and at most `top_destinations` domain
//! series ever exist. Recipients counted before a domain took its label
//! stay in `other`. Once every label is given, the counters are dropped.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use crate::config::MetricsConfig;
use crate::policy::{DomainPattern, normalize_domain};

/// The label of domains outside every group and the top list.
pub const OTHER: &str = "other";

/// Counters kept per label to give: enough that a domain with more than an
/// eighth of a label's share of the traffic is never pushed out.
const COUNTERS_PER_LABEL: usize = 8;

/// Grouping of recipient domains into `destination` label values.
#[derive(Debug)]
pub struct Destinations {
    exact: HashMap<String, String>,
    subdomains: Vec<(DomainPattern, String)>,
    limit: usize,
    min_recipients: u64,
    /// Domains with a label of their own (read on every outcome).
    top: RwLock<HashMap<String, ()>>,
    /// The counters, while labels are still free.
    sketch: Mutex<Option<SpaceSaving>>,
}

impl Destinations {
    pub fn new(config: &MetricsConfig) -> Destinations {
        let mut exact = HashMap::new();
        let mut subdomains = Vec::new();
        for (group, patterns) in &config.destination_groups {
            for p in patterns {
                match p.get_ref() {
                    DomainPattern::Exact(d) => {
                        exact.insert(d.clone(), group.get_ref().clone());
                    }
                    sub @ DomainPattern::Subdomains(_) => {
                        subdomains.push((sub.clone(), group.get_ref().clone()));
                    }
                }
            }
        }
        let limit = config.top_destinations;
        Destinations {
            exact,
            subdomains,
            limit,
            min_recipients: config.top_destination_min_recipients.max(1),
            top: RwLock::new(HashMap::new()),
            sketch: Mutex::new(
                (limit > 0).then(|| SpaceSaving::new(limit.saturating_mul(COUNTERS_PER_LABEL))),
            ),
        }
    }

    fn group(&self, domain: &str) -> Option<&str> {
        if let Some(g) = self.exact.get(domain) {
            return Some(g);
        }
        self.subdomains
            .iter()
            .find(|(p, _)| p.matches(domain))
            .map(|(_, g)| g.as_str())
    }

    /// The label of `domain` now, without counting anything (outcomes).
    pub fn label(&self, domain: &str) -> String {
        let domain = normalize_domain(domain);
        if let Some(g) = self.group(&domain) {
            return g.to_string();
        }
        if self.top.read().expect("top lock").contains_key(&domain) {
            return domain;
        }
        OTHER.to_string()
    }

    /// Counts one recipient received for `domain`, and returns its label.
    pub fn count(&self, domain: &str) -> String {
        let domain = normalize_domain(domain);
        if let Some(g) = self.group(&domain) {
            return g.to_string();
        }
        if self.top.read().expect("top lock").contains_key(&domain) {
            return domain;
        }
        let mut sketch = self.sketch.lock().expect("sketch lock");
        let Some(s) = sketch.as_mut() else {
            return OTHER.to_string();
        };
        if s.add(&domain) < self.min_recipients {
            return OTHER.to_string();
        }
        let mut top = self.top.write().expect("top lock");
        top.insert(domain.clone(), ());
        if top.len() >= self.limit {
            // Every label is given: nothing more to learn.
            *sketch = None;
        }
        domain
    }

    /// Domains with a label of their own, sorted.
    pub fn top(&self) -> Vec<String> {
        let mut v: Vec<String> = self.top.read().expect("top lock").keys().cloned().collect();
        v.sort();
        v
    }
}

/// The space-saving counters: at most `capacity` domains.
#[derive(Debug)]
struct SpaceSaving {
    capacity: usize,
    /// (domain, count, overcount)
    entries: Vec<(String, u64, u64)>,
    index: HashMap<String, usize>,
}

impl SpaceSaving {
    fn new(capacity: usize) -> SpaceSaving {
        SpaceSaving {
            capacity: capacity.max(1),
            entries: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Counts one for `domain`; its guaranteed count.
    fn add(&mut self, domain: &str) -> u64 {
        if let Some(&i) = self.index.get(domain) {
            let e = &mut self.entries[i];
            e.1 += 1;
            return e.1 - e.2;
        }
        if self.entries.len() < self.capacity {
            self.index.insert(domain.to_string(), self.entries.len());
            self.entries.push((domain.to_string(), 1, 0));
            return 1;
        }
        let (i, _) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.1)
            .expect("capacity is at least 1");
        let min = self.entries[i].1;
        let old = std::mem::replace(&mut self.entries[i], (domain.to_string(), min + 1, min));
        self.index.remove(&old.0);
        self.index.insert(domain.to_string(), i);
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> MetricsConfig {
        crate::config::Config::parse(text, std::path::Path::new("t.toml"))
            .unwrap()
            .metrics
    }

    #[test]
    fn groups_come_first_then_the_busiest_domains_then_other() {
        let d = Destinations::new(&config(
            "[metrics]\ntop_destinations = 2\ntop_destination_min_recipients = 3\n[metrics.destination_groups]\ngoogle = [\"gmail.com\", \"*.google.com\"]\n",
        ));
        assert_eq!(d.count("Gmail.COM"), "google");
        assert_eq!(d.count("mx.google.com"), "google");
        assert_eq!(d.label("google.com"), OTHER, "*. is for subdomains only");
        // Two recipients are not yet enough; the third gives the label.
        assert_eq!(d.count("a.example"), OTHER);
        assert_eq!(d.count("a.example"), OTHER);
        assert_eq!(d.label("a.example"), OTHER);
        assert_eq!(d.count("a.example"), "a.example");
        assert_eq!(d.label("A.example."), "a.example");
        for _ in 0..3 {
            d.count("b.example");
        }
        assert_eq!(d.top(), ["a.example", "b.example"]);
        // Every label given: a busier domain later still goes to other.
        for _ in 0..10 {
            assert_eq!(d.count("c.example"), OTHER);
        }
        assert_eq!(d.label("b.example"), "b.example");
    }

    #[test]
    fn one_off_domains_never_take_a_label_however_many() {
        // 1000 domains seen once each push each other out of 16 counters;
        // none has a guaranteed count above 1, so none is labelled, and the
        // domain that really is busy still is.
        let d = Destinations::new(&config(
            "[metrics]\ntop_destinations = 2\ntop_destination_min_recipients = 50\n",
        ));
        for i in 0..1000 {
            assert_eq!(d.count(&format!("d{i}.example")), OTHER);
            if i % 4 == 0 {
                d.count("busy.example");
            }
        }
        assert_eq!(d.top(), ["busy.example"]);
    }

    #[test]
    fn zero_labels_means_groups_and_other_only() {
        let d = Destinations::new(&config("[metrics]\ntop_destinations = 0\n"));
        for _ in 0..200 {
            assert_eq!(d.count("a.example"), OTHER);
        }
        assert!(d.top().is_empty());
    }

    #[test]
    fn space_saving_guarantees_a_lower_bound() {
        let mut s = SpaceSaving::new(2);
        assert_eq!(s.add("a"), 1);
        assert_eq!(s.add("a"), 2);
        assert_eq!(s.add("b"), 1);
        // c takes b's counter (1) and records 1 as its overcount.
        assert_eq!(s.add("c"), 1);
        assert_eq!(s.add("c"), 2);
        assert_eq!(s.add("a"), 3);
        assert!(!s.index.contains_key("b"));
    }
}
