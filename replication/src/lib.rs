//! Replication between the two datacenters over QUIC. Built by a later issue.
#![forbid(unsafe_code)]
