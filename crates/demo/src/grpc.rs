//! The `ferry.demo.Echo` gRPC service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::proto::echo_client::EchoClient;
use crate::proto::echo_server::{Echo, EchoServer};
use crate::proto::{EchoReply, EchoRequest};

/// Answers as `name`, so a client sees which endpoint served it.
#[derive(Clone)]
pub struct EchoService {
    name: String,
}

impl EchoService {
    pub fn new(name: impl Into<String>) -> Self {
        EchoService { name: name.into() }
    }

    fn reply(&self, message: String) -> EchoReply {
        EchoReply {
            message,
            server: self.name.clone(),
        }
    }
}

/// Waits as asked, then fails as asked.
async fn act(req: &EchoRequest) -> Result<(), Status> {
    if req.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
    }
    if req.fail_code != 0 {
        return Err(Status::new(
            Code::from_i32(req.fail_code),
            format!("failed as asked: {}", req.message),
        ));
    }
    Ok(())
}

fn with_timeout_echo<T>(meta: &tonic::metadata::MetadataMap, body: T) -> Response<T> {
    let mut resp = Response::new(body);
    if let Some(t) = meta.get("grpc-timeout") {
        resp.metadata_mut()
            .insert("x-received-grpc-timeout", t.clone());
    }
    resp
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let meta = req.metadata().clone();
        let req = req.into_inner();
        act(&req).await?;
        Ok(with_timeout_echo(&meta, self.reply(req.message)))
    }

    type ExpandStream = ReplyStream;

    async fn expand(&self, req: Request<EchoRequest>) -> Result<Response<ReplyStream>, Status> {
        let meta = req.metadata().clone();
        let req = req.into_inner();
        act(&req).await?;
        let this = self.clone();
        let replies = (0..req.count).map(move |i| Ok(this.reply(format!("{} {i}", req.message))));
        Ok(with_timeout_echo(
            &meta,
            Box::pin(futures::stream::iter(replies)) as ReplyStream,
        ))
    }

    async fn collect(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let meta = req.metadata().clone();
        let mut stream = req.into_inner();
        let mut parts = Vec::new();
        while let Some(r) = stream.next().await {
            let r = r?;
            act(&r).await?;
            parts.push(r.message);
        }
        Ok(with_timeout_echo(&meta, self.reply(parts.join(" "))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let meta = req.metadata().clone();
        let this = self.clone();
        let replies = req.into_inner().then(move |r| {
            let this = this.clone();
            async move {
                let r = r?;
                act(&r).await?;
                Ok(this.reply(r.message))
            }
        });
        Ok(with_timeout_echo(&meta, Box::pin(replies) as ReplyStream))
    }
}

/// Serves the Echo service (h2c) on `listener` until the process ends.
pub async fn serve_grpc(name: String, listener: TcpListener) -> anyhow::Result<()> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService::new(name)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// One unary Say; the reply as `message (from server)`.
pub async fn grpc_say(addr: SocketAddr, message: &str) -> anyhow::Result<String> {
    let mut client = EchoClient::connect(format!("http://{addr}")).await?;
    let reply = client
        .say(EchoRequest {
            message: message.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(format!("{} (from {})", reply.message, reply.server))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener is bound before this returns, so clients may connect at once.
    async fn start(name: &str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_grpc(name.into(), l));
        addr
    }

    fn req(message: &str) -> EchoRequest {
        EchoRequest {
            message: message.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn says_and_streams() {
        let addr = start("g").await;
        assert_eq!(grpc_say(addr, "hi").await.unwrap(), "hi (from g)");
        let mut c = EchoClient::connect(format!("http://{addr}")).await.unwrap();
        let replies: Vec<_> = c
            .expand(EchoRequest {
                message: "x".into(),
                count: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .map(|r| r.unwrap().message)
            .collect()
            .await;
        assert_eq!(replies, ["x 0", "x 1", "x 2"]);
        let err = c
            .say(EchoRequest {
                message: "no".into(),
                fail_code: 7,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::PermissionDenied, "failed as asked: no")
        );
    }

    #[tokio::test]
    async fn collects_chats_and_echoes_the_deadline() {
        let addr = start("h").await;
        let mut c = EchoClient::connect(format!("http://{addr}")).await.unwrap();
        let joined = c
            .collect(futures::stream::iter(["a", "b", "c"].map(req)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (joined.message.as_str(), joined.server.as_str()),
            ("a b c", "h")
        );

        let chat: Vec<_> = c
            .chat(futures::stream::iter(["x", "y"].map(req)))
            .await
            .unwrap()
            .into_inner()
            .map(|r| r.unwrap().message)
            .collect()
            .await;
        assert_eq!(chat, ["x", "y"]);

        let mut r = Request::new(req("t"));
        r.set_timeout(Duration::from_secs(3));
        let resp = c.say(r).await.unwrap();
        let seen = resp.metadata().get("x-received-grpc-timeout").unwrap();
        assert!(!seen.is_empty());
        let resp = c.say(req("no deadline")).await.unwrap();
        assert!(resp.metadata().get("x-received-grpc-timeout").is_none());
    }
}
