//! The built-in `local` provider: the embedded default, so byok_pg can be tried
//! without any cloud account.
//!
//! One 256-bit root secret lives in a file (see [`keyfile`]). Each master key id
//! names a key derived from it with HKDF-SHA256, so a tenant can rotate to a new
//! `key_id` without a new file. Data keys are wrapped with AES-256-GCM; the AAD
//! binds the wrapped key to its tenant, its DEK id and its master key id. The
//! "version" recorded for a wrapped key is a key check value of the derived key,
//! which tells "this file is not the one that wrapped the key" apart from
//! "the wrapped key was modified or moved".
//!
//! Revocation: a master key id listed in the *revocation list* beside the key
//! file (`<key file>.revoked`, one id per line, `#` comments) is disabled, the
//! way a customer disables a key in a cloud key manager: every wrap, unwrap and
//! rewrap under it is refused (`KeyDisabled`) until the line is removed. The
//! list is read on every operation, like the key file.
//!
//! Threat model: the root secret sits on the database server, usually beside
//! the data. It protects dumps, logical copies and backups that leave without
//! the file; it does not protect against someone who can read the data
//! directory. Use a real key manager for that.

pub mod keyfile;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use byok_core::config::ProviderKind;
use byok_core::crypto::{self, CryptoError, DEK_LEN, DataKey, SealedKey};
use zeroize::Zeroizing;

pub use keyfile::KeyFileError;

use crate::error::{ErrorKind, ProviderError};
use crate::provider::{KeyContext, KeyProvider, MasterKeyInfo, ProviderFuture, WrappedDek};

const WRAP_FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = 1 + NONCE_LEN + DEK_LEN + TAG_LEN;
const HKDF_SALT: &[u8] = b"byok_pg/local/v1";
const WRAP_AAD_LABEL: &[u8] = b"byok_pg/local/wrap/v1\0";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("data key {dek_id} was wrapped by a different local master key file")]
    WrongRootSecret { dek_id: u64 },
    #[error(
        "wrapped data key {dek_id} does not open: it was modified or belongs to another tenant or master key"
    )]
    UnwrapFailed { dek_id: u64 },
    #[error("wrapped data key {dek_id} is {len} bytes; expected {WRAPPED_LEN}")]
    BadBlob { dek_id: u64, len: usize },
    #[error("the operating system's random number generator is unavailable")]
    RandomUnavailable,
    #[error("the key-wrapping cipher could not be set up")]
    CipherUnavailable,
    // (the list's path is for the server's operator, not every caller: it is
    // left out of the message)
    #[error(
        "local master key \"{cmk_id}\" is revoked (listed in the revocation list beside the key file)"
    )]
    Revoked { cmk_id: String },
    #[error("could not read the revocation list \"{list}\": {reason}")]
    RevocationListUnreadable { list: PathBuf, reason: String },
}

impl From<LocalError> for ProviderError {
    fn from(e: LocalError) -> Self {
        let message = e.to_string();
        let local = |kind| ProviderError::new(ProviderKind::Local, kind, message.clone());
        match e {
            LocalError::KeyFile(KeyFileError::TooOpen { .. }) => local(ErrorKind::Misconfigured)
                .with_hint("chmod 600 the file; it must be owned by and readable only by the server's OS user"),
            LocalError::KeyFile(KeyFileError::Missing { .. }) => local(ErrorKind::Unavailable).with_hint(
                "restore the file from your key backup, or point byok.local_master_key_file at it",
            ),
            LocalError::KeyFile(_) => local(ErrorKind::Misconfigured)
                .with_hint("check byok.local_master_key_file and the file's contents and permissions"),
            LocalError::WrongRootSecret { .. } => local(ErrorKind::UnwrapFailed)
                .with_detail("the key check value recorded with the data key differs from the current file's")
                .with_hint("restore the master key file this database was encrypted with"),
            LocalError::UnwrapFailed { .. } | LocalError::BadBlob { .. } => local(ErrorKind::UnwrapFailed),
            LocalError::RandomUnavailable | LocalError::CipherUnavailable => local(ErrorKind::Unavailable),
            LocalError::Revoked { .. } => local(ErrorKind::KeyDisabled)
                .with_hint("remove the key id from the revocation list to enable the key again"),
            // Unknown is not "allowed": a list that cannot be read refuses
            // like a key manager that cannot be asked.
            LocalError::RevocationListUnreadable { .. } => local(ErrorKind::Unavailable),
        }
    }
}

/// The local key store. Like a key manager, it is consulted on every
/// operation: the root secret is read from its file each time (a few
/// microseconds, and only on cache misses), so a removed or replaced file takes
/// effect at once instead of being masked by a copy in memory.
#[derive(Clone)]
pub struct LocalProvider {
    path: PathBuf,
    create: bool,
}

/// One operation's view of the root secret; zeroized when dropped.
struct RootSecret(Zeroizing<[u8; keyfile::ROOT_SECRET_LEN]>);

impl LocalProvider {
    /// A provider over the root secret at `path`. With `create`, a missing file is
    /// created (mode 0600) on first use; without, a missing file is an error.
    pub fn new(path: &Path, create: bool) -> Self {
        LocalProvider {
            path: path.to_path_buf(),
            create,
        }
    }

    /// Opens the root secret now (creating it if allowed), to surface file problems early.
    pub fn open(path: &Path, create: bool) -> Result<Self, LocalError> {
        let provider = LocalProvider::new(path, create);
        provider.secret()?;
        Ok(provider)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The revocation list: master key ids disabled by whoever holds the key file.
    pub fn revocation_list(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".revoked");
        PathBuf::from(name)
    }

    /// Refuses a master key id listed in the revocation list (a missing list
    /// revokes nothing).
    fn check_not_revoked(&self, cmk_id: &str) -> Result<(), LocalError> {
        let list = self.revocation_list();
        let text = match std::fs::read_to_string(&list) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(LocalError::RevocationListUnreadable {
                    list,
                    reason: e.to_string(),
                });
            }
        };
        let revoked = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or_default().trim())
            .any(|id| id == cmk_id);
        if revoked {
            return Err(LocalError::Revoked {
                cmk_id: cmk_id.to_string(),
            });
        }
        Ok(())
    }

    /// The root secret, for work under `cmk_id` (refused if that key is revoked).
    fn secret_for(&self, cmk_id: &str) -> Result<RootSecret, LocalError> {
        self.check_not_revoked(cmk_id)?;
        self.secret()
    }

    fn secret(&self) -> Result<RootSecret, LocalError> {
        Ok(RootSecret(keyfile::load_or_create(
            "local master key file",
            &self.path,
            self.create,
        )?))
    }
}

impl RootSecret {
    fn derive(&self, label: &[u8], cmk_id: &str) -> Zeroizing<[u8; 32]> {
        crypto::hkdf_sha256(HKDF_SALT, &self.0[..], &[label, cmk_id.as_bytes()])
    }

    fn kek(&self, cmk_id: &str) -> Zeroizing<[u8; 32]> {
        self.derive(b"kek\0", cmk_id)
    }

    /// A public fingerprint of the derived master key: 8 bytes of a separate HKDF output.
    fn key_check_value(&self, cmk_id: &str) -> String {
        let kcv = self.derive(b"kcv\0", cmk_id);
        kcv[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn aad(cmk_id: &str, context: &KeyContext<'_>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(
            WRAP_AAD_LABEL.len() + 2 + context.tenant_id.len() + 8 + cmk_id.len(),
        );
        aad.extend_from_slice(WRAP_AAD_LABEL);
        aad.extend_from_slice(&(context.tenant_id.len() as u16).to_be_bytes());
        aad.extend_from_slice(context.tenant_id.as_bytes());
        aad.extend_from_slice(&context.dek_id.to_be_bytes());
        aad.extend_from_slice(cmk_id.as_bytes());
        aad
    }

    fn wrap(
        &self,
        cmk_id: &str,
        dek: &DataKey,
        context: &KeyContext<'_>,
    ) -> Result<WrappedDek, LocalError> {
        let sealed = crypto::seal_key(&self.kek(cmk_id), &Self::aad(cmk_id, context), dek)
            .map_err(|err| match err {
                CryptoError::RandomUnavailable => LocalError::RandomUnavailable,
                // (aws-lc could not set up the key: out of memory)
                _ => LocalError::CipherUnavailable,
            })?;
        let mut blob = Vec::with_capacity(WRAPPED_LEN);
        blob.push(WRAP_FORMAT_V1);
        blob.extend_from_slice(&sealed.nonce);
        blob.extend_from_slice(&sealed.body);
        blob.extend_from_slice(&sealed.tag);
        Ok(WrappedDek {
            blob,
            cmk_id: cmk_id.to_string(),
            cmk_version: self.key_check_value(cmk_id),
        })
    }

    fn unwrap_local(
        &self,
        wrapped: &WrappedDek,
        context: &KeyContext<'_>,
    ) -> Result<DataKey, LocalError> {
        let dek_id = context.dek_id;
        if wrapped.blob.len() != WRAPPED_LEN || wrapped.blob[0] != WRAP_FORMAT_V1 {
            return Err(LocalError::BadBlob {
                dek_id,
                len: wrapped.blob.len(),
            });
        }
        if wrapped.cmk_version != self.key_check_value(&wrapped.cmk_id) {
            return Err(LocalError::WrongRootSecret { dek_id });
        }
        let b = &wrapped.blob;
        let sealed = SealedKey {
            nonce: b[1..1 + NONCE_LEN].try_into().expect("12 bytes"),
            body: b[1 + NONCE_LEN..1 + NONCE_LEN + DEK_LEN]
                .try_into()
                .expect("32 bytes"),
            tag: b[1 + NONCE_LEN + DEK_LEN..].try_into().expect("16 bytes"),
        };
        crypto::open_key(
            &self.kek(&wrapped.cmk_id),
            &Self::aad(&wrapped.cmk_id, context),
            &sealed,
        )
        .map_err(|_| LocalError::UnwrapFailed { dek_id })
    }
}

impl LocalProvider {
    /// Wraps `dek` under `cmk_id`.
    pub fn wrap(
        &self,
        cmk_id: &str,
        dek: &DataKey,
        context: &KeyContext<'_>,
    ) -> Result<WrappedDek, LocalError> {
        self.secret_for(cmk_id)?.wrap(cmk_id, dek, context)
    }

    pub fn generate_now(
        &self,
        cmk_id: &str,
        context: &KeyContext<'_>,
    ) -> Result<(DataKey, WrappedDek), LocalError> {
        let dek = DataKey::generate().map_err(|_| LocalError::RandomUnavailable)?;
        let wrapped = self.secret_for(cmk_id)?.wrap(cmk_id, &dek, context)?;
        Ok((dek, wrapped))
    }

    pub fn unwrap_now(
        &self,
        wrapped: &WrappedDek,
        context: &KeyContext<'_>,
    ) -> Result<DataKey, LocalError> {
        self.secret_for(&wrapped.cmk_id)?
            .unwrap_local(wrapped, context)
    }

    /// Unwraps and wraps again under `new_cmk_id`, in one read of the key file.
    pub fn rewrap_now(
        &self,
        wrapped: &WrappedDek,
        new_cmk_id: &str,
        context: &KeyContext<'_>,
    ) -> Result<WrappedDek, LocalError> {
        self.check_not_revoked(new_cmk_id)?;
        let secret = self.secret_for(&wrapped.cmk_id)?;
        let dek = secret.unwrap_local(wrapped, context)?;
        secret.wrap(new_cmk_id, &dek, context)
    }

    pub fn describe_now(&self, cmk_id: &str) -> Result<MasterKeyInfo, LocalError> {
        let revoked = self.check_not_revoked(cmk_id).err();
        Ok(MasterKeyInfo {
            cmk_id: cmk_id.to_string(),
            version: self.secret()?.key_check_value(cmk_id),
            enabled: revoked.is_none(),
            can_wrap: true,
            description: match revoked {
                Some(revoked) => revoked.to_string(),
                None => format!(
                    "derived from the local master key file \"{}\"",
                    self.path.display()
                ),
            },
        })
    }

    #[cfg(test)]
    fn key_check_value(&self, cmk_id: &str) -> String {
        self.secret().unwrap().key_check_value(cmk_id)
    }
}

/// The local key store does file I/O, which may block (a network file system, a
/// hung device): it runs on tokio's blocking pool so the broker's timeout holds.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LocalError> + Send + 'static,
) -> Result<T, ProviderError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ProviderError::new(
            ProviderKind::Local,
            ErrorKind::Unavailable,
            "the local key store task failed",
        )),
    }
}

impl KeyProvider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    fn generate_data_key<'a>(
        &'a self,
        cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, (DataKey, WrappedDek)> {
        let (me, cmk_id, tenant, dek_id) = (
            self.clone(),
            cmk_id.to_string(),
            context.tenant_id.to_string(),
            context.dek_id,
        );
        Box::pin(blocking(move || {
            me.generate_now(&cmk_id, &KeyContext::new(&tenant, dek_id))
        }))
    }

    fn wrap<'a>(
        &'a self,
        cmk_id: &'a str,
        dek: &'a DataKey,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        let (me, cmk_id, dek, tenant, dek_id) = (
            self.clone(),
            cmk_id.to_string(),
            dek.clone(),
            context.tenant_id.to_string(),
            context.dek_id,
        );
        Box::pin(blocking(move || {
            LocalProvider::wrap(&me, &cmk_id, &dek, &KeyContext::new(&tenant, dek_id))
        }))
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, DataKey> {
        let (me, wrapped, tenant, dek_id) = (
            self.clone(),
            wrapped.clone(),
            context.tenant_id.to_string(),
            context.dek_id,
        );
        Box::pin(blocking(move || {
            me.unwrap_now(&wrapped, &KeyContext::new(&tenant, dek_id))
        }))
    }

    fn describe_master_key<'a>(&'a self, cmk_id: &'a str) -> ProviderFuture<'a, MasterKeyInfo> {
        let (me, cmk_id) = (self.clone(), cmk_id.to_string());
        Box::pin(blocking(move || me.describe_now(&cmk_id)))
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedDek,
        new_cmk_id: &'a str,
        context: KeyContext<'a>,
    ) -> ProviderFuture<'a, WrappedDek> {
        let (me, wrapped, new_cmk_id) = (self.clone(), wrapped.clone(), new_cmk_id.to_string());
        let (tenant, dek_id) = (context.tenant_id.to_string(), context.dek_id);
        Box::pin(blocking(move || {
            me.rewrap_now(&wrapped, &new_cmk_id, &KeyContext::new(&tenant, dek_id))
        }))
    }
}
