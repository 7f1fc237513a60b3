//! The host PKI in its data directory: a private CA that issues the host's server certificate
//! and every agent's client certificate, and the master key agent keys are derived from.
//!
//! ```text
//! <data_dir>/ (0700 when created here)
//!   ca.crt      PEM; the first certificate is the issuing CA (ECDSA P-256, 10 years, path
//!               length 0). Every certificate in the file is trusted for agent client certificates,
//!               so a new CA can be put first during a CA rotation and the old one kept after it.
//!   ca.key      PEM PKCS#8, 0600. Whoever holds it can enrol agents.
//!   host.crt    PEM chain, leaf first: the host's server certificate (ECDSA P-256, 1 year,
//!               serverAuth, SANs from `InitOptions::host_names`).
//!   host.key    PEM PKCS#8, 0600. Agents pin its public key (SPKI pin).
//!   master.key  64 lowercase hex digits and a newline, 0600. Agent keys derive from it.
//! ```
//! `init` writes all five or none and never overwrites; `load` checks that every key belongs
//! to its certificate.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use viworks_core::auth::{MasterKey, SpkiPin};
use viworks_core::wire::AgentId;
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::TlsError;
use super::files::{self, NewFile, PRIVATE, PUBLIC};

const DAY: u64 = 24 * 60 * 60;

/// Lifetime of the CA certificate made by [`Pki::init`]: ten years. Replacing a CA means
/// re-enrolling every agent, so it outlives any host or agent certificate it signs.
pub const CA_LIFETIME: Duration = Duration::from_secs(3650 * DAY);

/// Lifetime of the host's server certificate: one year. Renewal
/// ([`Pki::renew_host_certificate`]) keeps the key, so agents' SPKI pins stay valid.
pub const HOST_CERT_LIFETIME: Duration = Duration::from_secs(365 * DAY);

/// Default lifetime of an agent's client certificate: one year. Agents have no automatic
/// renewal yet, so a short lifetime would mean frequent manual re-enrollment.
pub const AGENT_CERT_LIFETIME: Duration = Duration::from_secs(365 * DAY);

/// How far before "now" certificates start being valid, so that a peer whose clock runs a
/// little behind does not refuse a certificate issued moments ago.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

const ORGANIZATION: &str = "ViWorkS";

/// The file names of the PKI inside a data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDirPaths {
    /// The data directory itself.
    pub dir: PathBuf,
    /// `ca.crt`: the CA certificate(s), PEM.
    pub ca_cert: PathBuf,
    /// `ca.key`: the CA's private key, PEM PKCS#8, mode 0600.
    pub ca_key: PathBuf,
    /// `host.crt`: the host's certificate chain, leaf first, PEM.
    pub host_cert: PathBuf,
    /// `host.key`: the host's private key, PEM PKCS#8, mode 0600.
    pub host_key: PathBuf,
    /// `master.key`: the master key in hexadecimal, mode 0600.
    pub master_key: PathBuf,
}

impl DataDirPaths {
    /// The paths of the PKI files in `dir`.
    pub fn new(dir: &Path) -> Self {
        DataDirPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            host_cert: dir.join("host.crt"),
            host_key: dir.join("host.key"),
            master_key: dir.join("master.key"),
        }
    }
}

/// What [`Pki::init`] creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOptions {
    /// The names agents reach the host by: DNS names (a leading `*.` wildcard is allowed) and
    /// IP addresses, all written into the host certificate's subjectAltName. Agents check the
    /// host name of `VIW_AGENT_BACKEND_URL` against them. The first is also the subject CN.
    pub host_names: Vec<String>,
    /// Lifetime of the CA certificate.
    pub ca_validity: Duration,
    /// Lifetime of the host certificate.
    pub host_validity: Duration,
}

impl Default for InitOptions {
    /// `localhost`, `127.0.0.1` and `::1`; [`CA_LIFETIME`] and [`HOST_CERT_LIFETIME`].
    fn default() -> Self {
        InitOptions {
            host_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            ca_validity: CA_LIFETIME,
            host_validity: HOST_CERT_LIFETIME,
        }
    }
}

/// The period a certificate is valid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The first instant the certificate is valid.
    pub not_before: SystemTime,
    /// The last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from an hour ago (tolerating peers whose clocks run behind) until `lifetime` from
    /// now.
    pub fn from_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Validity { not_before: now.checked_sub(BACKDATE).unwrap_or(now), not_after: now + lifetime }
    }

    /// [`Validity::from_now`] with [`AGENT_CERT_LIFETIME`].
    pub fn agent_default() -> Self {
        Validity::from_now(AGENT_CERT_LIFETIME)
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), TlsError> {
        if self.not_after <= self.not_before {
            return Err(TlsError::InvalidOption {
                option: "certificate validity",
                reason: "not_after must be later than not_before".into(),
            });
        }
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
        Ok(())
    }
}

/// An agent's freshly issued client certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedAgent {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM PKCS#8. A secret: write it with mode 0600.
    pub key_pem: String,
}

impl fmt::Debug for IssuedAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedAgent").field("cert_pem", &self.cert_pem).field("key_pem", &"..").finish()
    }
}

/// The host PKI loaded in memory: the CA that issues certificates, the host's certificate and
/// key, and the master key.
pub struct Pki {
    paths: DataDirPaths,
    ca_pem: String,
    trust_anchors: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    host_chain: Vec<CertificateDer<'static>>,
    host_key: PrivateKeyDer<'static>,
    host_names: Vec<String>,
    host_pin: SpkiPin,
    master_key: MasterKey,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.paths.dir)
            .field("host_names", &self.host_names)
            .field("host_pin", &self.host_pin)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Creates a new PKI in `data_dir` (created with mode 0700 if missing): CA, host
    /// certificate and master key, then loads it back. Fails with
    /// [`TlsError::AlreadyExists`] and writes nothing if any of the five files exists; fails
    /// with [`TlsError::InvalidOption`] on a malformed host name or a zero lifetime.
    /// Costs three ECDSA key generations and two signatures.
    pub fn init(data_dir: &Path, options: &InitOptions) -> Result<Pki, TlsError> {
        let sans = validate_host_names(&options.host_names)?;
        let paths = DataDirPaths::new(data_dir);
        for path in [&paths.ca_cert, &paths.ca_key, &paths.host_cert, &paths.host_key, &paths.master_key] {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(TlsError::AlreadyExists { path: path.clone() });
            }
        }
        if options.ca_validity.is_zero() || options.host_validity.is_zero() {
            return Err(TlsError::InvalidOption { option: "certificate lifetime", reason: "must not be zero".into() });
        }

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag).map_err(TlsError::Random)?;
        ca_params.distinguished_name = distinguished_name(&format!("ViWorkS CA {}", hex(&tag)));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = ca_key_usages();
        ca_params.serial_number = Some(random_serial()?);
        Validity::from_now(options.ca_validity).apply(&mut ca_params)?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let host_key = KeyPair::generate()?;
        let host_cert = host_certificate(&sans, options.host_validity, &host_key, &issuer)?;

        let mut master = [0u8; 32];
        getrandom::fill(&mut master).map_err(TlsError::Random)?;
        let master_hex = format!("{}\n", MasterKey::from_bytes(master).to_hex());

        files::create_dir(data_dir)?;
        files::write_all_new(&[
            NewFile { path: paths.ca_cert.clone(), contents: ca_cert.pem().as_bytes(), mode: PUBLIC },
            NewFile { path: paths.ca_key.clone(), contents: ca_key_pem.as_bytes(), mode: PRIVATE },
            NewFile { path: paths.host_cert.clone(), contents: host_cert.pem().as_bytes(), mode: PUBLIC },
            NewFile { path: paths.host_key.clone(), contents: host_key.serialize_pem().as_bytes(), mode: PRIVATE },
            NewFile { path: paths.master_key.clone(), contents: master_hex.as_bytes(), mode: PRIVATE },
        ])?;
        tracing::info!(dir = %data_dir.display(), "created the host PKI");
        // Loading what was just written checks the files the same way every later start will.
        Pki::load(data_dir)
    }

    /// Reads the PKI from `data_dir`. Fails naming the file if one is missing
    /// ([`TlsError::NotInitialized`]), unreadable, malformed, if a key does not belong to its
    /// certificate, or if `ca.crt` is not a CA. Warns if a key file is readable by others.
    pub fn load(data_dir: &Path) -> Result<Pki, TlsError> {
        let paths = DataDirPaths::new(data_dir);

        let ca_pem = read_string(&paths.ca_cert)?;
        let trust_anchors = certificates(&paths.ca_cert, ca_pem.as_bytes())?;
        let ca_key = key_pair(&paths.ca_key)?;
        let ca = parse(&paths.ca_cert, &trust_anchors[0])?;
        if ca_key.subject_public_key_info() != ca.public_key().raw {
            return Err(TlsError::KeyMismatch { cert: paths.ca_cert.clone(), key: paths.ca_key.clone() });
        }
        let issuer = issuer_of(&paths.ca_cert, &ca, ca_key)?;

        let host_pem = read_string(&paths.host_cert)?;
        let host_chain = certificates(&paths.host_cert, host_pem.as_bytes())?;
        let host_key = private_key(&paths.host_key)?;
        let host = parse(&paths.host_cert, &host_chain[0])?;
        let host_key_pair = KeyPair::try_from(&host_key).map_err(|e| TlsError::BadPemFile {
            path: paths.host_key.clone(),
            expected: "an ECDSA or Ed25519 PKCS#8 private key",
            reason: e.to_string(),
        })?;
        if host_key_pair.subject_public_key_info() != host.public_key().raw {
            return Err(TlsError::KeyMismatch { cert: paths.host_cert.clone(), key: paths.host_key.clone() });
        }
        let host_names = subject_alt_names(&host);
        let host_pin = SpkiPin::of_spki_der(host.public_key().raw);

        let master_hex = read_string(&paths.master_key)?;
        let master_key =
            MasterKey::from_hex(&master_hex).map_err(|_| TlsError::BadMasterKey { path: paths.master_key.clone() })?;
        for secret in [&paths.ca_key, &paths.host_key, &paths.master_key] {
            files::warn_if_not_private(secret);
        }

        Ok(Pki { paths, ca_pem, trust_anchors, issuer, host_chain, host_key, host_names, host_pin, master_key })
    }

    /// Issues a client certificate for `agent_id`: a new ECDSA P-256 key, subject CN = the
    /// agent id exactly, clientAuth only, signed by the CA, valid for `validity`. Costs one key
    /// generation and one signature (well under a millisecond).
    pub fn issue_agent(&self, agent_id: &AgentId, validity: Validity) -> Result<IssuedAgent, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(agent_id.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        validity.apply(&mut params)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedAgent { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Replaces `host.crt` with a new certificate for the same key (so agents' pins stay
    /// valid), with the names and lifetime of `options`. The file is replaced atomically; a
    /// running server keeps the old certificate until its configuration is rebuilt.
    pub fn renew_host_certificate(&mut self, options: &InitOptions) -> Result<(), TlsError> {
        let sans = validate_host_names(&options.host_names)?;
        let key = KeyPair::try_from(&self.host_key)?;
        let cert = host_certificate(&sans, options.host_validity, &key, &self.issuer)?;
        files::replace(&self.paths.host_cert, cert.pem().as_bytes(), PUBLIC)?;
        let parsed = parse(&self.paths.host_cert, cert.der())?;
        self.host_names = subject_alt_names(&parsed);
        self.host_chain = vec![cert.der().clone()];
        tracing::info!(path = %self.paths.host_cert.display(), "renewed the host certificate");
        Ok(())
    }

    /// The files this PKI was loaded from.
    pub fn paths(&self) -> &DataDirPaths {
        &self.paths
    }

    /// The SPKI pin of the host certificate's key: what agents put in
    /// `VIW_AGENT_BACKEND_SPKI_PIN`.
    pub fn host_pin(&self) -> SpkiPin {
        self.host_pin
    }

    /// The names and addresses in the host certificate's subjectAltName (DNS names as written,
    /// IP addresses in their usual text form).
    pub fn host_names(&self) -> &[String] {
        &self.host_names
    }

    /// The master key every agent key is derived from.
    pub fn master_key(&self) -> &MasterKey {
        &self.master_key
    }

    /// `ca.crt` as read: the trust bundle handed to agents.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The certificates of `ca.crt`, the issuing CA first.
    pub fn trust_anchors(&self) -> &[CertificateDer<'static>] {
        &self.trust_anchors
    }

    /// The host's certificate chain, leaf first.
    pub fn host_cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.host_chain
    }

    /// A copy of the host's private key, for a rustls configuration.
    pub(crate) fn host_key(&self) -> PrivateKeyDer<'static> {
        self.host_key.clone_key()
    }

    /// Signs `params` for `key` with the CA; tests use it to make certificates `issue_agent`
    /// never would.
    #[cfg(test)]
    pub(crate) fn sign(&self, params: &CertificateParams, key: &KeyPair) -> Certificate {
        params.signed_by(key, &self.issuer).expect("signs")
    }
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature]
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION);
    name.push(DnType::CommonName, common_name);
    name
}

fn host_certificate(
    sans: &[String],
    lifetime: Duration,
    key: &KeyPair,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Certificate, TlsError> {
    if lifetime.is_zero() {
        return Err(TlsError::InvalidOption { option: "host certificate lifetime", reason: "must not be zero".into() });
    }
    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = distinguished_name(&sans[0]);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    Validity::from_now(lifetime).apply(&mut params)?;
    Ok(params.signed_by(key, issuer)?)
}

/// 126 random bits, positive and always 16 bytes long, so serials are unique per certificate
/// (rcgen's default derives them from the public key, which a renewal reuses).
fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(TlsError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks every host name is an IP address or a DNS name (letters, digits, hyphens, dots, an
/// optional leading `*.`), and that there is at least one.
fn validate_host_names(names: &[String]) -> Result<Vec<String>, TlsError> {
    if names.is_empty() {
        return Err(TlsError::InvalidOption {
            option: "host names",
            reason: "at least one DNS name or IP address is needed for the host certificate".into(),
        });
    }
    for name in names {
        if name.parse::<IpAddr>().is_ok() {
            continue;
        }
        let labels = name.strip_prefix("*.").unwrap_or(name);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.len() > 253 || !labels.split('.').all(label_ok) {
            return Err(TlsError::InvalidOption {
                option: "host name",
                reason: format!(
                    "{name:?} is neither an IP address nor a DNS name (labels of letters, digits and hyphens, \
                     optionally starting with \"*.\")"
                ),
            });
        }
    }
    Ok(names.to_vec())
}

fn not_initialized_or(action: &'static str, path: &Path, e: std::io::Error) -> TlsError {
    if e.kind() == std::io::ErrorKind::NotFound {
        TlsError::NotInitialized { path: path.to_path_buf() }
    } else {
        TlsError::io(action, path, e)
    }
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| not_initialized_or("read", path, e))?;
    String::from_utf8(bytes).map_err(|_| TlsError::BadPemFile {
        path: path.to_path_buf(),
        expected: "text",
        reason: "the file is not UTF-8".into(),
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadPemFile { path: path.to_path_buf(), expected: "PEM certificates", reason };
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| not_initialized_or("read", path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::BadPemFile {
        path: path.to_path_buf(),
        expected: "a PEM private key",
        reason: e.to_string(),
    })
}

fn key_pair(path: &Path) -> Result<KeyPair, TlsError> {
    let key = private_key(path)?;
    KeyPair::try_from(&key).map_err(|e| TlsError::BadPemFile {
        path: path.to_path_buf(),
        expected: "an ECDSA or Ed25519 PKCS#8 private key",
        reason: e.to_string(),
    })
}

fn parse<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadPemFile {
        path: path.to_path_buf(),
        expected: "an X.509 certificate",
        reason: e.to_string(),
    })?;
    Ok(cert)
}

/// The subjectAltName entries of `cert` as text.
fn subject_alt_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// An rcgen issuer equivalent to the CA certificate `ca`: the same subject, encoded the same
/// way byte for byte (path building compares names as bytes), and the same key identifier.
fn issuer_of(path: &Path, ca: &X509Certificate<'_>, key: KeyPair) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let unsupported = |reason: &str| TlsError::UnsupportedCa { path: path.to_path_buf(), reason: reason.into() };
    if !ca.is_ca() {
        return Err(unsupported("it is not a CA certificate (basicConstraints CA is not set)"));
    }
    let mut name = DistinguishedName::new();
    for rdn in ca.subject().iter() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return Err(unsupported("its subject has a multi-valued or empty RDN"));
        };
        let oid: Vec<u64> =
            attribute.attr_type().iter().ok_or_else(|| unsupported("its subject has an oversized OID"))?.collect();
        let value = attribute.attr_value();
        let text = std::str::from_utf8(value.data).map_err(|_| unsupported("its subject has a non-UTF-8 attribute"))?;
        let value = match value.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into().map_err(|_| unsupported("its subject has an invalid PrintableString"))?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(text.try_into().map_err(|_| unsupported("its subject has an invalid IA5String"))?)
            }
            _ => return Err(unsupported("its subject uses a string type other than UTF8, Printable or IA5")),
        };
        let ty = DnType::from_oid(&oid);
        if name.get(&ty).is_some() {
            return Err(unsupported("its subject repeats an attribute type"));
        }
        name.push(ty, value);
    }
    let subject_key_id = ca.iter_extensions().find_map(|ext| match ext.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    });
    let mut params = CertificateParams::default();
    params.distinguished_name = name;
    params.key_usages = ca_key_usages();
    params.key_identifier_method = match subject_key_id {
        Some(id) => KeyIdMethod::PreSpecified(id),
        None => KeyIdMethod::Sha256,
    };
    Ok(Issuer::new(params, key))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::tls::test_support::{self, fixture};

    #[test]
    fn init_then_load_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let created = Pki::init(dir.path(), &InitOptions::default()).expect("init");
        let loaded = Pki::load(dir.path()).expect("load");
        assert_eq!(loaded.host_pin(), created.host_pin());
        assert_eq!(loaded.master_key(), created.master_key());
        assert_eq!(loaded.ca_pem(), created.ca_pem());
        assert_eq!(loaded.host_cert_chain(), created.host_cert_chain());
        assert_eq!(loaded.host_names(), ["localhost", "127.0.0.1", "::1"]);
        let master = std::fs::read_to_string(dir.path().join("master.key")).expect("read");
        assert_eq!(master.len(), 65);
        assert!(master.ends_with('\n'));
        assert_eq!(MasterKey::from_hex(&master).expect("hex"), *loaded.master_key());
    }

    #[tokio::test]
    async fn a_reloaded_ca_issues_certificates_the_original_configuration_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let created = Pki::init(dir.path(), &InitOptions::default()).expect("init");
        let loaded = Pki::load(dir.path()).expect("load");
        let agent = AgentId::new("gw-reloaded").expect("id");
        let issued = loaded.issue_agent(&agent, Validity::agent_default()).expect("issue");
        let outcome = test_support::connect_agent(&created, &issued).await;
        assert_eq!(outcome.server.expect("accepted").identity, agent);
    }

    #[test]
    fn init_refuses_to_overwrite_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("master.key"), "keep me\n").expect("write");
        let err = Pki::init(dir.path(), &InitOptions::default()).expect_err("refuses");
        assert!(matches!(&err, TlsError::AlreadyExists { path } if path.ends_with("master.key")), "{err}");
        assert!(err.to_string().contains("master.key"), "{err}");
        for name in ["ca.crt", "ca.key", "host.crt", "host.key"] {
            assert!(!dir.path().join(name).exists(), "{name} must not be written");
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("master.key")).expect("read"), "keep me\n");

        let (dir, _) = fixture();
        let err = Pki::init(dir.path(), &InitOptions::default()).expect_err("second init refuses");
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err}");
    }

    #[test]
    fn key_files_are_private_and_certificates_public() {
        let (dir, _) = fixture();
        let mode = |name: &str| std::fs::metadata(dir.path().join(name)).expect("meta").permissions().mode() & 0o777;
        for name in ["ca.key", "host.key", "master.key"] {
            assert_eq!(mode(name), 0o600, "{name}");
        }
        for name in ["ca.crt", "host.crt"] {
            assert_eq!(mode(name), 0o644, "{name}");
        }
    }

    #[test]
    fn load_names_the_missing_or_broken_file() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = Pki::load(empty.path()).expect_err("nothing there");
        assert!(matches!(&err, TlsError::NotInitialized { path } if path.ends_with("ca.crt")), "{err}");
        assert!(err.to_string().contains("viworks-host init"), "{err}");

        let (dir, _) = fixture();
        std::fs::write(dir.path().join("master.key"), "zz\n").expect("write");
        let err = Pki::load(dir.path()).expect_err("bad master key");
        assert!(matches!(err, TlsError::BadMasterKey { .. }), "{err}");

        let (dir, _) = fixture();
        let (other, _) = fixture();
        std::fs::copy(other.path().join("host.key"), dir.path().join("host.key")).expect("copy");
        let err = Pki::load(dir.path()).expect_err("mismatched key");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("host.key") && err.to_string().contains("host.crt"), "{err}");

        let (dir, _) = fixture();
        std::fs::write(dir.path().join("ca.crt"), "not pem").expect("write");
        let err = Pki::load(dir.path()).expect_err("bad ca");
        assert!(matches!(err, TlsError::BadPemFile { .. }) && err.to_string().contains("ca.crt"), "{err}");
    }

    #[test]
    fn issued_agent_certificates_name_the_agent_and_are_client_only() {
        let (_dir, pki) = fixture();
        let agent = AgentId::new("gw-fra-01").expect("id");
        let issued = pki.issue_agent(&agent, Validity::agent_default()).expect("issue");
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        let cns: Vec<_> = cert.subject().iter_common_name().map(|cn| cn.as_str().expect("str")).collect();
        assert_eq!(cns, ["gw-fra-01"]);
        let eku = cert.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for names in [vec![], vec!["bad name".to_string()], vec!["-x.example".to_string()]] {
            let options = InitOptions { host_names: names, ..InitOptions::default() };
            let err = Pki::init(dir.path(), &options).expect_err("refused");
            assert!(matches!(err, TlsError::InvalidOption { .. }), "{err}");
        }
        let options =
            InitOptions { host_names: vec!["*.fleet.example".into(), "10.0.0.1".into()], ..Default::default() };
        assert!(Pki::init(dir.path(), &options).is_ok());
        let (_dir, pki) = fixture();
        let now = SystemTime::now();
        let backwards = Validity { not_before: now, not_after: now - Duration::from_secs(1) };
        let agent = AgentId::new("a").expect("id");
        assert!(matches!(pki.issue_agent(&agent, backwards), Err(TlsError::InvalidOption { .. })));
    }

    #[test]
    fn renewing_the_host_certificate_keeps_the_pin() {
        let (dir, mut pki) = fixture();
        let pin = pki.host_pin();
        let before = pki.host_cert_chain().to_vec();
        let options = InitOptions { host_names: vec!["host.example".into()], ..InitOptions::default() };
        pki.renew_host_certificate(&options).expect("renew");
        assert_ne!(pki.host_cert_chain(), before.as_slice());
        assert_eq!(pki.host_names(), ["host.example"]);
        let reloaded = Pki::load(dir.path()).expect("load");
        assert_eq!(reloaded.host_pin(), pin);
        assert_eq!(reloaded.host_names(), ["host.example"]);
    }
}
