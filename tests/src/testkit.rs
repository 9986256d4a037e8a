//! Reader for the testkit-style vector files (see `tests/vectors/README.md`).
//!
//! A file is a list of `key: value` lines. Blank lines and lines starting with
//! `#` are ignored. Keys are lowercase ASCII letters, digits and `-`; each key
//! appears at most once; a value is everything after `": "` and may not end in
//! whitespace (so nothing invisible can hide in a vector). `key:` alone gives
//! an empty value.
//!
//! Every read through a [`Case`] marks the key as used; [`Case::unused`] lists
//! the keys nobody read, which the runner treats as an error.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// One vector file: its path and its header lines, in file order.
#[derive(Debug)]
pub struct Case {
    path: PathBuf,
    fields: Vec<(String, String)>,
    used: RefCell<BTreeSet<String>>,
}

impl Case {
    /// Parse the text of a vector file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        if text.contains('\r') {
            return Err("carriage return in file (use LF line ends)".to_owned());
        }
        let mut fields: Vec<(String, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, rest)) = line.split_once(':') else {
                return Err(format!("line {n}: expected `key: value`, got {line:?}"));
            };
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return Err(format!("line {n}: bad key {key:?}"));
            }
            let value = if rest.is_empty() {
                ""
            } else if let Some(v) = rest.strip_prefix(' ') {
                v
            } else {
                return Err(format!("line {n}: a space must follow `{key}:`"));
            };
            if value.ends_with(char::is_whitespace) {
                return Err(format!("line {n}: value of `{key}` ends in whitespace"));
            }
            if fields.iter().any(|(k, _)| k == key) {
                return Err(format!("line {n}: key `{key}` appears twice"));
            }
            fields.push((key.to_owned(), value.to_owned()));
        }
        if fields.is_empty() {
            return Err("no header lines".to_owned());
        }
        Ok(Self { path: path.to_owned(), fields, used: RefCell::new(BTreeSet::new()) })
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
        Self::parse(path, &text)
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header keys, in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(k, _)| k.as_str())
    }

    /// A value, if present. Marks the key as used.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        let v = self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if v.is_some() {
            self.used.borrow_mut().insert(key.to_owned());
        }
        v
    }

    /// A value that must be present.
    pub fn req(&self, key: &str) -> Result<&str, String> {
        self.get(key).ok_or_else(|| format!("missing key `{key}`"))
    }

    /// A hex value (spaces allowed between digits), if present.
    pub fn hex(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.get(key).map(|v| decode_hex(v).map_err(|e| format!("`{key}`: {e}"))).transpose()
    }

    /// A hex value that must be present.
    pub fn req_hex(&self, key: &str) -> Result<Vec<u8>, String> {
        self.hex(key)?.ok_or_else(|| format!("missing key `{key}`"))
    }

    /// A number, `0x`-prefixed hex or decimal, if present.
    pub fn num(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key).map(|v| parse_number(v).map_err(|e| format!("`{key}`: {e}"))).transpose()
    }

    /// A number that must be present.
    pub fn req_num(&self, key: &str) -> Result<u64, String> {
        self.num(key)?.ok_or_else(|| format!("missing key `{key}`"))
    }

    /// Keys that no reader has asked for.
    #[must_use]
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.keys().filter(|k| !used.contains(*k)).map(str::to_owned).collect()
    }

    /// A fresh copy (nothing marked used) with one value replaced.
    #[must_use]
    pub fn with_value(&self, key: &str, value: &str) -> Self {
        let fields = self.fields.iter().map(|(k, v)| (k.clone(), if k == key { value.to_owned() } else { v.clone() })).collect();
        Self { path: self.path.clone(), fields, used: RefCell::new(BTreeSet::new()) }
    }
}

/// Decode hex digits, ignoring spaces between them.
pub fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text.chars().filter(|c| *c != ' ').collect();
    hex::decode(&digits).map_err(|e| format!("bad hex {text:?}: {e}"))
}

/// Parse `0x`-prefixed hex or plain decimal.
pub fn parse_number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => text.parse::<u64>(),
    };
    parsed.map_err(|e| format!("bad number {text:?}: {e}"))
}

/// What a directory walk found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Every regular file, sorted.
    pub files: Vec<PathBuf>,
    /// Directories with no entries at all.
    pub empty_dirs: Vec<PathBuf>,
    /// Entries that are neither regular files nor directories (symlinks, …).
    pub others: Vec<PathBuf>,
}

/// Walk `root` recursively.
pub fn walk(root: &Path) -> Result<Walk, String> {
    let mut out = Walk::default();
    walk_into(root, &mut out)?;
    out.files.sort();
    Ok(out)
}

fn walk_into(dir: &Path, out: &mut Walk) -> Result<(), String> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    entries.sort_by_key(fs::DirEntry::path);
    if entries.is_empty() {
        out.empty_dirs.push(dir.to_owned());
    }
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| format!("{}: {e}", path.display()))?;
        if kind.is_dir() {
            walk_into(&path, out)?;
        } else if kind.is_file() {
            out.files.push(path);
        } else {
            out.others.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests may panic")]
mod tests {
    use super::*;

    #[test]
    fn parses_and_tracks_use() {
        let c = Case::parse(Path::new("x"), "# note\nkind: aead\n\nempty:\nhex: 00 ff\nn: 0x10\n").unwrap();
        assert_eq!(c.get("kind"), Some("aead"));
        assert_eq!(c.hex("hex").unwrap(), Some(vec![0, 255]));
        assert_eq!(c.num("n").unwrap(), Some(16));
        assert_eq!(c.unused(), vec!["empty".to_owned()]);
        assert_eq!(c.get("empty"), Some(""));
        assert!(c.unused().is_empty());
        assert!(c.req("absent").is_err());
    }

    #[test]
    fn rejects_malformed_files() {
        for bad in ["kind aead", "Kind: x", "kind:x", "kind: x ", "a: 1\na: 2", "", "# only\n", "kind: x\r\n"] {
            assert!(Case::parse(Path::new("x"), bad).is_err(), "{bad:?}");
        }
    }
}
