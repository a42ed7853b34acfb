//! Host side: the per-installation certificate authority that netstack
//! uses to terminate the guest's TLS. Its key is generated once (rcgen,
//! ECDSA P-256) and kept by sbx on the host (0600, never in a sandbox);
//! only its certificate goes to guests, which trust it. Leaf certificates
//! are minted per host name on demand, signed by it, and cached with the
//! TLS server configuration that presents them ([`Authority::server_config`]).
//!
//! A leaf names exactly one host (a DNS subject alternative name, never an
//! address), is valid for [`LEAF_DAYS`] days from the day before it was
//! minted, is not a CA, and is for server authentication only. The CA is
//! constrained to issue end-entity certificates only (path length 0).
//! Terminated connections offer the guest HTTP/1.1 only (ALPN).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::host::HostName;

/// How long a leaf certificate is valid, from the day before it is minted.
pub const LEAF_DAYS: i64 = 30;
/// A cached leaf is minted again once it is this many days old.
pub const LEAF_REFRESH_DAYS: i64 = 7;
/// How long the CA certificate is valid, from the day before it is made.
pub const CA_DAYS: i64 = 10 * 365;
/// Host names whose leaf (and server configuration) is kept at once; past
/// it, the cache is emptied and refilled on demand.
pub const MAX_LEAVES: usize = 1024;
/// Largest CA certificate or key file accepted, in bytes.
pub const MAX_PEM: usize = 16 * 1024;
/// The ALPN protocols offered to the guest: HTTP/1.1 only, so that the
/// guest's requests are what [`crate::http`] parses.
pub const GUEST_ALPN: &[&[u8]] = &[b"http/1.1"];

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot generate a key: {0}")]
    KeyGeneration(String),
    #[error("The CA key is not a PEM PKCS#8 ECDSA P-256 key: {0}")]
    BadKey(String),
    #[error("The CA certificate is not one PEM certificate of at most {MAX_PEM} bytes")]
    BadCertificate,
    #[error("The CA certificate does not belong to the CA key (or was not made by sbx)")]
    Mismatch,
    #[error("Cannot sign a certificate: {0}")]
    Sign(String),
    #[error("Cannot set up TLS for {0}: {1}")]
    Tls(String, String),
}

/// The CA and the leaves it minted.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// One key for every leaf of this run (a leaf's key never leaves the
    /// host either).
    leaf_key: KeyPair,
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaves: Mutex<HashMap<HostName, Leaf>>,
}

struct Leaf {
    config: Arc<ServerConfig>,
    minted_day: i64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("name", &ca_name(&self.issuer_key_id())).finish_non_exhaustive()
    }
}

/// Days since the Unix epoch, now.
fn today() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64 / 86_400).unwrap_or(0)
}

/// (year, month, day) of a day counted from the Unix epoch (proleptic
/// Gregorian calendar).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// Sets a certificate's validity: from the start of day `from` to the
/// start of day `to` (days since the Unix epoch).
fn validity(params: &mut CertificateParams, from: i64, to: i64) {
    let (y, m, d) = civil(from);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(to);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// A random positive serial number.
fn serial() -> Result<SerialNumber, Error> {
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 16];
    default_provider().secure_random.fill(&mut bytes).map_err(|e| Error::Sign(format!("no randomness: {e:?}")))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The CA's name: derived from its key, so that the certificate's subject
/// can be rebuilt from the key alone (and two installations differ).
fn ca_name(key_id: &str) -> String {
    format!("sbx sandbox CA {key_id}")
}

fn ca_params(key: &KeyPair, from_day: i64) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sbx");
    dn.push(DnType::CommonName, ca_name(&key_id(key)));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, from_day - 1, from_day + CA_DAYS);
    params.serial_number = Some(serial()?);
    Ok(params)
}

/// A short fingerprint of a key's public half.
fn key_id(key: &KeyPair) -> String {
    Sha256::digest(key.public_key_raw()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn new_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| Error::KeyGeneration(e.to_string()))
}

impl Authority {
    /// A new CA (a new key and its self-signed certificate).
    pub fn generate() -> Result<Authority, Error> {
        let key = new_key()?;
        let params = ca_params(&key, today())?;
        let cert = params.self_signed(&key).map_err(|e| Error::Sign(e.to_string()))?;
        let (cert_der, cert_pem) = (cert.der().clone(), cert.pem());
        Authority::assemble(params, key, cert_der, cert_pem)
    }

    /// The CA saved earlier: its certificate and key, both PEM. The
    /// certificate must carry the key's public half and the subject sbx
    /// gives it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, Error> {
        if cert_pem.len() > MAX_PEM || key_pem.len() > MAX_PEM {
            return Err(Error::BadCertificate);
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::BadKey(e.to_string()))?;
        if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(Error::BadKey("not ECDSA P-256".into()));
        }
        let mut certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes());
        let cert_der = match (certs.next(), certs.next()) {
            (Some(Ok(der)), None) => der.into_owned(),
            _ => return Err(Error::BadCertificate),
        };
        let has = |needle: &[u8]| cert_der.windows(needle.len()).any(|w| w == needle);
        if !has(key.public_key_raw()) || !has(ca_name(&key_id(&key)).as_bytes()) {
            return Err(Error::Mismatch);
        }
        // Only the subject, key identifier method and key usages of the
        // parameters go into the leaves it signs.
        let params = ca_params(&key, today())?;
        Authority::assemble(params, key, cert_der, cert_pem.to_string())
    }

    fn assemble(
        params: CertificateParams,
        key: KeyPair,
        cert_der: CertificateDer<'static>,
        cert_pem: String,
    ) -> Result<Authority, Error> {
        Ok(Authority {
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
            leaf_key: new_key()?,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    fn issuer_key_id(&self) -> String {
        key_id(self.issuer.key())
    }

    /// The CA certificate, PEM (what guests trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA key, PEM (PKCS#8), for sbx to store (0600). Never give it to
    /// a guest.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Leaves cached now.
    pub fn cached_leaves(&self) -> usize {
        self.leaves.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A leaf certificate for `host`, DER.
    pub fn mint(&self, host: &HostName) -> Result<CertificateDer<'static>, Error> {
        self.mint_on(host, today())
    }

    fn mint_on(&self, host: &HostName, day: i64) -> Result<CertificateDer<'static>, Error> {
        let mut params = CertificateParams::default();
        let name = host.as_str().to_string();
        let dns = name.clone().try_into().map_err(|e: rcgen::Error| Error::Sign(e.to_string()))?;
        params.subject_alt_names = vec![SanType::DnsName(dns)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, day - 1, day - 1 + LEAF_DAYS);
        params.serial_number = Some(serial()?);
        let cert = params.signed_by(&self.leaf_key, &self.issuer).map_err(|e| Error::Sign(e.to_string()))?;
        Ok(cert.der().clone())
    }

    /// The TLS server configuration that presents `host`'s leaf: TLS 1.2
    /// and 1.3, no client certificates, ALPN `http/1.1` only. Minted on
    /// first use, then cached (see [`MAX_LEAVES`], [`LEAF_REFRESH_DAYS`]).
    pub fn server_config(&self, host: &HostName) -> Result<Arc<ServerConfig>, Error> {
        let day = today();
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(leaf) = leaves.get(host) {
            if day - leaf.minted_day < LEAF_REFRESH_DAYS {
                return Ok(leaf.config.clone());
            }
        }
        let tls = |e: rustls::Error| Error::Tls(host.to_string(), e.to_string());
        let cert = self.mint_on(host, day)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(tls)?;
        config.alpn_protocols = GUEST_ALPN.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.clone(), Leaf { config: config.clone(), minted_day: day });
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn verifier(ca: &Authority) -> Arc<rustls::client::WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap()
    }

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    #[test]
    fn the_calendar_is_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn leaves_verify_against_the_ca_for_their_name_only() {
        let ca = Authority::generate().unwrap();
        let v = verifier(&ca);
        let leaf = ca.mint(&host("api.example.com")).unwrap();
        let now = UnixTime::now();
        let name = ServerName::try_from("api.example.com").unwrap();
        assert!(v.verify_server_cert(&leaf, &[], &name, &[], now).is_ok());
        let other = ServerName::try_from("www.example.com").unwrap();
        assert!(v.verify_server_cert(&leaf, &[], &other, &[], now).is_err(), "one name per leaf");
        // Another installation's CA does not vouch for it.
        let stranger = Authority::generate().unwrap();
        assert!(verifier(&stranger).verify_server_cert(&leaf, &[], &name, &[], now).is_err());
        // Expired after LEAF_DAYS.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(((today() + LEAF_DAYS) * 86_400) as u64));
        assert!(v.verify_server_cert(&leaf, &[], &name, &[], later).is_err());
    }

    #[test]
    fn a_saved_ca_loads_and_still_signs_what_guests_trust() {
        let ca = Authority::generate().unwrap();
        let (cert, key) = (ca.cert_pem().to_string(), ca.key_pem());
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----") && key.contains("PRIVATE KEY"));
        let again = Authority::from_pem(&cert, &key).unwrap();
        let leaf = again.mint(&host("a.example.org")).unwrap();
        let name = ServerName::try_from("a.example.org").unwrap();
        assert!(verifier(&ca).verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).is_ok());
        // Mismatched or malformed halves are refused.
        let other = Authority::generate().unwrap();
        assert!(matches!(Authority::from_pem(&cert, &other.key_pem()), Err(Error::Mismatch)));
        assert!(matches!(Authority::from_pem("junk", &key), Err(Error::BadCertificate)));
        assert!(matches!(Authority::from_pem(&format!("{cert}{cert}"), &key), Err(Error::BadCertificate)));
        assert!(matches!(Authority::from_pem(&cert, "junk"), Err(Error::BadKey(_))));
        assert!(format!("{ca:?}").starts_with("Authority"), "no key in Debug");
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn server_configs_are_cached_per_host_and_offer_http1_only() {
        let ca = Authority::generate().unwrap();
        let a = ca.server_config(&host("a.example.com")).unwrap();
        let again = ca.server_config(&host("a.example.com")).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(a.alpn_protocols, vec![b"http/1.1".to_vec()]);
        ca.server_config(&host("b.example.com")).unwrap();
        assert_eq!(ca.cached_leaves(), 2);
    }
}
