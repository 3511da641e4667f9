//! Failures of the proxy itself, and the one place they become responses and gRPC
//! trailers. The lowest module of the crate: it imports none of the others.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    #[error("the upstream sent no response headers within response-timeout")]
    ResponseTimeout,
    #[error("the upstream sent no response headers within per-try-timeout")]
    PerTryTimeout,
    #[error("no frame either way within stream-idle-timeout")]
    StreamIdle,
    #[error("the service has too many requests in flight")]
    Overloaded,
    #[error("the upstream refused the stream unprocessed (REFUSED_STREAM or GOAWAY)")]
    Unprocessed,
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
            ProxyError::ResponseTimeout => "response-timeout",
            ProxyError::PerTryTimeout => "per-try-timeout",
            ProxyError::StreamIdle => "stream-idle-timeout",
            ProxyError::Overloaded => "overloaded",
            ProxyError::Unprocessed => "refused-stream",
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            ProxyError::Timeout
            | ProxyError::ResponseTimeout
            | ProxyError::PerTryTimeout
            | ProxyError::StreamIdle => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// DEADLINE_EXCEEDED for timeouts, RESOURCE_EXHAUSTED for overload, INTERNAL for a
    /// malformed request, UNAVAILABLE otherwise.
    pub fn grpc_status(self) -> u8 {
        match self {
            ProxyError::Timeout
            | ProxyError::ResponseTimeout
            | ProxyError::PerTryTimeout
            | ProxyError::StreamIdle => 4,
            ProxyError::Overloaded => 8,
            ProxyError::BadRequest => 13,
            _ => 14,
        }
    }

    /// How a gRPC call ferry ends itself ends: `grpc-status`, `grpc-message` and the
    /// reason, as trailers (or as the headers of a trailers-only response).
    pub fn grpc_trailers(self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(4);
        h.insert(GRPC_STATUS, HeaderValue::from(self.grpc_status() as u16));
        h.insert(
            GRPC_MESSAGE,
            HeaderValue::from_str(&format!("ferry: {self}").replace(' ', "%20")).expect("ascii"),
        );
        h.insert(FERRY_ERROR, HeaderValue::from_static(self.reason()));
        h
    }

    /// The response a client gets: HTTP status and a short body, or for gRPC a
    /// trailers-only response with `grpc-status`.
    pub fn to_response<B: From<Bytes> + Default>(self, grpc: bool) -> Response<B> {
        if grpc {
            let mut r = Response::new(B::default());
            *r.headers_mut() = self.grpc_trailers();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            return r;
        }
        let reason = HeaderValue::from_static(self.reason());
        let mut r = Response::new(B::from(Bytes::from(format!("ferry: {self}\n"))));
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
        // upstream's, so it is not counted against the upstream. An HTTP/2 upstream that
        // refused the stream, or went away before it, did nothing with the request.
        let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
        while let Some(s) = src {
            if let Some(h2) = s.downcast_ref::<h2::Error>()
                && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (h2.is_go_away() && h2.is_remote()))
            {
                return ProxyError::Unprocessed;
            }
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
