//! A plain HTTP/1.1 server on 127.0.0.1 for tests and benches: the dependency a handler calls
//! (a customer service), or a collector lockgate exports to (an OTLP receiver). Real sockets and
//! hyper, no mock: what the handler's request goes through is what production goes through.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;

/// What a handler of [`serve`] answers.
pub type Response = hyper::Response<Full<Bytes>>;

/// A runtime with one worker for a server: made and dropped outside any test runtime, so
/// dropping it stops the server.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime")
}

/// Serves on a free port of 127.0.0.1, on `rt`, until `rt` is dropped; its address.
/// `make` gets that address (for answers that name it) and returns the request handler, which
/// each connection's task calls for each request.
pub fn serve<F, Fut>(rt: &tokio::runtime::Runtime, make: impl FnOnce(SocketAddr) -> F) -> SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let handle = make(addr);
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// A response with `status` and `body`.
pub fn respond(status: u16, body: impl Into<Bytes>) -> Response {
    hyper::Response::builder()
        .status(status)
        .body(Full::new(body.into()))
        .expect("response")
}
