//! The injector's AdmissionReview handling, as the HTTPS handler calls it: never a
//! panic; an allowed patch applies to the pod the API server sent and leaves a valid
//! Pod; and that pod, reviewed again (webhook reinvocation), is not injected twice.
#![no_main]

use std::sync::LazyLock;

use ferry_injector::inject::Config;
use ferry_injector::review::{Verdict, review};
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

static CFG: LazyLock<Config> = LazyLock::new(Config::default);

fuzz_target!(|data: &[u8]| {
    // Half the inputs as from the namespace-enabled webhook, so more reach injection.
    let namespace_enabled = data.len().is_multiple_of(2);
    let Ok((answer, verdict)) = review(data, namespace_enabled, &CFG) else {
        return;
    };
    let resp = answer.response.expect("a review answers with a response");
    let Some(patch) = resp.patch.filter(|_| resp.allowed) else {
        return;
    };
    assert_eq!(verdict, Verdict::Injected);
    let patch: json_patch::Patch =
        serde_json::from_slice(&patch).expect("the patch is a JSON patch");

    // serde_json skips unknown fields without checking their UTF-8; the API server
    // never sends such bytes, so a body that is not JSON as a whole says nothing.
    let Ok(mut body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // The API server applies the patch to the object it sent, not to our Pod's form.
    let object = &mut body["request"]["object"];
    // The patch is a diff of our Pod's JSON form, so it applies where the sent object has
    // every field that form has. The API server's Go encoding always writes `metadata`
    // and required fields (a container's `name`), so inputs without them say nothing.
    // Fields the form lacks (unknown to k8s-openapi, or null) may stay: they are what a
    // newer API server sends.
    match serde_json::from_value::<Pod>(object.clone()).map(serde_json::to_value) {
        Ok(Ok(form)) if covers(object, &form) => {}
        _ => return,
    }
    json_patch::patch(object, &patch)
        .unwrap_or_else(|e| panic!("the patch does not apply to the request's pod: {e}"));
    if let Err(e) = serde_json::from_value::<Pod>(object.clone()) {
        panic!("the patched pod is not a Pod: {e}\n{object}");
    }

    let again = serde_json::to_vec(&body).expect("JSON serialises");
    match review(&again, namespace_enabled, &CFG) {
        Ok((_, Verdict::Injected)) => panic!("an injected pod is injected again"),
        Ok(_) => {}
        Err(e) => panic!("the patched review is refused: {e}"),
    }
});

/// Whether every field of `form` is at the same place in `sent` (arrays the same length).
fn covers(sent: &Value, form: &Value) -> bool {
    match (sent, form) {
        (Value::Object(s), Value::Object(f)) => f
            .iter()
            .all(|(k, fv)| s.get(k).is_some_and(|sv| covers(sv, fv))),
        (Value::Array(s), Value::Array(f)) => {
            s.len() == f.len() && s.iter().zip(f).all(|(sv, fv)| covers(sv, fv))
        }
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        _ => true,
    }
}
