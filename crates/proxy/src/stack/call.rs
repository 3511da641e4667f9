//! What travels through the stack: a [`Call`] down, an [`Answer`] or a [`Failed`] up,
//! each with the call's [`Ctx`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use ferry_policy::Settings;
use ferry_telemetry::ActiveSpan;

use crate::balance::{Endpoint, EndpointSet, InFlight};
use crate::body::ReqBody;
use crate::errors::ProxyError;
use crate::limit::Permit;
use crate::metrics::RouteMetrics;
use crate::state::{ServiceRt, Shared};

/// A request on its way down, with what the layers know of it.
pub struct Call<B = ReqBody> {
    pub req: Request<B>,
    /// Boxed: the context moves through every layer and back, a pointer rather than a
    /// few hundred bytes each time.
    pub ctx: Box<Ctx>,
}

/// What the layers know of a call: set going down, handed back coming up.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub svc: Arc<ServiceRt>,
    /// The matched route (0: none), for [`ServiceRt::route_settings`].
    pub route: usize,
    pub calls: Arc<RouteMetrics>,
    pub peer: SocketAddr,
    /// An inbound call (server span) rather than an outbound one (client span).
    pub inbound: bool,
    pub grpc: bool,
    pub start: Instant,
    /// The whole call's deadline.
    pub deadline: Option<Instant>,
    /// When the response headers must have come, and the error if they have not.
    pub headers_by: Option<(Instant, ProxyError)>,
    /// Last frame of the request body, with `stream-idle-timeout`.
    pub activity: Option<Arc<AtomicU64>>,
    /// The client side of an HTTP/1.1 upgrade, when it asked for one.
    pub upgrade: Option<tokio::sync::oneshot::Receiver<crate::http::ClientIo>>,
    pub span: ActiveSpan,
    pub permit: Option<Permit>,
    /// The endpoints the call is balanced over (one snapshot for all attempts).
    pub set: Option<Arc<EndpointSet>>,
    /// The attempt's endpoint, chosen by the balance layer.
    pub ep: Option<Arc<Endpoint>>,
    /// An endpoint the next attempt should not go back to.
    pub avoid: Option<Arc<Endpoint>>,
}

impl Ctx {
    pub fn settings(&self) -> &Settings {
        self.svc.route_settings(self.route)
    }
}

/// An attempt the upstream answered.
pub struct Answer {
    pub resp: Response<Incoming>,
    pub ctx: Box<Ctx>,
    pub ep: Arc<Endpoint>,
    pub in_flight: InFlight,
}

/// An attempt that got no answer, or a call refused before it had one.
pub struct Failed {
    pub error: ProxyError,
    pub ctx: Box<Ctx>,
}

pub type Attempt = Result<Answer, Failed>;

/// A future already resolved: a layer that answers without calling the one below.
pub type Ready = std::future::Ready<Attempt>;

/// A layer's future: its own answer, or the inner service's.
pub type Either<F> = futures::future::Either<Ready, F>;
