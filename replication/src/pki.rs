//! The private replication CA and the site certificates.
//!
//! One CA, used for nothing but replication, signs one certificate per
//! site (`auth1`, `auth2`, `witness`, …). A site certificate carries its
//! name as its only DNS subject alternative name and both extended key
//! usages, client and server authentication, because every site both dials
//! and accepts (mutual TLS over one QUIC endpoint).
//!
//! Being signed by the CA is necessary but not sufficient: the transport
//! also requires every peer to match an authorization rule, a pinned
//! [`Fingerprint`] (SHA-256 of the certificate's DER encoding, as
//! `replication cert show` prints it) and/or an allowed name.
//!
//! Files: the CA is `ca.pem` + `ca.key` in its directory, a site is
//! `<name>.pem` + `<name>.key`. Keys are PKCS#8 PEM, written mode 0600
//! with [`hsm::fsutil::write_atomic`], which never overwrites an existing
//! file. Keys are ECDSA P-256 (ring).
//!
//! Secrets in memory: PEM and DER copies of keys are held in
//! [`Zeroizing`] buffers. The key objects of `ring` (inside rcgen's
//! `KeyPair` and rustls' signing keys) are not zeroized on drop; that is a
//! limit of those crates.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hsm::fsutil::{self, Mode};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name given to a new CA unless another is chosen.
pub const DEFAULT_CA_NAME: &str = "otp-appliance replication CA";
/// Default validity of a new CA: ten years.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);
/// Default validity of a site certificate: five years, never past the CA's.
pub const DEFAULT_SITE_VALIDITY: Duration = Duration::from_secs(1825 * 86_400);
/// How far `not_before` is set in the past, for clocks that lag a little.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// What can go wrong with keys and certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file already exists where a key or certificate would be written.
    #[error("{0} already exists; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Writing a key or certificate file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: hsm::Error,
    },
    /// A file does not hold what it should (PEM, certificate, key).
    #[error("{path}: {reason}")]
    Parse {
        /// The file, or a description of the input.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A site name that cannot be a certificate name and a file name.
    #[error("invalid site name {0:?}: use 1-63 characters per label from a-z, 0-9 and '-', labels separated by '.'")]
    InvalidName(String),
    /// A fingerprint that is not 32 bytes of hex.
    #[error("invalid SHA-256 fingerprint {0:?}: expected 64 hex digits, optionally colon-separated and prefixed with \"sha256:\"")]
    InvalidFingerprint(String),
    /// Validity period out of range.
    #[error("invalid validity period: {0}")]
    Validity(String),
    /// rcgen could not generate a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The SHA-256 digest of a certificate's DER encoding: the pin.
///
/// Displayed as `sha256:` followed by 64 lower-case hex digits, as
/// `replication cert show` prints it. Parsing also accepts upper case,
/// colons between bytes (OpenSSL's `-fingerprint -sha256` output) and no
/// prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let body = trimmed.strip_prefix("sha256:").or_else(|| trimmed.strip_prefix("SHA256:")).unwrap_or(trimmed);
        let digits: String = body.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| Error::InvalidFingerprint(s.to_string()))?;
        Ok(Self(out))
    }
}

/// Checks that `name` can be a site name: a DNS name of lower-case labels
/// (`[a-z0-9-]`, 1-63 characters, no leading or trailing '-'), which is
/// also a safe file name.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bad = || Error::InvalidName(name.to_string());
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok_chars = label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if label.is_empty() || label.len() > 63 || !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err(bad());
        }
    }
    Ok(())
}

/// Now, truncated to whole seconds (X.509 times have no fractions).
fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// A time as `YYYY-MM-DD hh:mm:ss UTC`.
pub fn display_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
}

fn validity_span(valid_for: Duration) -> Result<time::Duration, Error> {
    let span = time::Duration::try_from(valid_for).map_err(|e| Error::Validity(e.to_string()))?;
    if span < time::Duration::hours(1) {
        return Err(Error::Validity("shorter than one hour".into()));
    }
    if span > time::Duration::days(100 * 365) {
        return Err(Error::Validity("longer than 100 years".into()));
    }
    Ok(span)
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    fs::read(path).map(Zeroizing::new).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    fsutil::write_atomic(path, bytes, Mode::CreateNew).map_err(|source| match source {
        hsm::Error::AlreadyExists(p) => Error::AlreadyExists(p),
        source => Error::Write { path: path.to_path_buf(), source },
    })
}

/// Writes a certificate (public) with `write_atomic`, then opens it to 0644.
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_new(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Refuses early if any of `paths` exists, so that nothing is half-written.
fn refuse_existing(paths: &[&Path]) -> Result<(), Error> {
    for p in paths {
        if fs::symlink_metadata(p).is_ok() {
            return Err(Error::AlreadyExists(p.to_path_buf()));
        }
    }
    Ok(())
}

/// Writes a key (0600) then its certificate; removes the key again if the
/// certificate cannot be written, so that a retry starts clean.
fn write_pair(key_path: &Path, key_pem: &[u8], cert_path: &Path, cert_pem: &[u8]) -> Result<(), Error> {
    refuse_existing(&[key_path, cert_path])?;
    write_new(key_path, key_pem)?;
    if let Err(e) = write_public(cert_path, cert_pem) {
        let _ = fs::remove_file(key_path);
        return Err(e);
    }
    Ok(())
}

/// Reads the first certificate of a PEM file.
pub fn load_certificate(path: &Path) -> Result<CertificateDer<'static>, Error> {
    let pem = read_file(path)?;
    certificate_from_pem(&pem).map_err(|reason| Error::Parse { path: path.to_path_buf(), reason })
}

fn certificate_from_pem(pem: &[u8]) -> Result<CertificateDer<'static>, String> {
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(cert)) => Ok(cert),
        Some(Err(e)) => Err(format!("not a PEM certificate: {e}")),
        None => Err("no PEM CERTIFICATE block".into()),
    }
}

/// The private CA: its certificate and signing key.
pub struct Ca {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: Zeroizing<KeyPair>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .field("not_after", &self.not_after)
            .field("key", &"REDACTED")
            .finish()
    }
}

/// Where [`Ca::write`] or [`SiteCert::write`] put the files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFiles {
    /// The certificate (PEM, mode 0644).
    pub cert: PathBuf,
    /// The private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

impl Ca {
    /// A new CA (ECDSA P-256) with the given common name, valid from a few
    /// minutes ago for `valid_for`. Only site certificates sit below it
    /// (path length 0).
    pub fn generate(common_name: &str, valid_for: Duration) -> Result<Self, Error> {
        let span = validity_span(valid_for)?;
        if common_name.trim().is_empty() {
            return Err(Error::Validity("empty CA name".into()));
        }
        let now = now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = now - BACKDATE;
        params.not_after = now + span;
        let key = Zeroizing::new(KeyPair::generate()?);
        let cert = params.self_signed(&*key)?;
        Ok(Self { cert_pem: cert.pem(), cert: cert.der().clone(), key, not_after: params.not_after })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = load_certificate(&cert_path)?;
        let info = CertInfo::from_der(&cert).map_err(|reason| Error::Parse { path: cert_path.clone(), reason })?;
        if !info.is_ca {
            return Err(Error::Parse { path: cert_path, reason: "not a CA certificate".into() });
        }
        let key_pem = read_file(&key_path)?;
        let key_str =
            std::str::from_utf8(&key_pem).map_err(|_| Error::Parse { path: key_path.clone(), reason: "not a PEM file".into() })?;
        let key = Zeroizing::new(
            KeyPair::from_pem(key_str).map_err(|e| Error::Parse { path: key_path.clone(), reason: format!("not a private key: {e}") })?,
        );
        if rcgen::PublicKeyData::subject_public_key_info(&*key) != info.public_key_der {
            return Err(Error::Parse { path: key_path, reason: format!("key does not belong to {}", cert_path.display()) });
        }
        let cert_pem = String::from_utf8_lossy(&read_file(&cert_path)?).into_owned();
        Ok(Self { cert, cert_pem, key, not_after: info.not_after })
    }

    /// Writes `ca.key` (0600) and `ca.pem` (0644) into `dir`, which must
    /// exist. Refuses if either file exists.
    pub fn write(&self, dir: &Path) -> Result<WrittenFiles, Error> {
        let files = WrittenFiles { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) };
        let key_pem = Zeroizing::new(self.key.serialize_pem());
        write_pair(&files.key, key_pem.as_bytes(), &files.cert, self.cert_pem.as_bytes())?;
        Ok(files)
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// Issues a site certificate for `name` with a fresh key: subject
    /// CN=`name`, DNS SAN `name`, extended key usages client and server
    /// authentication. Valid for `valid_for`, but never past the CA.
    pub fn issue(&self, name: &str, valid_for: Duration) -> Result<SiteCert, Error> {
        validate_name(name)?;
        let span = validity_span(valid_for)?;
        let now = now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let dns = name.to_string().try_into().map_err(|_| Error::InvalidName(name.to_string()))?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + span).min(self.not_after);
        if params.not_after <= now {
            return Err(Error::Validity("the CA has expired".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&self.cert, &*self.key)?;
        let key = Zeroizing::new(KeyPair::generate()?);
        let cert = params.signed_by(&*key, &issuer)?;
        Ok(SiteCert {
            name: name.to_string(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            not_after: params.not_after,
        })
    }
}

/// A freshly issued site certificate with its private key.
pub struct SiteCert {
    name: String,
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: Zeroizing<String>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for SiteCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteCert").field("name", &self.name).field("fingerprint", &self.fingerprint()).field("key", &"REDACTED").finish()
    }
}

impl SiteCert {
    /// The site name (CN and DNS SAN).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificate's fingerprint: the value to pin at the peers.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// End of validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Writes `<name>.key` (0600) and `<name>.pem` (0644) into `dir`, which
    /// must exist. Refuses if either file exists.
    pub fn write(&self, dir: &Path) -> Result<WrittenFiles, Error> {
        let files = WrittenFiles { cert: dir.join(format!("{}.pem", self.name)), key: dir.join(format!("{}.key", self.name)) };
        write_pair(&files.key, self.key_pem.as_bytes(), &files.cert, self.cert_pem.as_bytes())?;
        Ok(files)
    }

    /// The identity the transport presents, without going through files.
    pub fn identity(&self) -> Result<Identity, Error> {
        Identity::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// A site's identity for the transport: its certificate and private key.
///
/// The key's DER bytes are zeroized when this is dropped. `Debug` never
/// prints the key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: Zeroizing<PrivateKeyDer<'static>>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { cert: self.cert.clone(), key: Zeroizing::new(self.key.clone_key()) }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint()).field("key", &"REDACTED").finish()
    }
}

impl Identity {
    /// Loads a certificate (the first PEM block of `cert_path`) and its
    /// private key (`key_path`, PKCS#8, SEC1 or PKCS#1 PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        let cert = load_certificate(cert_path)?;
        let key_pem = read_file(key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| Error::Parse { path: key_path.to_path_buf(), reason: format!("not a PEM private key: {e}") })?;
        Ok(Self { cert, key: Zeroizing::new(key) })
    }

    /// Parses a certificate and key from PEM bytes.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        let cert = certificate_from_pem(cert_pem).map_err(|reason| Error::Parse { path: "<certificate>".into(), reason })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::Parse { path: "<key>".into(), reason: format!("not a PEM private key: {e}") })?;
        Ok(Self { cert, key: Zeroizing::new(key) })
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// A copy of the private key for rustls (which takes ownership).
    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// What `replication cert show` prints about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// `basicConstraints CA:true`.
    pub is_ca: bool,
    /// Extended key usage includes TLS client authentication.
    pub client_auth: bool,
    /// Extended key usage includes TLS server authentication.
    pub server_auth: bool,
    /// SHA-256 of the DER encoding: the pin.
    pub fingerprint: Fingerprint,
    /// The SubjectPublicKeyInfo, DER.
    pub public_key_der: Vec<u8>,
}

impl CertInfo {
    /// Reads the first certificate of a PEM file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let der = load_certificate(path)?;
        Self::from_der(&der).map_err(|reason| Error::Parse { path: path.to_path_buf(), reason })
    }

    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let dns_names = dns_names_of(&cert)?;
        let eku = cert.extended_key_usage().map_err(|e| format!("bad extended key usage: {e}"))?;
        let (client_auth, server_auth) = match eku {
            Some(ext) => (ext.value.client_auth || ext.value.any, ext.value.server_auth || ext.value.any),
            None => (false, false),
        };
        let time = |t: x509_parser::time::ASN1Time| {
            OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| format!("bad validity time: {e}"))
        };
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            dns_names,
            not_before: time(cert.validity().not_before)?,
            not_after: time(cert.validity().not_after)?,
            is_ca: cert.is_ca(),
            client_auth,
            server_auth,
            fingerprint: Fingerprint::of(der),
            public_key_der: cert.public_key().raw.to_vec(),
        })
    }
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut usages = Vec::new();
        if self.is_ca {
            usages.push("CA");
        }
        if self.server_auth {
            usages.push("server auth");
        }
        if self.client_auth {
            usages.push("client auth");
        }
        writeln!(f, "subject:     {}", self.subject)?;
        writeln!(f, "issuer:      {}", self.issuer)?;
        writeln!(f, "dns names:   {}", self.dns_names.join(", "))?;
        writeln!(f, "serial:      {}", self.serial)?;
        writeln!(f, "not before:  {}", display_time(self.not_before))?;
        writeln!(f, "not after:   {}", display_time(self.not_after))?;
        writeln!(f, "usage:       {}", usages.join(", "))?;
        write!(f, "fingerprint: {}", self.fingerprint)
    }
}

fn dns_names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert.subject_alternative_name().map_err(|e| format!("bad subject alternative name: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The DNS subject alternative names of a DER certificate, as the
/// transport's authorization check sees them.
pub(crate) fn dns_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    dns_names_of(&cert)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn fingerprint_parses_its_own_display_and_openssl_format() {
        let fp = Fingerprint::of(b"x");
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        let openssl =
            hex::encode_upper(fp.as_bytes()).as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":");
        assert_eq!(openssl.parse::<Fingerprint>().unwrap(), fp);
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn names() {
        for ok in ["auth1", "witness", "site-b.repl.internal", "a"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "Auth1", "-a", "a-", "a..b", "../x", "a/b", ".a", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
