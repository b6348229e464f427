//! Reading the YAML tree: `REGISTRY_*` environment overrides, typed
//! lookups by dotted path, and the list of keys nobody read (ignored).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use super::{ConfigError, invalid};

/// Distribution's rule: `REGISTRY_PROXY_REMOTEURL=x` sets `proxy.remoteurl: x`.
pub fn apply_env_overrides(tree: &mut Value, env: impl IntoIterator<Item = (String, String)>) {
    for (name, value) in env {
        let Some(path) = name.strip_prefix("REGISTRY_") else {
            continue;
        };
        let segments: Vec<String> = path.split('_').map(str::to_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            continue;
        }
        set_path(tree, &segments, Value::String(value));
    }
}

fn set_path(tree: &mut Value, segments: &[String], value: Value) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut node = tree;
    for segment in parents {
        if !matches!(node, Value::Mapping(_)) {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            unreachable!("just made a mapping")
        };
        node = map
            .entry(Value::String(segment.clone()))
            .or_insert(Value::Mapping(Mapping::new()));
    }
    if !matches!(node, Value::Mapping(_)) {
        *node = Value::Mapping(Mapping::new());
    }
    if let Value::Mapping(map) = node {
        map.insert(Value::String(last.clone()), value);
    }
}

/// Go-style durations (`168h`, `1m30s`, `500ms`); a bare `0` disables.
pub fn parse_duration(key: &str, raw: &str) -> Result<Duration, ConfigError> {
    let raw = raw.trim();
    if raw == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(raw).map_err(|e| {
        invalid(
            key,
            format!("{raw:?} is not a duration like 30s or 168h: {e}"),
        )
    })
}

/// Reads typed values by dotted path and remembers which were read, so the
/// rest can be reported as ignored.
pub struct KeyReader<'a> {
    tree: &'a Value,
    /// Prepended to key names in errors and in the ignored list, for
    /// readers of a list item (`upstreams[0].`).
    label: String,
    read: BTreeSet<String>,
}

impl<'a> KeyReader<'a> {
    pub fn new(tree: &'a Value) -> Self {
        Self::labelled(tree, String::new())
    }

    pub fn labelled(tree: &'a Value, label: String) -> Self {
        Self {
            tree,
            label,
            read: BTreeSet::new(),
        }
    }

    /// A list of maps at `key`, each with its own reader.
    pub fn list(&mut self, key: &str) -> Result<Vec<KeyReader<'a>>, ConfigError> {
        self.read.insert(key.to_owned());
        let items = match self.lookup(key) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Sequence(items)) => items,
            Some(_) => return Err(self.invalid(key, "expected a list")),
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, item)| KeyReader::labelled(item, format!("{}{key}[{i}].", self.label)))
            .collect())
    }

    /// The key's full name, as errors and the ignored list show it.
    pub fn label_of(&self, key: &str) -> String {
        format!("{}{key}", self.label)
    }

    /// An error naming the key with this reader's label.
    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        invalid(&self.label_of(key), reason)
    }

    fn lookup(&self, key: &str) -> Option<&'a Value> {
        key.split('.')
            .try_fold(self.tree, |node, segment| node.get(segment))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.lookup(key).is_some()
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        self.read.insert(key.to_owned());
        match self.lookup(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => scalar(value)
                .map(Some)
                .ok_or_else(|| self.invalid(key, "expected a single value, found a list or map")),
        }
    }

    /// A list of single values; one value alone (what a `REGISTRY_*`
    /// variable sets) is a list of one.
    pub fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        self.read.insert(key.to_owned());
        match self.lookup(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| {
                    scalar(item).ok_or_else(|| self.invalid(key, "expected a list of values"))
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(value) => scalar(value)
                .map(|one| Some(vec![one]))
                .ok_or_else(|| self.invalid(key, "expected a list of values")),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.string(key)?.as_deref() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(self.invalid(key, format!("{other:?} is not true or false"))),
        }
    }

    /// A positive integer.
    pub fn count(&mut self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(raw) => match raw.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(self.invalid(key, format!("{raw:?} is not a positive integer"))),
            },
        }
    }

    pub fn duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.string(key)?
            .map(|raw| parse_duration(&self.label_of(key), &raw))
            .transpose()
    }

    /// Every leaf path in the tree that no reader asked for.
    pub fn unread_leaves(&self) -> Vec<String> {
        let mut leaves = Vec::new();
        collect_leaves(self.tree, String::new(), &mut leaves);
        leaves.retain(|leaf| !self.read.contains(leaf));
        leaves
            .into_iter()
            .map(|leaf| self.label_of(&leaf))
            .collect()
    }
}

/// A string, number or boolean as the text it was written as.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn collect_leaves(node: &Value, prefix: String, out: &mut Vec<String>) {
    match node {
        Value::Mapping(map) if !map.is_empty() => {
            for (key, child) in map {
                let key = match key {
                    Value::String(s) => s.clone(),
                    other => serde_yaml_ng::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                collect_leaves(child, path, out);
            }
        }
        _ if !prefix.is_empty() => out.push(prefix),
        _ => {}
    }
}
