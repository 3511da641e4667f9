//! Tells the process when idle connections have given memory back, so that it can
//! return it to the system (the allocator is the binary's business, not this crate's).

use tokio::sync::Notify;

static RELEASED: Notify = Notify::const_new();

/// An idle connection dropped its buffers.
pub fn released() {
    RELEASED.notify_one();
}

/// Resolves after [`released`] has been called (at least once since the last wait).
pub async fn wait_released() {
    RELEASED.notified().await;
}
