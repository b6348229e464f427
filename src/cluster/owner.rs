//! The owner rule: rendezvous (highest random weight) hashing. Every
//! replica that sees the same live set picks the same owner for a key
//! with no coordination; when a replica leaves, only the keys it owned
//! move (each to its own next-highest replica), and a replica that joins
//! takes about `1/n` of the keys from the others.

use sha2::{Digest as _, Sha256};

/// A key's weight on replica `id`: the first 8 bytes of
/// `sha256(id ‖ 0 ‖ key)` (the zero keeps `id` and `key` apart).
fn weight(id: &str, key: &[u8]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(id.as_bytes());
    hasher.update([0]);
    hasher.update(key);
    let hash = hasher.finalize();
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// The id among `ids` that owns `key`; `None` only for no ids. Ties
/// (practically impossible) go to the greater id, so every replica still
/// agrees.
pub fn owner<'a>(ids: impl IntoIterator<Item = &'a str>, key: &[u8]) -> Option<&'a str> {
    ids.into_iter().max_by_key(|id| (weight(id, key), *id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:08x}-replica")).collect()
    }

    fn owners(ids: &[String], keys: usize) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let key = format!("sha256:{k:064x}");
                owner(ids.iter().map(String::as_str), key.as_bytes())
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn ownership_is_balanced() {
        let replicas = ids(5);
        let keys = 20_000;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for owner in owners(&replicas, keys) {
            *counts.entry(owner).or_default() += 1;
        }
        assert_eq!(counts.len(), 5);
        let fair = keys / 5;
        for (id, count) in counts {
            assert!(
                count.abs_diff(fair) < fair / 10,
                "{id} owns {count} of {keys} keys, fair is {fair}"
            );
        }
    }

    #[test]
    fn a_leaving_replica_moves_only_its_own_keys() {
        let replicas = ids(4);
        let before = owners(&replicas, 10_000);
        let gone = &replicas[2];
        let remaining: Vec<String> = replicas.iter().filter(|id| *id != gone).cloned().collect();
        let after = owners(&remaining, 10_000);
        for (old, new) in before.iter().zip(&after) {
            if old != gone {
                assert_eq!(old, new, "a key moved between replicas that stayed");
            }
        }
        let moved = before.iter().filter(|old| *old == gone).count();
        assert!(moved > 0);
    }

    #[test]
    fn a_joining_replica_takes_keys_only_for_itself() {
        let replicas = ids(3);
        let before = owners(&replicas, 10_000);
        let joined = ids(4);
        let after = owners(&joined, 10_000);
        let newcomer = &joined[3];
        for (old, new) in before.iter().zip(&after) {
            assert!(old == new || new == newcomer);
        }
    }

    #[test]
    fn the_order_of_replicas_does_not_matter_and_nobody_owns_nothing() {
        let mut replicas = ids(3);
        let forward = owners(&replicas, 100);
        replicas.reverse();
        assert_eq!(forward, owners(&replicas, 100));
        assert_eq!(owner(std::iter::empty(), b"gc"), None);
    }
}
