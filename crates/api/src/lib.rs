//! The bhatti daemon's API: configuration, authentication, quotas, rate
//! limits, encrypted secrets and the HTTP/WebSocket handlers over the
//! sandbox service. Handlers stay thin: they parse, check, call the
//! service, and render.

pub mod acme;
pub mod auth;
pub mod config;
pub mod e2b;
pub mod error;
pub mod extract;
pub mod keys;
pub mod network;
pub mod observe;
pub mod openapi;
pub mod proxy;
pub mod publish;
pub mod ratelimit;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod service;
pub mod share;
pub mod state;
pub mod tls;
pub mod users;
pub mod validate;

pub use config::DaemonConfig;
pub use server::{Daemon, ServeError};
