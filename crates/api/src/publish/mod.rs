//! Publishing: sandbox ports reachable without an API key under an alias,
//! through a public reverse proxy on its own socket. `alias` and `route`
//! are the pure rules, `gate` the admission caps, `public` the server.

pub mod alias;
pub mod config;
pub mod gate;
pub mod public;
pub mod route;

pub use config::PublishConfig;
