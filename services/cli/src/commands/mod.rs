pub mod model;
pub mod train;
