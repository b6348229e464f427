//! `auth.groups.path`: which groups each user belongs to, for access rules.
//! One group per line, `group: user1, user2`; `#` starts a comment line. A
//! group may span several lines (they add up).

use std::collections::HashMap;

/// user → groups, as the file lists them.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    of_user: HashMap<String, Vec<String>>,
}

impl Groups {
    /// Parses the file; the error names the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut of_user: HashMap<String, Vec<String>> = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (group, users) = line
                .split_once(':')
                .ok_or_else(|| format!("line {}: expected `group: user1, user2`", number + 1))?;
            let group = group.trim();
            if group.is_empty() {
                return Err(format!("line {}: the group has no name", number + 1));
            }
            for user in users.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                let groups = of_user.entry(user.to_owned()).or_default();
                if !groups.iter().any(|g| g == group) {
                    groups.push(group.to_owned());
                }
            }
        }
        Ok(Self { of_user })
    }

    pub fn of(&self, user: &str) -> Vec<String> {
        self.of_user.get(user).cloned().unwrap_or_default()
    }

    /// Group → members, sorted, as `kura config check` prints them.
    pub fn members(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut members: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (user, groups) in &self.of_user {
            for group in groups {
                members.entry(group.clone()).or_default().push(user.clone());
            }
        }
        members.values_mut().for_each(|users| users.sort());
        members
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_map_users_to_groups() {
        let groups =
            Groups::parse("# teams\nops: alice, bob\n\ndevs:carol,alice\nops: dave\nempty:\n")
                .unwrap();
        assert_eq!(groups.of("alice"), ["ops", "devs"]);
        assert_eq!(groups.of("dave"), ["ops"]);
        assert!(groups.of("nobody").is_empty());
        assert_eq!(groups.members()["ops"], ["alice", "bob", "dave"]);
        assert!(Groups::parse("ops alice\n").unwrap_err().contains("line 1"));
        assert!(Groups::parse("a: b\n: c\n").unwrap_err().contains("line 2"));
    }
}
