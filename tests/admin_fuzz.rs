//! Fuzzes the running sidecar's admin API from its OpenAPI document with schemathesis
//! (PyPI; `tests/run.sh` installs it): no 5xx, no crash, and every answer as documented.

mod support;

use std::process::Command;

use support::Ferry;

#[tokio::test]
async fn the_admin_api_survives_fuzzing_from_its_openapi_document() {
    let upstream = support::upstream("a").await;
    let ferry = Ferry::start(
        &format!(
            "admin: 127.0.0.1:0\nlisteners: [{{name: web, bind: \"127.0.0.1:0\", service: web}}]\nservices: {{web: {{endpoints: [\"{}\"]}}}}\n",
            upstream.addr
        ),
        &[],
        &[],
    );
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../crates/admin/openapi.yaml"
    );
    let url = format!("http://{}", ferry.addr("admin"));
    let run = tokio::task::spawn_blocking(move || {
        Command::new("schemathesis")
            .current_dir(std::env::temp_dir())
            .args(["run", schema, "--url", &url])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
            // Shutdown would end the process under test; it has its own tests.
            .args(["--exclude-path", "/shutdown", "--phases", "coverage,fuzzing", "--max-time", "30"])
            .env("NO_COLOR", "1")
            .output()
    })
    .await
    .unwrap()
    .expect("schemathesis is installed (pip install schemathesis; tests/run.sh does)");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "schemathesis found problems:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // ferry is still alive and serving after the fuzzing.
    let (status, _) = ferry.admin("GET", "/live", "").await;
    assert_eq!(status, 200);
    let (status, _) = support::raw(ferry.addr("web"), "GET", "/", "").await;
    assert_eq!(status, 200);
}
