//! syncbridge keeps two data stores in step, both ways, within milliseconds.
//!
//! Layout: [`record`] is the one change record every connector speaks; [`stores`] holds one
//! connector per kind of store behind one trait; [`engine`] decides and applies (pipeline,
//! echo filter, conflict policy, sweep, schedule); [`config`], [`cli`] and the HTTP [`api`]
//! are the surfaces.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod record;
pub mod stores;
