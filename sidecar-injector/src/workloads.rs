//! `ferry-injector inject -f`: the same injection, applied to manifests on disk.

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::Value;

use crate::inject::{Config, Outcome, inject};

/// Where a kind keeps its pod template (metadata + spec), as a JSON pointer.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Injects every document of a (multi-document) YAML stream; other kinds pass through.
/// Problems are reported per document, and nothing is written if any document fails.
pub fn inject_yaml(text: &str, cfg: &Config) -> anyhow::Result<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .map_err(|e| anyhow::anyhow!("document {}: not YAML: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or("").to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        let ns = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let Some(path) = template_path(&kind) else {
            out.push(value);
            continue;
        };
        let mut value = value;
        let template = if path.is_empty() {
            Some(&mut value)
        } else {
            value.pointer_mut(path)
        };
        let Some(template) = template else {
            anyhow::bail!(
                "document {} ({kind} {name}): no pod template at {path}",
                i + 1
            );
        };
        let pod: Pod = serde_json::from_value(template.clone()).map_err(|e| {
            anyhow::anyhow!(
                "document {} ({kind} {name}): not a valid pod template: {e}",
                i + 1
            )
        })?;
        // Offline, the namespace label is unknown: inject unless the pod says disabled.
        match inject(&pod, &ns, true, cfg) {
            Ok(Outcome::Injected(p)) => {
                let mut injected = serde_json::to_value(&*p)?;
                if !path.is_empty() {
                    // A template has no apiVersion/kind of its own.
                    if let Some(o) = injected.as_object_mut() {
                        o.remove("apiVersion");
                        o.remove("kind");
                        o.remove("status");
                    }
                }
                *template = injected;
                notes.push(format!("{kind} {name}: injected"));
            }
            Ok(Outcome::Skipped(reason)) => {
                notes.push(format!("{kind} {name}: not injected: {reason}"))
            }
            Err(refusal) => anyhow::bail!("document {} ({kind} {name}): {refusal}", i + 1),
        }
        out.push(value);
    }
    let mut text = String::new();
    for v in out {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(&v)?);
    }
    Ok((text, notes))
}
