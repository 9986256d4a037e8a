//! Passwords: from a file, or typed at a terminal. Never echoed or logged.

use std::fmt;
use std::io::IsTerminal;
use std::path::Path;

use zeroize::Zeroizing;

use crate::Error;

/// A password. Zeroized on drop, printed as `REDACTED`.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// Wrap a string; empty passwords are refused.
    pub fn new(text: impl Into<String>) -> Result<Self, Error> {
        let s = Zeroizing::new(text.into());
        if s.is_empty() {
            return Err(Error::InvalidInput("the password is empty".to_owned()));
        }
        Ok(Self(s))
    }

    /// The bytes, for the key derivation.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(REDACTED)")
    }
}

/// Read the password from `file` (one trailing newline is dropped), or, if
/// no file is given, prompt on the terminal (twice when `confirm`).
pub fn obtain(file: Option<&Path>, prompt: &str, confirm: bool) -> Result<Password, Error> {
    if let Some(path) = file {
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| Error::io(path, e))?);
        let text = std::str::from_utf8(&raw).map_err(|_| Error::InvalidInput(format!("{} is not UTF-8", path.display())))?;
        let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
        return Password::new(text);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::InvalidInput("no password: give --password-file, or run on a terminal to be prompted".to_owned()));
    }
    let first = Password::new(rpassword::prompt_password(prompt).map_err(|e| Error::io("/dev/tty", e))?)?;
    if confirm {
        let again = Zeroizing::new(rpassword::prompt_password("Repeat the password: ").map_err(|e| Error::io("/dev/tty", e))?);
        if again.as_bytes() != first.expose() {
            return Err(Error::InvalidInput("the passwords differ".to_owned()));
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_file_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "hunter2\r\n").unwrap();
        let pw = obtain(Some(&p), "", false).unwrap();
        assert_eq!(pw.expose(), b"hunter2");
        assert_eq!(format!("{pw:?}"), "Password(REDACTED)");
        std::fs::write(&p, "\n").unwrap();
        assert!(obtain(Some(&p), "", false).is_err());
        assert!(obtain(Some(&dir.path().join("none")), "", false).is_err());
    }
}
