//! The sidecar contract: what the injector, `ferry init` and the sidecar must agree on,
//! defined once.

/// The admin API (probed by the kubelet); `admin:` in `ferry.dev/policy` may move it.
pub const ADMIN_PORT: u16 = 15000;
/// Where `ferry init` redirects the app's outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// Where `ferry init` redirects connections to the app.
pub const INBOUND_PORT: u16 = 15006;
/// The sidecar's user: its own connections are never redirected.
pub const PROXY_UID: u32 = 1337;
/// The folder the injector mounts the downward API into, and the annotations file in it.
pub const PODINFO_DIR: &str = "/etc/ferry";
pub const ANNOTATIONS_FILE: &str = "/etc/ferry/annotations";
/// Container names in an injected pod.
pub const PROXY_CONTAINER: &str = "ferry-proxy";
pub const INIT_CONTAINER: &str = "ferry-init";
