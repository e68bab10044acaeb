//! Publishing: sandbox ports reachable without an API key under an alias,
//! through a public reverse proxy on its own socket. `alias`, `route`,
//! `client` (who a request is from) and `origin` (what a response may
//! claim in the browser) are the pure rules, `gate` the admission caps,
//! `listener` the connections (timeouts, caps), `public` the handler.

pub mod alias;
pub mod client;
pub mod config;
pub mod gate;
pub mod listener;
pub mod origin;
pub mod public;
pub mod redirect;
pub mod route;

pub use config::PublishConfig;
