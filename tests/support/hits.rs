//! What a stub upstream was asked: requests counted by `METHOD target`
//! (`target` being the path, or path and query, as the stub records it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Hits(Arc<Mutex<HashMap<String, usize>>>);

impl Hits {
    pub fn record(&self, method: &str, target: &str) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(format!("{method} {target}"))
            .or_default() += 1;
    }

    /// Requests seen for exactly `method target`.
    pub fn of(&self, method: &str, target: &str) -> usize {
        let key = format!("{method} {target}");
        self.0.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    /// Requests seen whose `METHOD target` contains `substring`.
    pub fn containing(&self, substring: &str) -> usize {
        let hits = self.0.lock().unwrap();
        hits.iter()
            .filter(|(key, _)| key.contains(substring))
            .map(|(_, count)| count)
            .sum()
    }
}
