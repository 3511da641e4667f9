//! Policy layers, versions and history: the one place that decides what policy runs.
//!
//! Layers, lowest first: built-in defaults, the file layer (policy file and pod
//! annotations), admin overrides. Every change merges the layers, validates the result
//! whole, and only then swaps it in; a refused candidate leaves everything as it was.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ferry_policy::{Errors, Overrides, Policy};
use ferry_proxy::Shared;
use serde_json::{Map, Value as Json, json};

/// How many accepted versions `GET /policy` shows and rollback can reach.
const HISTORY: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Startup,
    File,
    Admin,
    Rollback,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Startup => "startup",
            Source::File => "file",
            Source::Admin => "admin",
            Source::Rollback => "rollback",
        }
    }
}

#[derive(Clone)]
struct Accepted {
    version: u64,
    at: SystemTime,
    source: Source,
    file: Policy,
    admin: Policy,
}

struct Inner {
    file: Policy,
    admin: Policy,
    /// Accepted versions, newest last, for people to read.
    history: VecDeque<Accepted>,
    /// The layers of each version rollback can return to; the current one on top.
    undo: Vec<(Policy, Policy)>,
    /// The last refused file reload, shown until a good one replaces it.
    file_error: Option<(SystemTime, Errors)>,
}

/// Owns the layers and swaps the merged policy into the proxy.
pub struct Control {
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
    /// Where the file layer comes from, for people reading `GET /policy`.
    file_origin: String,
}

impl Control {
    /// Starts from `file` as the proxy's current policy (version 1).
    pub fn new(shared: Arc<Shared>, file: Policy, file_origin: impl Into<String>) -> Arc<Control> {
        let version = shared.load().version;
        let first = Accepted {
            version,
            at: SystemTime::now(),
            source: Source::Startup,
            file: file.clone(),
            admin: Policy::default(),
        };
        Arc::new(Control {
            shared,
            inner: Mutex::new(Inner {
                file,
                admin: Policy::default(),
                undo: vec![(first.file.clone(), first.admin.clone())],
                history: VecDeque::from([first]),
                file_error: None,
            }),
            file_origin: file_origin.into(),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn version(&self) -> u64 {
        self.shared.load().version
    }

    /// A new file layer (the file or annotations changed). On refusal the error is
    /// kept for `GET /policy` and the running policy stays.
    pub fn set_file(&self, file: Result<Policy, Errors>) -> Result<u64, Errors> {
        let mut inner = self.lock();
        let result = file.and_then(|file| {
            if file == inner.file {
                return Ok(self.version());
            }
            let admin = inner.admin.clone();
            self.commit(&mut inner, Source::File, file, admin)
        });
        match &result {
            Ok(_) => inner.file_error = None,
            Err(e) => {
                tracing::warn!(errors = %e, "refused a policy reload; the running policy stays");
                inner.file_error = Some((SystemTime::now(), e.clone()));
            }
        }
        result
    }

    /// Replaces the admin layer.
    pub fn set_admin(&self, admin: Policy) -> Result<u64, Errors> {
        let mut inner = self.lock();
        let file = inner.file.clone();
        self.commit(&mut inner, Source::Admin, file, admin)
    }

    /// What `set_admin(admin)` would run, without running it.
    pub fn check_admin(&self, admin: &Policy) -> Result<Policy, Errors> {
        let inner = self.lock();
        let merged = inner.file.overlay(admin);
        merged.validate_complete()?;
        Ok(merged)
    }

    /// Goes back to the layers of the version before the current one.
    pub fn rollback(&self) -> Result<u64, String> {
        let mut inner = self.lock();
        if inner.undo.len() < 2 {
            return Err("there is no earlier version to roll back to".into());
        }
        let (file, admin) = inner.undo[inner.undo.len() - 2].clone();
        let version = self
            .commit(&mut inner, Source::Rollback, file, admin)
            .map_err(|e| format!("the previous version no longer validates: {e}"))?;
        // `commit` pushed the restored layers; drop them and the version undone.
        let keep = inner.undo.len() - 2;
        inner.undo.truncate(keep);
        Ok(version)
    }

    fn commit(
        &self,
        inner: &mut Inner,
        source: Source,
        file: Policy,
        admin: Policy,
    ) -> Result<u64, Errors> {
        let merged = file.overlay(&admin);
        let version = self.shared.apply(merged)?;
        tracing::info!(version, source = source.as_str(), "policy applied");
        inner.file = file.clone();
        inner.admin = admin.clone();
        inner.undo.push((file.clone(), admin.clone()));
        if inner.undo.len() > HISTORY {
            inner.undo.remove(0);
        }
        inner.history.push_back(Accepted {
            version,
            at: SystemTime::now(),
            source,
            file,
            admin,
        });
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        Ok(version)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("control lock poisoned")
    }

    /// `GET /policy`: the merged policy, its version, where each setting came from,
    /// both layers, recent history and the last refused reload.
    pub fn describe(&self) -> Json {
        let inner = self.lock();
        let rt = self.shared.load();
        let history: Vec<Json> = inner
            .history
            .iter()
            .rev()
            .map(|h| {
                json!({
                    "version": h.version,
                    "at": humantime::format_rfc3339_seconds(h.at).to_string(),
                    "source": h.source.as_str(),
                })
            })
            .collect();
        let last_error = inner.file_error.as_ref().map(|(at, e)| {
            json!({
                "at": humantime::format_rfc3339_seconds(*at).to_string(),
                "origin": self.file_origin,
                "errors": errors_json(e),
            })
        });
        json!({
            "version": rt.version,
            "policy": rt.policy.to_json(),
            "sources": sources(&inner.file, &inner.admin, &rt.policy),
            "layers": {
                "file": { "origin": self.file_origin, "policy": inner.file.to_json() },
                "admin": inner.admin.to_json(),
            },
            "history": history,
            "last_error": last_error,
        })
    }
}

pub fn errors_json(e: &Errors) -> Json {
    Json::Array(
        e.iter()
            .map(|f| json!({"field": f.field, "value": f.value, "message": f.message, "error": f.to_string()}))
            .collect(),
    )
}

/// For every effective setting, the layer it came from: `admin`, `file` or `default`.
fn sources(file: &Policy, admin: &Policy, merged: &Policy) -> Json {
    let layer = |get: &dyn Fn(&Policy) -> Option<Overrides>, key: &str| -> Option<&'static str> {
        let has = |p: &Policy| get(p).is_some_and(|o| o.entries().iter().any(|(k, _)| *k == key));
        if has(admin) {
            Some("admin")
        } else if has(file) {
            Some("file")
        } else {
            None
        }
    };
    let mut out = Map::new();
    for key in Overrides::KEYS {
        let d = layer(&|p| Some(p.defaults.clone()), key).unwrap_or("default");
        out.insert(format!("defaults.{key}"), json!(d));
        for name in merged.services.keys() {
            let s = layer(&|p| p.services.get(name).map(|s| s.overrides.clone()), key)
                .unwrap_or(if d == "default" { "default" } else { d });
            out.insert(format!("services.{name}.{key}"), json!(s));
        }
    }
    for name in merged.services.keys() {
        let eps = |p: &Policy| p.services.get(name).is_some_and(|s| s.endpoints.is_some());
        let src = if eps(admin) {
            "admin"
        } else if eps(file) {
            "file"
        } else {
            "default"
        };
        out.insert(format!("services.{name}.endpoints"), json!(src));
    }
    Json::Object(out)
}
