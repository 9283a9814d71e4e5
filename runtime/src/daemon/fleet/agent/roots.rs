//! Roots: a signed root document heard on the broker, checked against the chain the
//! device follows, and taken when it extends it.

use kiln_protocol::fleet::EventKind;
use kiln_protocol::trust::{SignedRoot, MAX_ROOT};

use super::{Agent, Effect, MAX_PENDING_ROOTS, MAX_ROOT_CANDIDATES};

impl Agent {
    /// A root document: taken if it is the next version and signed by this root's
    /// root keys and its own; kept if a version between is missing.
    pub(super) fn on_root(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let current = self.trust.chain.root().version;
        let version = match SignedRoot::peek(payload) {
            Ok(r) => r.version,
            Err(why) => {
                let reason = format!("root document refused: {why}");
                return self.event_once("*", 0, EventKind::Rejected { reason });
            }
        };
        if payload.len() > MAX_ROOT || version <= current {
            return;
        }
        let candidates = self.pending_roots.entry(version).or_default();
        if !candidates.iter().any(|c| c.as_slice() == payload) {
            candidates.push(payload.to_vec());
            if candidates.len() > MAX_ROOT_CANDIDATES {
                candidates.remove(0);
            }
        }
        while self.pending_roots.len() > MAX_PENDING_ROOTS {
            self.pending_roots.pop_last();
        }
        let mut taken = false;
        while let Some(candidates) = self
            .pending_roots
            .remove(&self.trust.chain.root().version.saturating_add(1))
        {
            // The first candidate that chains is the root; the others are refused.
            let mut refused = Vec::new();
            let mut advanced = false;
            for bytes in candidates {
                if advanced {
                    break;
                }
                match self.trust.chain.advance(&bytes) {
                    Ok(root) => {
                        let reason = root.describe();
                        advanced = true;
                        taken = true;
                        // Each one kept: the next start chains through all of them.
                        self.out.push(Effect::Trust(bytes.clone()));
                        self.event("*", 0, EventKind::Trusted { reason });
                    }
                    Err(why) => refused.push(why),
                }
            }
            for why in refused {
                let reason = format!("root document refused: {why}");
                self.event("*", 0, EventKind::Rejected { reason });
            }
            if !advanced {
                break;
            }
        }
        let current = self.trust.chain.root().version;
        self.pending_roots.retain(|v, _| *v > current);
        if let Some(first) = self.pending_roots.keys().next() {
            let reason = format!(
                "root v{first} does not follow root v{current}: waiting for root v{}",
                current.saturating_add(1)
            );
            self.event_once("*", 0, EventKind::Rejected { reason });
        }
        if taken {
            self.on_new_root();
        }
    }

    /// After a rotation: the states taken before stay (they were signed by a key
    /// trusted then, and what runs must not change because a key did); every state
    /// from now on must verify under the new root, and the ones that did not verify
    /// before are tried again (they may be signed by a rotated-in key).
    pub(super) fn on_new_root(&mut self) {
        for (source, bytes) in std::mem::take(&mut self.unverified) {
            self.on_desired(&source, &bytes);
        }
        self.publish_status();
        self.reconcile();
    }
}
