//! Warming before anyone asks.
//!
//! - [`image`]: warming one image through a cache (also `kura warm`).
//! - [`budget`]: the hourly manifest-GET budget of scheduled sync.
pub mod budget;
pub mod image;
