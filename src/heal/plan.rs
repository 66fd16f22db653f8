//! What a repair takes: its steps in order, and what the vault lacks. Plain data, shared by
//! the repairer, the background loop and `regguard heal`.

/// What a piece of an image is, for plans and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Manifest,
    Config,
    Layer,
    Blob,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manifest => "manifest",
            Role::Config => "config",
            Role::Layer => "layer",
            Role::Blob => "blob",
        }
    }
}

/// One action of a repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Re-upload a blob from the vault.
    UploadBlob {
        digest: String,
        size: u64,
        role: Role,
    },
    /// Re-PUT a manifest by digest with its exact bytes.
    PutManifest { digest: String, media_type: String },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::UploadBlob { digest, size, role } => {
                write!(f, "upload {} {digest} ({size} bytes)", role.as_str())
            }
            Step::PutManifest { digest, media_type } => {
                write!(f, "put manifest {digest} ({media_type})")
            }
        }
    }
}

/// A piece the registry lost that the vault does not hold either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub digest: String,
    pub role: Role,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} not in vault", self.role.as_str(), self.digest)
    }
}

/// What repairing one reference takes.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub repository: String,
    pub digest: String,
    /// In order: blobs, then manifests, children before parents.
    pub steps: Vec<Step>,
    /// What cannot be repaired from this vault.
    pub lost: Vec<Lost>,
}

impl Plan {
    /// `unrepairable: layer sha256:… not in vault` (the first few), or `None` if repairable.
    pub fn unrepairable(&self) -> Option<String> {
        if self.lost.is_empty() {
            return None;
        }
        let shown: Vec<String> = self.lost.iter().take(3).map(Lost::to_string).collect();
        let more = self.lost.len().saturating_sub(3);
        let more = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        Some(format!("unrepairable: {}{more}", shown.join(", ")))
    }
}

/// A repair's result, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result_ {
    Repaired,
    Unrepairable,
    Failed,
}

impl Result_ {
    pub fn as_str(self) -> &'static str {
        match self {
            Result_::Repaired => "repaired",
            Result_::Unrepairable => "unrepairable",
            Result_::Failed => "failed",
        }
    }
}
