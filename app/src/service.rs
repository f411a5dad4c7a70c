//! Telling a service manager (systemd, `Type=notify`) what the process is
//! doing: ready, reloading, stopping, and alive (the watchdog). Every call
//! is a no-op when `NOTIFY_SOCKET` is not set, so `gridproxy run` behaves the
//! same from a shell. The protocol (`sd_notify(3)`) is spoken by the
//! `sd-notify` crate.

use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    // A lost notification must never stop the proxy; systemd times out and
    // says so in its own log.
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("service manager notification failed: {e}");
    }
}

/// Start-up (or a reload) finished; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins. systemd 253 and newer need the monotonic time with it.
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
    ]);
}

/// Shutdown (the drain) begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Ping the watchdog at half the interval systemd asked for (`WatchdogSec=`),
/// from the runtime itself: a wedged runtime stops pinging and systemd
/// restarts the service. Nothing is spawned without a watchdog.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(every) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (every / 2).max(Duration::from_millis(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
