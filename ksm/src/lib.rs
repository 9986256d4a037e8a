//! ksm
