//! Guest side: puts the installation's CA certificate (from the job, made
//! by the host's sbx; public) into the guest's trust store at every boot,
//! so that TLS which netstack terminates verifies in the guest. The CA is
//! per installation, so it cannot live in the shared image: it is written
//! into the root the guest runs on (the sandbox's overlay), as its own
//! file and as a marked block at the end of the system bundle, which
//! replaces the block of an earlier boot. Programs are pointed at them by
//! [`env()`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

/// The system bundle (Debian's and curl's default).
pub const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The CA alone (for Node's NODE_EXTRA_CA_CERTS, which adds to its own).
pub const CA_FILE: &str = "/etc/ssl/certs/sbx-ca.pem";
const BEGIN: &str = "# sbx: this installation's CA (netstack terminates TLS with it); rewritten at every boot\n";
const END: &str = "# sbx: end\n";

/// `bundle` with the sbx block (of an earlier boot, if any) replaced by
/// one holding `ca`.
pub fn with_ca(bundle: &str, ca: &str) -> String {
    let mut out = match (bundle.find(BEGIN), bundle.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}", &bundle[..b], &bundle[e + END.len()..]),
        _ => bundle.to_string(),
    };
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push_str(ca.trim());
    out.push('\n');
    out.push_str(END);
    out
}

fn write(path: &str, text: &str) -> Result<(), String> {
    let tmp = format!("{path}.sbx-tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| format!("Cannot write {tmp}: {e}"))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| format!("Cannot write {tmp}: {e}"))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(|e| format!("Cannot chmod {tmp}: {e}"))?;
    fs::rename(&tmp, path).map_err(|e| format!("Cannot replace {path}: {e}"))
}

/// Installs `ca` (PEM) in the trust store of the running root.
pub fn install(ca: &str) -> Result<(), String> {
    fs::create_dir_all("/etc/ssl/certs").map_err(|e| format!("Cannot create /etc/ssl/certs: {e}"))?;
    let pem = format!("{}\n", ca.trim());
    if fs::read_to_string(CA_FILE).ok().as_deref() != Some(pem.as_str()) {
        write(CA_FILE, &pem)?;
    }
    let old = fs::read_to_string(BUNDLE).unwrap_or_default();
    let new = with_ca(&old, ca);
    if new != old {
        write(BUNDLE, &new)?;
    }
    Ok(())
}

/// The variables that make common TLS clients trust the bundle.
pub fn env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"]
        .iter()
        .map(|k| (k.to_string(), BUNDLE.to_string()))
        .collect();
    env.push(("NODE_EXTRA_CA_CERTS".into(), CA_FILE.into()));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_appended_once_and_replaced_at_the_next_boot() {
        let system = "-----BEGIN CERTIFICATE-----\nSYS\n-----END CERTIFICATE-----";
        let first = with_ca(system, "CA1\n");
        assert!(first.starts_with(system) && first.contains("\nCA1\n") && first.ends_with(END));
        let again = with_ca(&first, "CA1");
        assert_eq!(again, first, "the same CA: unchanged");
        let rotated = with_ca(&first, "CA2");
        assert!(rotated.contains("CA2") && !rotated.contains("CA1") && rotated.starts_with(system));
        assert_eq!(rotated.matches(BEGIN).count(), 1);
        assert_eq!(with_ca("", "CA"), format!("{BEGIN}CA\n{END}"), "no system bundle in the image");
        assert!(env().iter().any(|(k, v)| k == "NODE_EXTRA_CA_CERTS" && v == CA_FILE));
    }
}
