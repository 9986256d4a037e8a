//! Sites, certificates and endpoints shared by the replication tests over
//! real QUIC on loopback: a private CA written to and loaded from a temp
//! dir, a certificate per site issued on first use.
#![allow(dead_code)]

pub mod model;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use replication::pki::{Ca, Identity};
use replication::quorum::SiteId;
use replication::transport::{Endpoint, EndpointConfig, PeerRule, Settings, Trust};

pub const YEAR: Duration = Duration::from_secs(365 * 86_400);

#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub id: SiteId,
    pub name: &'static str,
    pub ip: &'static str,
}

pub const A: Spec = Spec { id: SiteId(1), name: "auth1", ip: "127.0.0.1" };
pub const B: Spec = Spec { id: SiteId(2), name: "auth2", ip: "127.0.0.2" };
pub const W: Spec = Spec { id: SiteId(3), name: "witness", ip: "127.0.0.3" };

pub struct Pki {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub ca: Ca,
}

/// A fresh private CA in a temp dir.
pub fn pki() -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    Ca::generate("replication test CA", YEAR).unwrap().write(&dir).unwrap();
    let ca = Ca::load(&dir).unwrap();
    Pki { _tmp: tmp, dir, ca }
}

impl Pki {
    /// The site's certificate, written to the temp dir once and loaded back.
    pub fn identity(&self, name: &str) -> Identity {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        if !cert.exists() {
            self.ca.issue(name, YEAR).unwrap().write(&self.dir).unwrap();
        }
        Identity::load(&cert, &key).unwrap()
    }

    /// An endpoint of `spec` on `addr` trusting `others` by name.
    pub fn endpoint_with(
        &self,
        spec: Spec,
        addr: SocketAddr,
        others: &[Spec],
        settings: Settings,
    ) -> Result<Endpoint, replication::transport::Error> {
        let rules = others.iter().map(|o| PeerRule::name(o.name)).collect();
        let trust = Trust::new(self.ca.cert_der().clone(), rules).unwrap();
        Endpoint::bind(EndpointConfig { bind: addr, identity: self.identity(spec.name), trust, settings })
    }

    pub fn try_endpoint(&self, spec: Spec, addr: SocketAddr, others: &[Spec]) -> Result<Endpoint, replication::transport::Error> {
        self.endpoint_with(spec, addr, others, Settings::default())
    }

    pub fn endpoint(&self, spec: Spec, addr: SocketAddr, others: &[Spec]) -> Endpoint {
        self.try_endpoint(spec, addr, others).unwrap()
    }
}

/// A free UDP port on the site's address, with nothing listening on it.
pub fn free_addr(spec: Spec) -> SocketAddr {
    let socket = std::net::UdpSocket::bind(format!("{}:0", spec.ip)).unwrap();
    socket.local_addr().unwrap()
}
