//! A 256-bit secret kept as 64 hex digits in a file readable by the server's OS
//! user only: the local provider's root secret, and the audit trail's chain key.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::{Zeroize, Zeroizing};

pub const ROOT_SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("could not read {what} \"{path}\": {reason}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("could not create {what} \"{path}\": {reason}")]
    NotCreated {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} \"{path}\" is malformed: {reason}")]
    Malformed {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} \"{path}\" is accessible by group or others (mode {mode:o})")]
    TooOpen {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("{what} \"{path}\" does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("the operating system's random number generator is unavailable")]
    RandomUnavailable,
}

/// Reads the root secret from `path`. With `create`, a missing file is created
/// first, atomically: the secret is written to a private temporary file which is
/// then hard-linked into place, so concurrent creators agree on one secret and a
/// reader never sees a half-written file.
/// `what` names the file in messages ("local master key file").
pub fn load_or_create(
    what: &'static str,
    path: &Path,
    create: bool,
) -> Result<Zeroizing<[u8; ROOT_SECRET_LEN]>, KeyFileError> {
    match read(what, path) {
        Err(KeyFileError::Missing { .. }) if create => {
            create_atomically(what, path)?;
            read(what, path)
        }
        other => other,
    }
}

fn read(what: &'static str, path: &Path) -> Result<Zeroizing<[u8; ROOT_SECRET_LEN]>, KeyFileError> {
    let unreadable = |e: std::io::Error| KeyFileError::Unreadable {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyFileError::Missing {
                what,
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(unreadable(e)),
    };
    let mode = file.metadata().map_err(unreadable)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            what,
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    // 64 hex digits and a newline; anything much longer is not ours.
    Read::by_ref(&mut file)
        .take(256)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    let malformed = |reason: &str| KeyFileError::Malformed {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let hex = text.trim();
    if hex.len() != ROOT_SECRET_LEN * 2 {
        return Err(malformed("expected 64 hexadecimal digits"));
    }
    let mut secret = Zeroizing::new([0u8; ROOT_SECRET_LEN]);
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let hi = hex_value(pair[0]).ok_or_else(|| malformed("expected 64 hexadecimal digits"))?;
        let lo = hex_value(pair[1]).ok_or_else(|| malformed("expected 64 hexadecimal digits"))?;
        secret[i] = (hi << 4) | lo;
    }
    Ok(secret)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn create_atomically(what: &'static str, path: &Path) -> Result<(), KeyFileError> {
    let not_created = |e: std::io::Error| KeyFileError::NotCreated {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut secret = Zeroizing::new([0u8; ROOT_SECRET_LEN]);
    // (through the FIPS module's DRBG in a FIPS build, like data keys)
    byok_core::crypto::random_bytes(&mut secret[..])
        .map_err(|_| KeyFileError::RandomUnavailable)?;
    let mut text = Zeroizing::new(String::with_capacity(ROOT_SECRET_LEN * 2 + 1));
    for b in secret.iter() {
        text.push(char::from_digit((b >> 4) as u32, 16).expect("nibble"));
        text.push(char::from_digit((b & 15) as u32, 16).expect("nibble"));
    }
    text.push('\n');

    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per creator (process and random suffix), so concurrent creators never share a temp file.
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|_| KeyFileError::RandomUnavailable)?;
    let temp = dir.join(format!(
        ".{file_name}.{}.{:016x}.tmp",
        std::process::id(),
        u64::from_ne_bytes(suffix)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        // The umask cannot widen 0600, but make sure of the mode anyway.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        match fs::hard_link(&temp, path) {
            Ok(()) => {}
            // Another process created it first: theirs wins, ours is discarded.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        fs::File::open(dir)?.sync_all()
    })();
    let _ = fs::remove_file(&temp);
    text.zeroize();
    result.map_err(not_created)
}
