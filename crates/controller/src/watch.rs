//! One watch per resource kind for the whole controller (Services, EndpointSlices, Node
//! metadata), fed into the [`Hub`]. kube-runtime's watcher relists on 410 Gone, uses
//! bookmarks, and backs off on errors; a relist replaces that kind's objects whole.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::hub::Hub;
use crate::index::{Index, Touched};

type Apply<K> = fn(&mut Index, &K, &mut Touched);
type Reset<K> = fn(&mut Index, &[K], &mut Touched);

struct Handlers<K> {
    kind: &'static str,
    apply: Apply<K>,
    delete: Apply<K>,
    reset: Reset<K>,
}

/// Runs the three watches until the process ends; the hub is marked synced once each
/// has listed once.
pub async fn run(client: Client, hub: Arc<Hub>) {
    let synced = Arc::new(AtomicU8::new(0));
    let cfg = watcher::Config::default();
    let services = watcher::watcher(Api::<Service>::all(client.clone()), cfg.clone());
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone());
    // Node objects are large and change often; only their labels matter here.
    let nodes = watcher::watcher(Api::<PartialObjectMeta<Node>>::all(client), cfg);
    tokio::join!(
        consume(
            services,
            Handlers {
                kind: "service",
                apply: Index::apply_service,
                delete: Index::delete_service,
                reset: Index::reset_services,
            },
            hub.clone(),
            synced.clone(),
        ),
        consume(
            slices,
            Handlers {
                kind: "endpointslice",
                apply: Index::apply_slice,
                delete: Index::delete_slice,
                reset: Index::reset_slices,
            },
            hub.clone(),
            synced.clone(),
        ),
        consume(
            nodes,
            Handlers::<PartialObjectMeta<Node>> {
                kind: "node",
                apply: |ix, n, t| ix.apply_node(&n.metadata, t),
                delete: |ix, n, t| ix.delete_node(&n.metadata, t),
                reset: |ix, ns, t| ix.reset_nodes(ns.iter().map(|n| &n.metadata), t),
            },
            hub,
            synced,
        ),
    );
}

async fn consume<K: Send>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send,
    h: Handlers<K>,
    hub: Arc<Hub>,
    synced: Arc<AtomicU8>,
) {
    let mut stream = std::pin::pin!(stream.default_backoff());
    let mut relist: Option<Vec<K>> = None;
    let mut listed = false;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(error) => {
                hub.metrics
                    .errors
                    .get_or_create(&vec![("kind", h.kind)])
                    .inc();
                tracing::warn!(kind = h.kind, %error, "watch failed; retrying with backoff");
                continue;
            }
        };
        hub.metrics
            .events
            .get_or_create(&vec![("kind", h.kind)])
            .inc();
        match ev {
            Event::Init => relist = Some(Vec::new()),
            Event::InitApply(o) => relist.get_or_insert_default().push(o),
            Event::InitDone => {
                let objs = relist.take().unwrap_or_default();
                tracing::info!(kind = h.kind, count = objs.len(), "listed");
                hub.update(|ix, t| (h.reset)(ix, &objs, t));
                if !listed {
                    listed = true;
                    if synced.fetch_add(1, Ordering::AcqRel) + 1 == 3 {
                        tracing::info!("every watch has listed; serving");
                        hub.set_synced();
                    }
                }
            }
            Event::Apply(o) => hub.update(|ix, t| (h.apply)(ix, &o, t)),
            Event::Delete(o) => hub.update(|ix, t| (h.delete)(ix, &o, t)),
        }
    }
}
