//! Host side (test support, outside the sandbox): a throwaway TLS
//! authority for the e2e upstreams. A fresh root signs one leaf for the
//! names a test serves; the root's PEM goes to `sbx run --upstream-ca`,
//! so netstack verifies the upstream exactly as it verifies a real one.

use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test root and a server configuration for names it signed.
pub struct TestCa {
    /// The root certificate, PEM (for `--upstream-ca`).
    pub root_pem: String,
    /// A server configuration presenting the leaf for every name given.
    pub server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// A fresh root and a leaf for `names` (DNS names).
    pub fn new(names: &[&str]) -> TestCa {
        let root_key = rcgen::KeyPair::generate().expect("a root key");
        let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("root parameters");
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        root_params.distinguished_name.push(rcgen::DnType::CommonName, "sbx e2e upstream root");
        let root = root_params.self_signed(&root_key).expect("the root");
        let issuer = rcgen::Issuer::new(root_params, root_key);
        let key = rcgen::KeyPair::generate().expect("a leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names).expect("leaf names").signed_by(&key, &issuer).expect("leaf");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("the leaf as server certificate");
        TestCa { root_pem: root.pem(), server: Arc::new(server) }
    }
}
