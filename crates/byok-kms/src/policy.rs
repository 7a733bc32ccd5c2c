//! What a tenant's configuration may make the key broker do on the server: which
//! files it may read as credentials and which endpoints it may talk to.
//!
//! Tenant configurations are written by `byok_admin` members, who are not
//! trusted with the server's files or its network identity. The broker reads
//! credential files as the server's OS user and sends their contents (tokens,
//! secret ids) to the configured endpoint, so both are checked against this
//! policy, which only a superuser sets (`byok.credential_directories`,
//! `byok.allowed_endpoints`, `byok.allow_insecure_transport`):
//!
//! - a credential file must lie inside one of the credential directories, also
//!   after every symbolic link below it is followed, be a regular file owned by
//!   the server's OS user, and be readable by that user alone (mode 0600 or
//!   stricter). A path
//!   outside every directory is refused before the file system is touched, so
//!   the answer says nothing about whether it exists;
//! - an endpoint must be `https://` (plain `http://` and disabled certificate
//!   checks only with `allow_insecure_transport`), and its host must be one of
//!   the key managers' public service domains or match `allowed_endpoints`.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use zeroize::Zeroizing;

/// The cloud service an endpoint option points at. Each is allowed its own
/// public hosts without listing them in `byok.allowed_endpoints`: exactly the
/// service's hosts, never a whole cloud domain (anyone can run code behind
/// `*.execute-api.amazonaws.com` or serve a bucket from `storage.googleapis.com`
/// and would receive the credentials sent there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// AWS KMS: `kms[-fips].<region>.amazonaws.com[.cn]`.
    AwsKms,
    /// An Azure key vault or managed HSM: `<name>.vault.azure.net` and the
    /// sovereign clouds' equivalents (the hosts are Microsoft's; only the
    /// name is the customer's).
    AzureKeyVault,
    /// Microsoft Entra ID's token endpoint (`login.microsoftonline.com`, ...).
    AzureLogin,
    /// Google Cloud KMS: `cloudkms.googleapis.com` and its regional endpoints.
    GcpKms,
    /// Google's token services (`oauth2.googleapis.com`, `sts.googleapis.com`).
    GcpToken,
    /// A service with no public cloud host (Vault): only `byok.allowed_endpoints`.
    Private,
}

impl Service {
    /// Whether `host` (lower case, no trailing dot) is one of the service's own.
    fn owns(self, host: &str) -> bool {
        // `<one label>.<suffix>`: the label may not contain a dot.
        let one_label_then = |prefix: &str, suffix: &str| {
            host.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
                .is_some_and(is_dns_label)
        };
        match self {
            Service::AwsKms => ["kms.", "kms-fips."].iter().any(|prefix| {
                one_label_then(prefix, ".amazonaws.com")
                    || one_label_then(prefix, ".amazonaws.com.cn")
            }),
            Service::AzureKeyVault => [
                ".vault.azure.net",
                ".managedhsm.azure.net",
                ".vault.azure.cn",
                ".managedhsm.azure.cn",
                ".vault.usgovcloudapi.net",
                ".managedhsm.usgovcloudapi.net",
            ]
            .iter()
            .any(|suffix| one_label_then("", suffix)),
            Service::AzureLogin => matches!(
                host,
                "login.microsoftonline.com" | "login.chinacloudapi.cn" | "login.microsoftonline.us"
            ),
            Service::GcpKms => {
                host == "cloudkms.googleapis.com"
                    || one_label_then("cloudkms.", ".rep.googleapis.com")
            }
            Service::GcpToken => matches!(
                host,
                "oauth2.googleapis.com" | "sts.googleapis.com" | "iamcredentials.googleapis.com"
            ),
            Service::Private => false,
        }
    }
}

fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Largest credential file read (tokens, keys, certificates are far smaller).
const MAX_CREDENTIAL_FILE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{what} \"{path}\" is not inside a directory listed in byok.credential_directories")]
    OutsideCredentialDirectories { what: String, path: String },
    #[error("{what} \"{path}\" is not usable as a credential file: {reason}")]
    UnusableCredentialFile {
        what: String,
        path: String,
        reason: String,
    },
    #[error("{what} \"{url}\" is not an https URL")]
    InsecureEndpoint { what: String, url: String },
    #[error("{what} \"{url}\": host \"{host}\" is not an allowed endpoint")]
    EndpointNotAllowed {
        what: String,
        url: String,
        host: String,
    },
    #[error("{what}: disabling TLS certificate verification is not allowed on this server")]
    InsecureTls { what: String },
    #[error("{what} \"{url}\" is not a valid URL")]
    BadUrl { what: String, url: String },
}

impl PolicyError {
    /// Which superuser setting would allow it.
    pub fn hint(&self) -> &'static str {
        match self {
            PolicyError::OutsideCredentialDirectories { .. } => {
                "a superuser lists the directories credential files may come from in byok.credential_directories"
            }
            PolicyError::UnusableCredentialFile { .. } => {
                "credential files must be regular files inside the directory (symbolic links may not lead out of it), owned by the server's OS user, with mode 0600 or stricter"
            }
            PolicyError::InsecureEndpoint { .. } | PolicyError::InsecureTls { .. } => {
                "use https with a trusted certificate (ca_cert_file for a private CA); a superuser may allow plain http for tests with byok.allow_insecure_transport"
            }
            PolicyError::EndpointNotAllowed { .. } => {
                "a superuser lists private endpoints (Vault servers, PrivateLink, proxies) in byok.allowed_endpoints"
            }
            PolicyError::BadUrl { .. } => "give an absolute URL such as https://host:port",
        }
    }
}

/// A host pattern of `byok.allowed_endpoints`: `host`, `host:port`, `*.domain`
/// or `*.domain:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EndpointPattern {
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl EndpointPattern {
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim().to_ascii_lowercase();
        if text.is_empty() {
            return None;
        }
        let (host, port) = split_host_port(&text)?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest.to_string(), true),
            None => (host.to_string(), false),
        };
        if host.is_empty() || host.contains('*') || host.contains('/') {
            return None;
        }
        Some(EndpointPattern {
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len()
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

/// `host[:port]` (IPv6 in brackets) -> (host, port).
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((text, None)),
    }
}

/// The policy the key broker applies to every tenant configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    credential_directories: Vec<PathBuf>,
    allowed_endpoints: Vec<EndpointPattern>,
    allow_insecure_transport: bool,
    /// Problems found in the settings themselves (reported on use).
    invalid_entries: Vec<String>,
}

impl AccessPolicy {
    /// From the settings' text: comma-separated directories and endpoint patterns.
    pub fn new(
        credential_directories: &str,
        allowed_endpoints: &str,
        allow_insecure_transport: bool,
    ) -> Self {
        let mut invalid_entries = Vec::new();
        let credential_directories = credential_directories
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .filter_map(|d| {
                let path = Path::new(d);
                if path.is_absolute() {
                    Some(normalize(path).unwrap_or_else(|| path.to_path_buf()))
                } else {
                    invalid_entries.push(format!("credential directory \"{d}\" is not absolute"));
                    None
                }
            })
            .collect();
        let allowed_endpoints = allowed_endpoints
            .split(',')
            .filter(|e| !e.trim().is_empty())
            .filter_map(|e| {
                let pattern = EndpointPattern::parse(e);
                if pattern.is_none() {
                    invalid_entries.push(format!("endpoint pattern \"{}\" is not valid", e.trim()));
                }
                pattern
            })
            .collect();
        AccessPolicy {
            credential_directories,
            allowed_endpoints,
            allow_insecure_transport,
            invalid_entries,
        }
    }

    /// The policy of a server that lets tenants use any file and endpoint:
    /// for unit tests of the providers only.
    pub fn permissive_for_tests() -> Self {
        AccessPolicy {
            credential_directories: vec![PathBuf::from("/")],
            allowed_endpoints: vec![EndpointPattern {
                host: String::new(),
                wildcard: true,
                port: None,
            }],
            allow_insecure_transport: true,
            invalid_entries: Vec::new(),
        }
    }

    pub fn allows_insecure_transport(&self) -> bool {
        self.allow_insecure_transport
    }

    /// Checks a URL a tenant configured (`what` names the field for messages).
    pub fn check_endpoint(
        &self,
        what: &str,
        url: &str,
        service: Service,
    ) -> Result<(), PolicyError> {
        let bad = || PolicyError::BadUrl {
            what: what.to_string(),
            url: url.to_string(),
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "https" => 443,
            "http" if self.allow_insecure_transport => 80,
            "http" => {
                return Err(PolicyError::InsecureEndpoint {
                    what: what.to_string(),
                    url: url.to_string(),
                });
            }
            _ => return Err(bad()),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.is_empty() || authority.contains('@') {
            // user:password@host would carry a credential in the configuration
            return Err(bad());
        }
        let authority = authority.to_ascii_lowercase();
        let (host, port) = split_host_port(&authority).ok_or_else(bad)?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        {
            return Err(bad());
        }
        let host = host.trim_end_matches('.');
        let port = port.unwrap_or(default_port);
        let cloud = port == 443 && service.owns(host);
        let listed = self.allowed_endpoints.iter().any(|p| {
            (p.host.is_empty() && p.wildcard) // the test-only permissive policy
                || p.matches(host, port)
        });
        if cloud || listed {
            Ok(())
        } else {
            Err(PolicyError::EndpointNotAllowed {
                what: what.to_string(),
                url: url.to_string(),
                host: host.to_string(),
            })
        }
    }

    /// Whether a configuration may turn off certificate verification.
    pub fn check_insecure_tls(&self, what: &str) -> Result<(), PolicyError> {
        if self.allow_insecure_transport {
            Ok(())
        } else {
            Err(PolicyError::InsecureTls {
                what: what.to_string(),
            })
        }
    }

    /// Checks only where a credential file is, without touching the file
    /// system: for a configuration's first check, so a path outside the
    /// directories is refused at once and clearly, whatever the provider does
    /// with the file later (each read is checked in full again).
    pub fn check_credential_location(&self, what: &str, path: &str) -> Result<(), PolicyError> {
        self.credential_directory_of(what, path).map(drop)
    }

    /// The credential directory a path lies in, and the path below it, judged
    /// on the text alone: nothing outside the directories is looked at.
    fn credential_directory_of(
        &self,
        what: &str,
        path: &str,
    ) -> Result<(PathBuf, PathBuf), PolicyError> {
        let outside = || PolicyError::OutsideCredentialDirectories {
            what: what.to_string(),
            path: path.to_string(),
        };
        let requested = Path::new(path);
        if !requested.is_absolute() {
            return Err(outside());
        }
        let requested = normalize(requested).ok_or_else(outside)?;
        self.credential_directories
            .iter()
            .find_map(|dir| {
                requested
                    .strip_prefix(dir)
                    .ok()
                    .filter(|below| below.components().next().is_some())
                    .map(|below| (dir.clone(), below.to_path_buf()))
            })
            .ok_or_else(outside)
    }

    /// Checks a credential file without reading it (for clients that open the
    /// file themselves, such as a CA bundle handed to an HTTP client by path).
    pub fn check_credential_file(&self, what: &str, path: &str) -> Result<PathBuf, PolicyError> {
        let (full, file) = self.open_credential(what, path)?;
        drop(file);
        Ok(full)
    }

    /// Reads a credential file after the checks described in the module docs.
    pub fn read_credential_file(
        &self,
        what: &str,
        path: &str,
    ) -> Result<Zeroizing<Vec<u8>>, PolicyError> {
        let (_, file) = self.open_credential(what, path)?;
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(MAX_CREDENTIAL_FILE)
            .read_to_end(&mut bytes)
            .map_err(|e| self.unusable(what, path, &format!("cannot read it: {e}")))?;
        Ok(bytes)
    }

    /// As [`read_credential_file`](Self::read_credential_file), as text.
    pub fn read_credential_text(
        &self,
        what: &str,
        path: &str,
    ) -> Result<Zeroizing<String>, PolicyError> {
        let bytes = self.read_credential_file(what, path)?;
        match std::str::from_utf8(&bytes) {
            Ok(text) => Ok(Zeroizing::new(text.to_string())),
            Err(_) => Err(self.unusable(what, path, "it is not UTF-8 text")),
        }
    }

    fn unusable(&self, what: &str, path: &str, reason: &str) -> PolicyError {
        PolicyError::UnusableCredentialFile {
            what: what.to_string(),
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Opens a credential file after the checks described in the module docs;
    /// the path that was opened, and the file.
    fn open_credential(&self, what: &str, path: &str) -> Result<(PathBuf, File), PolicyError> {
        if let Some(problem) = self.invalid_entries.first() {
            return Err(self.unusable(
                what,
                path,
                &format!("the server's policy is invalid: {problem}"),
            ));
        }
        // Lexical checks first: nothing outside the directories is looked at.
        let (directory, below) = self.credential_directory_of(what, path)?;
        // Inside a directory a superuser chose: from here on, saying what is
        // wrong with the file helps the administrator and reveals nothing else.
        let file = CredentialFile {
            policy: self,
            what,
            path,
        };
        let (directory, resolved) = file.resolve(&directory, &below)?;
        let (opened, handle) = file.open(&directory, &resolved)?;
        file.check_owner_and_mode(&handle)?;
        Ok((opened, handle))
    }
}

/// One credential file being opened: the steps of
/// [`AccessPolicy::open_credential`] once the path is known to lie inside a
/// credential directory, each reporting what is wrong with the file.
struct CredentialFile<'a> {
    policy: &'a AccessPolicy,
    what: &'a str,
    path: &'a str,
}

impl CredentialFile<'_> {
    fn unusable(&self, reason: &str) -> PolicyError {
        self.policy.unusable(self.what, self.path, reason)
    }

    fn unusable_io(&self, e: &std::io::Error) -> PolicyError {
        self.unusable(io_reason(e))
    }

    fn leads_outside(&self, directory: &Path, resolved: &Path) -> PolicyError {
        self.unusable(&format!(
            "a symbolic link leads outside {} (to {})",
            directory.display(),
            resolved.display()
        ))
    }

    /// The directory and the file with every symbolic link followed; links are
    /// followed only while they stay inside the directory (Kubernetes mounts
    /// service-account tokens as links into a `..data` directory next to them).
    fn resolve(&self, directory: &Path, below: &Path) -> Result<(PathBuf, PathBuf), PolicyError> {
        let directory = std::fs::canonicalize(directory)
            .map_err(|e| self.unusable(&format!("{}: {}", directory.display(), io_reason(&e))))?;
        let resolved =
            std::fs::canonicalize(directory.join(below)).map_err(|e| self.unusable_io(&e))?;
        if resolved == directory || !resolved.starts_with(&directory) {
            return Err(self.leads_outside(&directory, &resolved));
        }
        Ok((directory, resolved))
    }

    /// Opens the resolved file without following a link, and checks that what
    /// was opened, not what was resolved a moment before, is inside the
    /// directory: a link swapped in between would show here.
    fn open(&self, directory: &Path, resolved: &Path) -> Result<(PathBuf, File), PolicyError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(resolved)
            .map_err(|e| self.unusable_io(&e))?;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| self.unusable_io(&e))?;
        if !opened.starts_with(directory) {
            return Err(self.leads_outside(directory, resolved));
        }
        Ok((opened, file))
    }

    /// A regular file, owned by the server's OS user and readable by it alone.
    fn check_owner_and_mode(&self, file: &File) -> Result<(), PolicyError> {
        let meta = file.metadata().map_err(|e| self.unusable_io(&e))?;
        if !meta.is_file() {
            return Err(self.unusable("it is not a regular file"));
        }
        if meta.uid() != effective_uid() {
            return Err(self.unusable("it is not owned by the server's OS user"));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(self.unusable(&format!(
                "its mode is {mode:04o}; other users may read it (use 0600 or stricter)"
            )));
        }
        Ok(())
    }
}

/// The server's effective user id (std has no safe accessor, and no crate
/// that has one is a dependency here).
#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory of ours, has no
    // preconditions and cannot fail; it only reads the process's credentials.
    unsafe { libc::geteuid() }
}

fn io_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => "it does not exist",
        std::io::ErrorKind::PermissionDenied => "the server's OS user may not read it",
        _ if e.raw_os_error() == Some(libc::ELOOP) => "it is a symbolic link",
        _ => "it cannot be opened",
    }
}

/// An absolute path without `.` and `..` (a `..` is refused outright: the
/// policy compares paths lexically, and `..` after a symbolic link would not
/// mean what it seems to).
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir => out.push("/"),
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn policy(dir: &Path) -> AccessPolicy {
        AccessPolicy::new(
            &dir.display().to_string(),
            "vault.internal:8200, *.corp.example",
            false,
        )
    }

    fn write(path: &Path, mode: u32) {
        std::fs::write(path, b"s3cret\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn credential_file_inside_the_directory_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        write(&file, 0o600);
        let p = policy(dir.path());
        assert_eq!(
            &*p.read_credential_text("token_file", file.to_str().unwrap())
                .unwrap(),
            "s3cret\n"
        );
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let nested = dir.path().join("sub/token");
        write(&nested, 0o400);
        assert!(
            p.read_credential_file("token_file", nested.to_str().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn paths_outside_are_refused_without_looking() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        for path in [
            "/etc/passwd",
            "/definitely/not/there",
            "relative/token",
            &format!("{}/../etc/passwd", dir.path().display()),
            &dir.path().display().to_string(),
        ] {
            assert!(
                matches!(
                    p.read_credential_file("token_file", path),
                    Err(PolicyError::OutsideCredentialDirectories { .. })
                ),
                "{path}"
            );
        }
        // A missing file and an existing one outside look the same.
        let a = p
            .read_credential_file("f", "/etc/passwd")
            .unwrap_err()
            .to_string();
        let b = p
            .read_credential_file("f", "/etc/no-such-file")
            .unwrap_err()
            .to_string();
        assert_eq!(
            a.replace("/etc/passwd", "X"),
            b.replace("/etc/no-such-file", "X")
        );
        // No directory configured: nothing is allowed.
        let none = AccessPolicy::new("", "", false);
        assert!(none.read_credential_file("f", "/tmp/x").is_err());
    }

    #[test]
    fn links_out_of_the_directory_and_loose_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("master.key");
        write(&target, 0o600);
        let link = dir.path().join("token");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let p = policy(dir.path());
        let err = p
            .read_credential_file("token_file", link.to_str().unwrap())
            .unwrap_err();
        assert!(
            err.to_string().contains("symbolic link leads outside"),
            "{err}"
        );
        // A symlinked directory below the credential directory.
        let linked_dir = dir.path().join("linked");
        std::os::unix::fs::symlink(outside.path(), &linked_dir).unwrap();
        let err = p
            .read_credential_file(
                "token_file",
                linked_dir.join("master.key").to_str().unwrap(),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("symbolic link leads outside"),
            "{err}"
        );
        // Readable or writable by others.
        for mode in [0o640, 0o604, 0o620, 0o644] {
            let loose = dir.path().join(format!("loose{mode:o}"));
            write(&loose, mode);
            let err = p
                .read_credential_file("token_file", loose.to_str().unwrap())
                .unwrap_err();
            assert!(err.to_string().contains("other users may read it"), "{err}");
        }
        // Not a regular file.
        let sub = dir.path().join("adir");
        std::fs::create_dir(&sub).unwrap();
        assert!(
            p.read_credential_file("token_file", sub.to_str().unwrap())
                .is_err()
        );
    }

    #[test]
    fn links_inside_the_directory_are_followed() {
        // The layout Kubernetes gives a projected service-account token:
        // token -> ..data/token, ..data -> ..2026_12_01_00_00_00.1/
        let dir = tempfile::tempdir().unwrap();
        let stamped = dir.path().join("..2026_12_01_00_00_00.1");
        std::fs::create_dir(&stamped).unwrap();
        write(&stamped.join("token"), 0o600);
        std::os::unix::fs::symlink("..2026_12_01_00_00_00.1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
        let p = policy(dir.path());
        let token = dir.path().join("token");
        assert_eq!(
            &*p.read_credential_text("jwt_file", token.to_str().unwrap())
                .unwrap(),
            "s3cret\n"
        );
        // The credential directory itself may be reached through a link.
        let alias_parent = tempfile::tempdir().unwrap();
        let alias = alias_parent.path().join("alias");
        std::os::unix::fs::symlink(dir.path(), &alias).unwrap();
        let through_alias = policy(&alias);
        assert!(
            through_alias
                .read_credential_file("jwt_file", alias.join("token").to_str().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn services_own_hosts_and_listed_endpoints_are_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        for (ok, service) in [
            ("https://kms.us-east-1.amazonaws.com", Service::AwsKms),
            (
                "https://kms-fips.us-gov-west-1.amazonaws.com/",
                Service::AwsKms,
            ),
            ("https://kms.cn-north-1.amazonaws.com.cn", Service::AwsKms),
            (
                "https://byok-vault.vault.azure.net/",
                Service::AzureKeyVault,
            ),
            ("https://hsm1.managedhsm.azure.net", Service::AzureKeyVault),
            ("https://login.microsoftonline.com", Service::AzureLogin),
            ("https://cloudkms.googleapis.com", Service::GcpKms),
            (
                "https://cloudkms.europe-west3.rep.googleapis.com",
                Service::GcpKms,
            ),
            ("https://oauth2.googleapis.com/token", Service::GcpToken),
            ("https://vault.internal:8200", Service::Private),
            ("https://a.corp.example/v1", Service::Private),
            ("https://b.a.corp.example:9999", Service::AwsKms),
        ] {
            assert_eq!(p.check_endpoint("address", ok, service), Ok(()), "{ok}");
        }
    }

    #[test]
    fn other_hosts_ports_schemes_and_urls_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        for (bad, service) in [
            ("http://kms.us-east-1.amazonaws.com", Service::AwsKms),
            // Hosts anyone can put their own code or content behind.
            (
                "https://abc123.execute-api.us-east-1.amazonaws.com",
                Service::AwsKms,
            ),
            (
                "https://abc123.execute-api.us-east-1.amazonaws.com",
                Service::Private,
            ),
            ("https://kms.us-east-1.amazonaws.com", Service::Private),
            ("https://storage.googleapis.com/bucket", Service::GcpKms),
            ("https://storage.googleapis.com/bucket", Service::Private),
            ("https://x.cloudfunctions.net", Service::GcpToken),
            ("https://evil.azurewebsites.net", Service::AzureLogin),
            ("https://byok-vault.vault.azure.net", Service::AzureLogin),
            ("https://a.b.vault.azure.net", Service::AzureKeyVault),
            ("https://kms.a.b.amazonaws.com", Service::AwsKms),
            ("https://kms.us-east-1.amazonaws.com:8443", Service::AwsKms),
            ("https://login.microsoftonline.com", Service::AzureKeyVault),
            ("https://vault.internal:8201", Service::Private),
            ("https://corp.example", Service::Private),
            ("https://evil.com", Service::Private),
            (
                "https://kms.us-east-1.amazonaws.com.evil.com",
                Service::AwsKms,
            ),
            ("https://user:pw@vault.internal:8200", Service::Private),
            ("ftp://vault.internal:8200", Service::Private),
            ("https://", Service::Private),
            ("vault.internal:8200", Service::Private),
        ] {
            assert!(p.check_endpoint("address", bad, service).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_and_unverified_tls_need_the_opt_in() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        let insecure = AccessPolicy::new("", "127.0.0.1", true);
        assert_eq!(
            insecure.check_endpoint("a", "http://127.0.0.1:8200", Service::Private),
            Ok(())
        );
        assert!(
            insecure
                .check_endpoint("a", "http://127.0.0.2:8200", Service::Private)
                .is_err()
        );
        assert!(p.check_insecure_tls("tls_skip_verify").is_err());
        assert!(insecure.check_insecure_tls("tls_skip_verify").is_ok());
        assert!(
            AccessPolicy::new("", "[::1]:8200", false)
                .check_endpoint("a", "https://[::1]:8200/", Service::Private)
                .is_ok()
        );
    }
}
