//! Randomness from the system (through the TLS provider's generator), for
//! session names and per-migration seeds.

/// `N` random bytes.
pub fn bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system gave no randomness (getrandom failed)"))?;
    Ok(bytes)
}
