//! The personalizer: YubiKey secrets are generated inside the security
//! module and leave it only as AEADs, and once as personalisation output.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod cli;
pub mod event;
pub mod generate;
pub mod home;
pub mod ledger;
pub mod migrate;
pub mod operators;
pub mod output;
pub mod quorum;

pub use crate::generate::{export_secrets, generate, resume, Error, GenerateParams, RunOptions, RunReport, StartId};
pub use crate::output::yubikey_csv_line;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use otp::{PublicId, YubiKeySecrets};

    #[test]
    fn start_ids() {
        assert_eq!("1".parse::<StartId>().unwrap(), StartId(1));
        assert_eq!("cccccccccccb".parse::<StartId>().unwrap(), StartId(1));
        assert!("xyz".parse::<StartId>().is_err());
    }

    #[test]
    fn csv_line_format() {
        let s = YubiKeySecrets::from_plaintext(&hex::decode("000102030405060708090a0b0c0d0e0f010203040506").unwrap()).unwrap();
        let id = PublicId::from_number(1, 6).unwrap();
        assert_eq!(&*yubikey_csv_line(8, &id, &s), "8,cccccccccccb,010203040506,000102030405060708090a0b0c0d0e0f,000000000000,,,,,,\n");
    }
}
