//! The validation server (Yubico validation protocol 2.0). Built by a later issue.
#![forbid(unsafe_code)]
