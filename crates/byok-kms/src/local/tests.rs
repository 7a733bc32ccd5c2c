use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn ctx(tenant: &str, dek_id: u64) -> KeyContext<'_> {
    KeyContext::new(tenant, dek_id)
}

#[test]
fn creates_a_private_key_file_once_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let first = LocalProvider::open(&path, true).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = LocalProvider::open(&path, true).unwrap();
    assert_eq!(
        first.secret().unwrap().0[..],
        second.secret().unwrap().0[..]
    );
    // no temporary files left behind
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn missing_file_without_create_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalProvider::open(&dir.path().join("nope"), false)
        .err()
        .unwrap();
    assert!(matches!(
        err,
        LocalError::KeyFile(KeyFileError::Missing { .. })
    ));
}

#[test]
fn concurrent_creators_agree_on_one_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let secrets: Vec<[u8; 32]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    *LocalProvider::open(&path, true)
                        .unwrap()
                        .secret()
                        .unwrap()
                        .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(secrets.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn refuses_a_file_readable_by_others_and_malformed_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    LocalProvider::open(&path, true).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = LocalProvider::open(&path, false).err().unwrap();
    assert!(matches!(
        err,
        LocalError::KeyFile(KeyFileError::TooOpen { mode: 0o644, .. })
    ));

    fs::write(&path, "not hex at all\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let err = LocalProvider::open(&path, false).err().unwrap();
    assert!(matches!(
        err,
        LocalError::KeyFile(KeyFileError::Malformed { .. })
    ));
    // The message names the file but never echoes its contents.
    assert!(!err.to_string().contains("not hex"));
}

#[test]
fn wrap_unwrap_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = LocalProvider::open(&dir.path().join("k"), true).unwrap();
    let (dek, wrapped) = p.generate_now("cmk-1", &ctx("tenant_a", 5)).unwrap();
    assert_eq!(wrapped.cmk_id, "cmk-1");
    assert_eq!(wrapped.cmk_version.len(), 16);
    assert!(
        !wrapped.blob.windows(DEK_LEN).any(|w| w == dek.expose()),
        "plaintext key in blob"
    );
    assert_eq!(p.unwrap_now(&wrapped, &ctx("tenant_a", 5)).unwrap(), dek);
}

#[test]
fn a_wrapped_key_moved_to_another_tenant_or_id_or_master_key_fails() {
    let dir = tempfile::tempdir().unwrap();
    let p = LocalProvider::open(&dir.path().join("k"), true).unwrap();
    let (_, wrapped) = p.generate_now("cmk-1", &ctx("tenant_a", 5)).unwrap();
    for (tenant, id) in [("tenant_b", 5), ("tenant_a", 6)] {
        let e = ProviderError::from(p.unwrap_now(&wrapped, &ctx(tenant, id)).unwrap_err());
        assert_eq!(e.kind, ErrorKind::UnwrapFailed);
    }
    let mut moved = wrapped.clone();
    moved.cmk_id = "cmk-2".into();
    moved.cmk_version = p.key_check_value("cmk-2");
    assert_eq!(
        ProviderError::from(p.unwrap_now(&moved, &ctx("tenant_a", 5)).unwrap_err()).kind,
        ErrorKind::UnwrapFailed
    );
    for pos in 0..wrapped.blob.len() {
        let mut tampered = wrapped.clone();
        tampered.blob[pos] ^= 0x01;
        assert!(
            p.unwrap_now(&tampered, &ctx("tenant_a", 5)).is_err(),
            "byte {pos}"
        );
    }
}

#[test]
fn another_key_file_is_recognised_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let p1 = LocalProvider::open(&dir.path().join("k1"), true).unwrap();
    let p2 = LocalProvider::open(&dir.path().join("k2"), true).unwrap();
    let (_, wrapped) = p1.generate_now("cmk-1", &ctx("t", 1)).unwrap();
    let e = ProviderError::from(p2.unwrap_now(&wrapped, &ctx("t", 1)).unwrap_err());
    assert_eq!(e.kind, ErrorKind::UnwrapFailed);
    assert!(
        e.message.contains("different local master key file"),
        "{}",
        e.message
    );
    assert!(e.hint.is_some());
}

#[test]
fn master_keys_with_other_ids_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let p = LocalProvider::open(&dir.path().join("k"), true).unwrap();
    assert_ne!(p.key_check_value("a"), p.key_check_value("b"));
    let info = p.describe_now("a").unwrap();
    assert!(info.enabled && info.can_wrap);
}

#[test]
fn a_removed_key_file_is_an_outage_not_a_silent_success() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    let p = LocalProvider::open(&path, true).unwrap();
    let (dek, wrapped) = p.generate_now("cmk", &ctx("t", 1)).unwrap();
    let reader = LocalProvider::new(&path, false);
    fs::rename(&path, dir.path().join("moved")).unwrap();
    let e = ProviderError::from(reader.unwrap_now(&wrapped, &ctx("t", 1)).unwrap_err());
    assert_eq!(e.kind, ErrorKind::Unavailable);
    fs::rename(dir.path().join("moved"), &path).unwrap();
    assert_eq!(reader.unwrap_now(&wrapped, &ctx("t", 1)).unwrap(), dek);
}
