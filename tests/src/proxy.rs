//! A TCP proxy a test can cut and restore, to give a real server (Redis, PostgreSQL) an outage
//! as the runtime sees it: open connections are shut down and new ones are refused until it is
//! restored on the same port.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A proxy from a local port to `target`.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding a fresh port on 127.0.0.1 to `target` (`host:port`).
    pub fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut p = Self {
            addr: listener.local_addr().unwrap(),
            target: target.parse().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
            acceptor: None,
        };
        p.acceptor = Some(p.accept(listener));
        p
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn accept(&self, listener: TcpListener) -> JoinHandle<()> {
        let (up, conns, target) = (self.up.clone(), self.conns.clone(), self.target);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if !up.load(Ordering::SeqCst) {
                    return; // dropping the listener closes the port
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = conns.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        })
    }

    /// The outage: every open connection is shut down and the port is closed.
    pub fn cut(&mut self) {
        self.up.store(false, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            a.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        assert_eq!(
            TcpStream::connect(self.addr).map_err(|e| e.kind()).err(),
            Some(ErrorKind::ConnectionRefused),
            "the port still accepts"
        );
    }

    /// The end of the outage: the same port accepts and forwards again.
    pub fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).unwrap();
        self.up.store(true, Ordering::SeqCst);
        self.acceptor = Some(self.accept(listener));
    }
}
