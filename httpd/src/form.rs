//! `application/x-www-form-urlencoded` query strings and bodies.
//!
//! Strict: a `%` must be followed by two hex digits, the decoded bytes must
//! be UTF-8, and a key the caller asks for must not be repeated. Anything
//! else is an error, never a guess.

/// A form that cannot be read unambiguously.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormError {
    /// A `%` not followed by two hex digits, or bytes that are not UTF-8.
    Escape,
    /// A key appears more than once.
    Repeated,
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Escape => "malformed percent-escape or non-UTF-8 bytes",
            Self::Repeated => "a parameter appears more than once",
        })
    }
}

impl std::error::Error for FormError {}

/// Every `key=value` pair, decoded, in order. Empty segments (`a=1&&b=2`)
/// are skipped; a segment without `=` has an empty value. Keys may repeat.
pub fn pairs(form: &str) -> Result<Vec<(String, String)>, FormError> {
    form.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// The value of `key`; an error if it appears twice.
pub fn value(form: &str, key: &str) -> Result<Option<String>, FormError> {
    let mut found = None;
    for (k, v) in pairs(form)? {
        if k == key {
            if found.is_some() {
                return Err(FormError::Repeated);
            }
            found = Some(v);
        }
    }
    Ok(found)
}

/// Percent-decode one key or value (`+` is a space).
pub fn decode(s: &str) -> Result<String, FormError> {
    if !s.contains(['%', '+']) {
        return Ok(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let digit = |j: usize| b.get(j).and_then(|c| char::from(*c).to_digit(16)).ok_or(FormError::Escape);
                out.push(u8::try_from(digit(i + 1)? * 16 + digit(i + 2)?).map_err(|_| FormError::Escape)?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::Escape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(value("otp=abc", "otp"), Ok(Some("abc".to_owned())));
        assert_eq!(value("a=1&otp=ab%63&b", "otp"), Ok(Some("abc".to_owned())));
        assert_eq!(value("o%74p=x+y", "otp"), Ok(Some("x y".to_owned())));
        assert_eq!(value("otp", "otp"), Ok(Some(String::new())));
        assert_eq!(value("other=1", "otp"), Ok(None));
        assert_eq!(value("", "otp"), Ok(None));
        assert_eq!(value("otp=a&otp=b", "otp"), Err(FormError::Repeated));
        for bad in ["otp=%", "otp=%4", "otp=%zz", "otp=%ff", "otp=%+1", "%zz=1"] {
            assert_eq!(value(bad, "otp"), Err(FormError::Escape), "{bad}");
        }
    }

    #[test]
    fn all_pairs_in_order() {
        let p = pairs("id=1&&nonce=abc&h=a%2Bb%3D&x").unwrap();
        let want = [("id", "1"), ("nonce", "abc"), ("h", "a+b="), ("x", "")];
        assert_eq!(p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(), want);
    }
}
