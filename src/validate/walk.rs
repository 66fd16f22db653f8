//! The walk of one validation: each child of an index, each child image's config
//! and layers, judged through the checker and recorded in the integrity state (and in
//! the referenced map, for evidence of loss later). Also the re-check of one broken
//! reference. Bounded by [`Walk`]; knows nothing of queues or HTTP.

use std::sync::Arc;

use http::HeaderValue;

use super::{evidence, Inspector, Node, Tally, Witness};
use crate::checker::{FetchError, Outcome, RefKind, Visit, Walk};
use crate::integrity::{now_epoch, BrokenRef};
use crate::oci::{Descriptor, Manifest, ManifestKind};

impl Inspector {
    pub(super) async fn walk_index(
        &self,
        node: &Node<'_>,
        children: &[Descriptor],
        depth: u32,
        tally: &mut Tally,
        walk: &mut Walk,
    ) {
        if depth > self.settings.max_depth {
            tally.errors += 1;
            tracing::warn!(
                repository = node.repository,
                index_digest = node.root_digest,
                max_depth = self.settings.max_depth,
                "index nests deeper than validate.max_depth; not followed"
            );
            return;
        }
        for child in children {
            if tally.over_budget.is_some() {
                return;
            }
            let walk_into = match walk.visit(RefKind::Manifest, child).await {
                Ok(Visit::First) => true,
                Ok(Visit::Variant) => false, // judged; its content is walked once
                Ok(Visit::Repeat) => continue,
                Err(over) => {
                    tally.over_budget = Some(over);
                    return;
                }
            };
            let platform: Arc<str> = Arc::from(crate::oci::bounded(
                &child
                    .platform
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ));
            let outcome = self
                .checker
                .check(node.repository, child, RefKind::Manifest, node.auth)
                .await;
            self.record(node, child, RefKind::Manifest, &platform, &outcome, tally);
            if outcome != Outcome::Ok || !walk_into {
                continue;
            }
            let needs_content = node.blobs
                || crate::oci::manifest_kind(&child.media_type) == Some(ManifestKind::Index);
            if !needs_content {
                continue;
            }
            match self
                .checker
                .manifest(node.repository, &child.digest, node.auth)
                .await
            {
                Ok(m) => match m.as_ref() {
                    Manifest::Index { manifests } => {
                        Box::pin(self.walk_index(node, manifests, depth + 1, tally, walk)).await
                    }
                    Manifest::Image { .. } => {
                        if node.blobs {
                            self.check_image_blobs(node, &m, &platform, tally, walk)
                                .await;
                        }
                    }
                },
                Err(FetchError::Unauthorized(_)) => tally.unauthorized += 1,
                Err(e) => {
                    tally.errors += 1;
                    tracing::warn!(repository = node.repository, child_digest = %child.digest, error = %e, "cannot read child manifest");
                }
            }
        }
    }

    pub(super) async fn check_image_blobs(
        &self,
        node: &Node<'_>,
        image: &Manifest,
        platform: &Arc<str>,
        tally: &mut Tally,
        walk: &mut Walk,
    ) {
        let Manifest::Image { config, layers } = image else {
            return;
        };
        // The config is always in the registry; only layers with `urls` live elsewhere.
        let distributable = layers.iter().filter(|l| l.urls.is_empty());
        for blob in std::iter::once(config).chain(distributable) {
            match walk.visit(RefKind::Blob, blob).await {
                Ok(Visit::First | Visit::Variant) => {}
                Ok(Visit::Repeat) => continue,
                Err(over) => {
                    tally.over_budget = Some(over);
                    return;
                }
            }
            let outcome = self
                .checker
                .check(node.repository, blob, RefKind::Blob, node.auth)
                .await;
            self.record(node, blob, RefKind::Blob, platform, &outcome, tally);
        }
    }

    fn record(
        &self,
        node: &Node<'_>,
        d: &Descriptor,
        kind: RefKind,
        platform: &Arc<str>,
        outcome: &Outcome,
        tally: &mut Tally,
    ) {
        // A client's 404 that came before any walk knew the digest is referenced beats a
        // positive this walk may have taken from the cache before that 404 evicted it.
        let outcome = match outcome {
            Outcome::Ok => match self
                .shared
                .orphan_loss
                .remove(&(Arc::from(node.repository), Arc::from(d.digest.as_str())))
            {
                Some(o) if kind == RefKind::Blob || evidence::accepts(&o.accept, &d.media_type) => {
                    &Outcome::Missing
                }
                _ => outcome,
            },
            _ => outcome,
        };
        self.shared.remember_parent(
            node.repository,
            &d.digest,
            evidence::Parent {
                index: Arc::from(node.root_digest),
                reference: Arc::from(node.reference),
                platform: platform.clone(),
                kind,
                size: d.size,
                media_type: Arc::from(crate::oci::bounded(&d.media_type)),
            },
        );
        if *outcome == Outcome::Missing {
            // A 404 of regguard's own: every other index referencing it is broken too.
            self.loss(
                node.repository,
                &d.digest,
                self.shared.parents(node.repository, &d.digest),
                Witness::Check,
                Some(node.root_digest),
                node.auth,
            );
        }
        match outcome {
            // Healed only once the whole walk is done: another descriptor of the same
            // digest (a wrong size) may still be broken.
            Outcome::Ok => tally.ok.push(d.digest.clone()),
            Outcome::Unauthorized(_) => tally.unauthorized += 1,
            Outcome::Error(_) => tally.errors += 1,
            Outcome::Missing | Outcome::Mismatch { .. } => {
                tally.broken += 1;
                tally.broken_digests.insert(d.digest.clone());
                // Detection is observed once per reference, however many walks race to
                // report it, and before the gauge shows it: whoever sees the gauge rise
                // also sees the detection histogram counted.
                let detection = &self.shared.metrics.detection;
                let seen_at = node.seen_at;
                let broken = BrokenRef {
                    repository: node.repository.to_string(),
                    reference: node.reference.to_string(),
                    index_digest: node.root_digest.to_string(),
                    child_digest: d.digest.clone(),
                    platform: platform.to_string(),
                    kind,
                    upstream_said: outcome.describe(kind),
                    outcome: outcome.kind(),
                    since: now_epoch(),
                    auth: node.auth.cloned().map(evidence::sensitive),
                    size: d.size,
                    heal: Default::default(),
                };
                self.integrity.report_broken_then(broken, || {
                    detection.observe(seen_at.elapsed().as_secs_f64())
                });
            }
        }
    }

    /// Re-checks one broken reference, bypassing cached negatives. The service
    /// credentials come first (they do not expire); the credentials of the client that
    /// found it are used only while the registry accepts them, then forgotten.
    pub(super) async fn recheck(&self, b: &BrokenRef) {
        let desc = Descriptor {
            digest: b.child_digest.clone(),
            size: b.size,
            ..Descriptor::default()
        };
        let mut candidates: Vec<(Option<&HeaderValue>, bool)> = Vec::new();
        if let Some(a) = &self.service_auth {
            candidates.push((Some(a), false));
        }
        if let Some(a) = &b.auth {
            candidates.push((Some(a), true));
        }
        if candidates.is_empty() {
            candidates.push((None, false));
        }
        for (auth, captured) in candidates {
            // Is the index itself still there? If not, its entries go.
            let index = self
                .checker
                .present(&b.repository, &b.index_digest, RefKind::Manifest, auth)
                .await;
            match index {
                crate::checker::Presence::NotFound => {
                    self.integrity.remove_index(&b.repository, &b.index_digest);
                    return;
                }
                crate::checker::Presence::Unauthorized(_) => {
                    if captured {
                        self.integrity.drop_auth(b);
                    }
                    continue;
                }
                _ => {}
            }
            let outcome = self
                .checker
                .recheck(&b.repository, &desc, b.kind, auth, false)
                .await;
            match outcome {
                Outcome::Ok => {
                    self.integrity
                        .report_ok(&b.repository, &b.index_digest, &b.child_digest);
                    return;
                }
                Outcome::Unauthorized(_) => {
                    if captured {
                        self.integrity.drop_auth(b);
                    }
                }
                _ => return,
            }
        }
    }
}
