//! Bearer tokens and passwords: one stable random secret per identity and run dir, kept in
//! $QDB_RUN/tokens, so a restart keeps what clients already hold.

use std::fs;
use std::io::Read;

use anyhow::{Context, Result};

use crate::Cloud;

/// The identity's token, made on first use (24 random bytes in hex, as `openssl rand -hex 24`).
pub fn token(cloud: &Cloud, identity: &str) -> Result<String> {
    // Poisoned only if another thread panicked while holding it; the file is still whole then.
    let _guard = cloud.tokens.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cloud.settings.run.join("tokens");
    let file = dir.join(identity);
    let has_one = fs::metadata(&file).is_ok_and(|m| m.len() > 0);
    if !has_one {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut bytes = [0u8; 24];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("reading /dev/urandom")?;
        fs::write(&file, format!("{}\n", hex(&bytes)))
            .with_context(|| format!("writing {}", file.display()))?;
    }
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text.trim_end_matches('\n').to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(super::hex(&[0, 0xab, 7]), "00ab07");
    }
}
