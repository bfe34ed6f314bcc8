//! Files a sink reads at start: a secret (a password in a mounted file) and a private key that
//! only its owner may read. Errors are sentences without the file's contents.

use std::path::Path;

use crate::redact::{key_mode_too_open, SecretFileError};
use crate::Secret;

/// The contents of a secret file without one trailing newline (what `echo` and most secret
/// stores add). An empty file is an error.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    crate::redact::read_secret_file(path).map_err(|e| match e {
        SecretFileError::Unreadable(e) => format!(
            "{} cannot be read ({e}): mount the secret there and make it readable by the relay's user",
            path.display()
        ),
        SecretFileError::Empty => format!(
            "{} is empty: write the secret into it",
            path.display()
        ),
    })
}

/// Checks that a private key file exists and that only its owner may read it, as libpq requires
/// of its key files ([`key_mode_too_open`]).
pub fn check_private_key(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    if let Some((mode, _)) = key_mode_too_open(&meta) {
        return Err(format!(
            "{} may be read by other users (mode {mode:o}): chmod 600 it (or 640 owned by root)",
            path.display()
        ));
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("{} cannot be read ({e})", path.display()))
}

/// Checks that a file (or, where `dir_ok`, a directory) exists and can be read.
pub fn check_readable(path: &Path, dir_ok: bool) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    if meta.is_dir() {
        if !dir_ok {
            return Err(format!("{} is a directory: name a file", path.display()));
        }
        return std::fs::read_dir(path)
            .map(|_| ())
            .map_err(|e| format!("{} cannot be read ({e})", path.display()));
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("{} cannot be read ({e})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_files_lose_one_trailing_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "pa ss\r\n").unwrap();
        assert_eq!(read_secret_file(&p).unwrap().expose(), "pa ss");
        std::fs::write(&p, "pass\n\n").unwrap();
        assert_eq!(read_secret_file(&p).unwrap().expose(), "pass\n");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_secret_file(&p).unwrap_err().contains("is empty"));
        let e = read_secret_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
    }

    #[test]
    fn private_keys_are_for_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        std::fs::write(&p, "k").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_private_key(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = check_private_key(&p).unwrap_err();
        assert!(e.contains("may be read by other users (mode 604)"), "{e}");
        assert!(check_readable(dir.path(), true).is_ok());
        assert!(check_readable(dir.path(), false)
            .unwrap_err()
            .contains("is a directory"));
    }
}
