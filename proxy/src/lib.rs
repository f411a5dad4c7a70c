//! gridproxy: the daemon. Listeners, upstream sessions, routing, control.
