//! The stop signal of a route's tasks ([`Shutdown`]) and its sending side.

use std::time::Duration;

use tokio::sync::watch;

/// A stop signal shared by a route's tasks.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    /// Signals every [`Shutdown`] made from this trigger.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// A new signal and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Whether the signal fired.
    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until the signal fires.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger was dropped: treat that as a stop too.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Sleeps for `d`; returns false if the signal fired first.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.wait() => false,
        }
    }
}
