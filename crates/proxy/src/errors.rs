//! Failures of the proxy itself, and the one place they become responses.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// Header on every response ferry made itself, so a user can tell them from upstream ones.
pub const FERRY_ERROR: &str = "x-ferry-error";

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the request timed out")]
    Timeout,
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    #[error("the upstream refused or failed the connection")]
    ConnectFailed,
    #[error("the service has no endpoints")]
    NoEndpoints,
    #[error("the upstream closed or reset the connection")]
    UpstreamReset,
    #[error("no service is configured for this destination")]
    UnknownService,
    #[error("the request was malformed")]
    BadRequest,
    #[error("CONNECT tunnels are not allowed here (policy http-connect: tunnel allows them)")]
    ConnectNotAllowed,
}

impl ProxyError {
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::Timeout => "timeout",
            ProxyError::ConnectTimeout => "connect-timeout",
            ProxyError::ConnectFailed => "connect-failed",
            ProxyError::NoEndpoints => "no-endpoints",
            ProxyError::UpstreamReset => "upstream-reset",
            ProxyError::UnknownService => "unknown-service",
            ProxyError::BadRequest => "bad-request",
            ProxyError::ConnectNotAllowed => "connect-not-allowed",
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// DEADLINE_EXCEEDED for timeouts, INTERNAL for a malformed request, UNAVAILABLE
    /// otherwise.
    pub fn grpc_status(self) -> u8 {
        match self {
            ProxyError::Timeout => 4,
            ProxyError::BadRequest => 13,
            _ => 14,
        }
    }

    /// The response a client gets: HTTP status and a short body, or for gRPC a
    /// trailers-only response with `grpc-status`.
    pub fn to_response(self, grpc: bool) -> Response<ProxyBody> {
        let reason = HeaderValue::from_static(self.reason());
        if grpc {
            let mut r = Response::new(ProxyBody::empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(self.grpc_status() as u16));
            h.insert(
                "grpc-message",
                HeaderValue::from_str(&format!("ferry: {self}").replace(' ', "%20"))
                    .expect("ascii"),
            );
            h.insert(FERRY_ERROR, reason);
            return r;
        }
        let mut r = Response::new(ProxyBody::full(Bytes::from(format!("ferry: {self}\n"))));
        *r.status_mut() = self.http_status();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(FERRY_ERROR, reason);
        r
    }

    /// Classifies an upstream client error.
    pub fn from_client(e: &hyper_util::client::legacy::Error) -> ProxyError {
        if e.is_connect() {
            let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
            while let Some(s) = src {
                if let Some(io) = s.downcast_ref::<std::io::Error>()
                    && io.kind() == std::io::ErrorKind::TimedOut
                {
                    return ProxyError::ConnectTimeout;
                }
                src = s.source();
            }
            return ProxyError::ConnectFailed;
        }
        // The client's own body failed (a malformed chunk, a reset): its fault, not the
        // upstream's, so it is not counted against the upstream.
        let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(s) = src {
            if s.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_user)
            {
                return ProxyError::BadRequest;
            }
            src = s.source();
        }
        ProxyError::UpstreamReset
    }
}
