//! Subscriptions: one watch channel per (destination, caller node), shared by every
//! sidecar that asks for it, recomputed only when an update touches its Service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_discovery_api as api;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::index::{Dest, Index, SvcKey, Touched};

struct Sub {
    tx: watch::Sender<Arc<api::Resolution>>,
    /// The Service the destination meant when last computed.
    last: Option<SvcKey>,
}

#[derive(Clone, Debug, Default)]
pub struct HubMetrics {
    pub subscriptions: Gauge,
    pub updates: Counter,
    pub events: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub errors: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub objects: Family<Vec<(&'static str, &'static str)>, Gauge>,
}

impl HubMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ferry_controller_subscriptions",
            "Destinations sidecars are subscribed to (per caller node)",
            self.subscriptions.clone(),
        );
        r.register(
            "ferry_controller_updates",
            "Endpoint sets recomputed and sent because they changed",
            self.updates.clone(),
        );
        r.register(
            "ferry_controller_watch_events",
            "Watch events received, by kind",
            self.events.clone(),
        );
        r.register(
            "ferry_controller_watch_errors",
            "Watch errors (the watcher retries with backoff), by kind",
            self.errors.clone(),
        );
        r.register(
            "ferry_controller_objects",
            "Objects in the controller's index, by kind",
            self.objects.clone(),
        );
    }
}

pub struct Hub {
    index: Mutex<Index>,
    subs: Mutex<HashMap<(Dest, String), Sub>>,
    synced: watch::Sender<bool>,
    pub metrics: HubMetrics,
    pub cluster_domain: String,
}

impl Hub {
    pub fn new(cluster_domain: String) -> Arc<Hub> {
        Arc::new(Hub {
            index: Mutex::default(),
            subs: Mutex::default(),
            synced: watch::channel(false).0,
            metrics: HubMetrics::default(),
            cluster_domain,
        })
    }

    /// Changes the index and sends every answer the change alters.
    pub fn update(&self, f: impl FnOnce(&mut Index, &mut Touched)) {
        let mut t = Touched::default();
        let ix = &mut *self.index.lock().expect("index poisoned");
        f(ix, &mut t);
        let (svcs, slices, nodes) = ix.counts();
        for (kind, n) in [
            ("service", svcs),
            ("endpointslice", slices),
            ("node", nodes),
        ] {
            self.metrics
                .objects
                .get_or_create(&vec![("kind", kind)])
                .set(n as i64);
        }
        if t.all || !t.services.is_empty() {
            self.recompute(ix, &t);
        }
    }

    fn recompute(&self, ix: &Index, t: &Touched) {
        let mut subs = self.subs.lock().expect("subscriptions poisoned");
        self.forget_unheard(&mut subs);
        for ((dest, node), sub) in subs.iter_mut() {
            let now = ix.service_of(dest);
            let stale = t.all
                || now != sub.last
                || sub.last.as_ref().is_some_and(|k| t.services.contains(k));
            if !stale {
                continue;
            }
            sub.last = now;
            let r = ix.resolve(dest, node);
            let sent = sub.tx.send_if_modified(|cur| {
                let changed = **cur != r;
                if changed {
                    *cur = Arc::new(r);
                }
                changed
            });
            if sent {
                self.metrics.updates.inc();
            }
        }
    }

    /// A live view of `dest` for a caller on `node`.
    pub fn subscribe(&self, dest: Dest, node: String) -> watch::Receiver<Arc<api::Resolution>> {
        let ix = self.index.lock().expect("index poisoned");
        let mut subs = self.subs.lock().expect("subscriptions poisoned");
        let rx = match subs.get(&(dest.clone(), node.clone())) {
            Some(s) => s.tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(Arc::new(ix.resolve(&dest, &node)));
                let last = ix.service_of(&dest);
                subs.insert((dest, node), Sub { tx, last });
                rx
            }
        };
        self.metrics.subscriptions.set(subs.len() as i64);
        rx
    }

    /// Forgets subscriptions nobody listens to any more.
    pub fn sweep(&self) {
        self.forget_unheard(&mut self.subs.lock().expect("subscriptions poisoned"));
    }

    fn forget_unheard(&self, subs: &mut HashMap<(Dest, String), Sub>) {
        subs.retain(|_, s| s.tx.receiver_count() > 0);
        self.metrics.subscriptions.set(subs.len() as i64);
    }

    pub fn set_synced(&self) {
        self.synced.send_replace(true);
    }

    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }
}
