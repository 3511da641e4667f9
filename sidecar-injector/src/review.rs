//! One AdmissionReview in, one out: the thin layer between the API server's JSON and
//! the pure [`crate::inject`].

use k8s_openapi::api::core::v1::Pod;
use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::inject::{Config, Outcome, inject, patch};

/// How a review ended, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped,
    Denied,
    NotAPod,
    /// An UPDATE, DELETE or CONNECT: allowed unchanged.
    NotACreate,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
            Verdict::NotAPod => "not-a-pod",
            Verdict::NotACreate => "not-a-create",
        }
    }
}

/// A request the API server should not have sent: answered 400 with the reason.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the object is not a valid Pod: {0}")]
    Pod(serde_json::Error),
}

/// Answers one review. `namespace_enabled` comes from which webhook called us.
pub fn review(
    body: &[u8],
    namespace_enabled: bool,
    cfg: &Config,
) -> Result<(AdmissionReview<DynamicObject>, Verdict), BadReview> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)?;
    let req: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| BadReview::NoRequest)?;
    let resp = AdmissionResponse::from(&req);
    if req.kind.kind != "Pod" || !req.kind.group.is_empty() {
        return Ok((resp.into_review(), Verdict::NotAPod));
    }
    // Only a new pod can get containers: the API server refuses an UPDATE that changes
    // them, and DELETE and CONNECT have nothing to inject. Checked here too, not only in
    // the webhook's rules, which may be edited to include more operations.
    if req.operation != Operation::Create {
        return Ok((resp.into_review(), Verdict::NotACreate));
    }
    let Some(obj) = &req.object else {
        return Ok((resp.into_review(), Verdict::NotAPod));
    };
    let pod: Pod = serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(BadReview::Pod)?;
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let (resp, verdict) = match inject(&pod, &namespace, namespace_enabled, cfg) {
        Ok(Outcome::Injected(after)) => {
            let p = patch(&pod, &after);
            match resp.clone().with_patch(p) {
                Ok(r) => (r, Verdict::Injected),
                Err(e) => (
                    resp.deny(format!("ferry-injector could not encode its patch: {e}")),
                    Verdict::Denied,
                ),
            }
        }
        Ok(Outcome::Skipped(reason)) => {
            let mut r = resp;
            r.warnings = Some(vec![format!("ferry: not injected: {reason}")]);
            (r, Verdict::Skipped)
        }
        Err(refusal) => (resp.deny(refusal.to_string()), Verdict::Denied),
    };
    tracing::info!(%namespace, %name, verdict = verdict.as_str(), dry_run = req.dry_run, "review");
    Ok((resp.into_review(), verdict))
}
