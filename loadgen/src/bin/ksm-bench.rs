//! `ksm-bench`: side-by-side KSM benchmark (work in progress).

fn main() {}
