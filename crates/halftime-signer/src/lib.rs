//! Ed25519 signing of curtailment commands, and the verification a device does.
//!
//! The engine signs [`DeferralCommand::canonical_bytes`], never protobuf bytes. A key id is the first four
//! bytes (big-endian) of SHA-256 over `"halftime-key-id-v1"` and the 32-byte public key, so a device can tell
//! which of its provisioned keys to use without trying each.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use halftime_core::{DeferralCommand, SignedCommand};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignerError {
    #[error("no randomness available for a new key: {0}")]
    Random(String),
    #[error("invalid public key")]
    InvalidPublicKey,
    #[error("invalid key encoding: {0}")]
    Encoding(String),
}

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    #[error("unknown key id {0}")]
    UnknownKey(u32),
    #[error("bad signature")]
    BadSignature,
}

/// The key id of a public key.
pub fn key_id_of(public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(b"halftime-key-id-v1");
    h.update(public_key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// The engine's signing key.
pub struct Signer {
    key: SigningKey,
    key_id: u32,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl Signer {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id_of(key.verifying_key().as_bytes());
        Self { key, key_id }
    }

    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<Self, SignerError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| SignerError::Random(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// The secret seed, for the store. Handle with care.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs a command, stamping it with this key's id.
    pub fn sign(&self, mut command: DeferralCommand) -> SignedCommand {
        command.key_id = self.key_id;
        let signature = self.key.sign(&command.canonical_bytes()).to_bytes();
        SignedCommand { command, signature }
    }
}

/// Public keys a device trusts, provisioned out of band. Bounded: a device holds a handful.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<(u32, VerifyingKey)>,
}

/// Most keys a device trusts at once (current and next, during rotation, and a spare).
pub const N_TRUSTED_KEYS_MAX: usize = 4;

impl TrustedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts a public key; returns its key id. The oldest key is dropped past [`N_TRUSTED_KEYS_MAX`].
    pub fn add(&mut self, public_key: [u8; 32]) -> Result<u32, SignerError> {
        let vk = VerifyingKey::from_bytes(&public_key).map_err(|_| SignerError::InvalidPublicKey)?;
        let id = key_id_of(&public_key);
        self.keys.retain(|(k, _)| *k != id);
        if self.keys.len() == N_TRUSTED_KEYS_MAX {
            self.keys.remove(0);
        }
        self.keys.push((id, vk));
        Ok(id)
    }

    /// Trusts a key given as 64 hex characters.
    pub fn add_hex(&mut self, hex_key: &str) -> Result<u32, SignerError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|e| SignerError::Encoding(e.to_string()))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SignerError::Encoding("need 32 bytes".into()))?;
        self.add(key)
    }

    pub fn verify(&self, signed: &SignedCommand) -> Result<(), VerifyError> {
        let key_id = signed.command.key_id;
        let (_, vk) = self.keys.iter().find(|(k, _)| *k == key_id).ok_or(VerifyError::UnknownKey(key_id))?;
        let sig = Signature::from_bytes(&signed.signature);
        vk.verify_strict(&signed.command.canonical_bytes(), &sig).map_err(|_| VerifyError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halftime_core::{ApplianceId, CommandKind, EventId};

    fn command() -> DeferralCommand {
        DeferralCommand {
            kind: CommandKind::Defer,
            key_id: 0,
            device: ApplianceId(42),
            event: EventId(7),
            counter: 1,
            not_before_unix_ms: 1_000,
            not_after_unix_ms: 700_000,
            deferral_s: 600,
            randomize_start_s: 30,
        }
    }

    #[test]
    fn signs_and_verifies_and_rejects_tampering_and_unknown_keys() {
        let signer = Signer::from_seed([7; 32]);
        let mut trusted = TrustedKeys::new();
        assert_eq!(trusted.add(signer.public_key()).unwrap(), signer.key_id());
        let signed = signer.sign(command());
        assert_eq!(trusted.verify(&signed), Ok(()));

        let mut tampered = signed;
        tampered.command.deferral_s += 1;
        assert_eq!(trusted.verify(&tampered), Err(VerifyError::BadSignature));

        let other = Signer::from_seed([8; 32]).sign(command());
        assert_eq!(trusted.verify(&other), Err(VerifyError::UnknownKey(other.command.key_id)));
    }
}
