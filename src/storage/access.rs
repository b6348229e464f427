//! Access recency, cheap to track: a request only updates an in-memory
//! map; a periodic flush writes the times out as blob file mtimes (one
//! syscall per blob used since the last flush, never one per request).
//! Eviction reads `max(mtime, in-memory time)`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::reference::Digest;

#[derive(Debug, Default)]
pub struct AccessTracker {
    recent: Mutex<HashMap<Digest, SystemTime>>,
}

impl AccessTracker {
    pub fn record(&self, digest: &Digest) {
        let now = SystemTime::now();
        let mut recent = self.recent.lock().expect("access lock");
        match recent.get_mut(digest) {
            Some(time) => *time = now,
            None => {
                recent.insert(digest.clone(), now);
            }
        }
    }

    /// Accesses not yet flushed.
    pub fn snapshot(&self) -> HashMap<Digest, SystemTime> {
        self.recent.lock().expect("access lock").clone()
    }

    /// Takes the accesses to flush, leaving the map empty.
    pub fn drain(&self) -> HashMap<Digest, SystemTime> {
        std::mem::take(&mut *self.recent.lock().expect("access lock"))
    }
}
