pub mod admin;
pub mod client;
pub mod doctor;
pub mod eval;
pub mod evaluations;
pub mod model;
pub mod service;
pub mod train;
