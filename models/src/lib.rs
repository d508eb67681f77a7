//! Everything that touches local data or Burn: dataset schemas and readers,
//! the Burn networks built from a [`tessera_protocol::model::Layout`], and the
//! local training and evaluation loops. Linked by the participant only; the
//! coordinator never trains (DESIGN.md invariant 4).

#[cfg(feature = "sql")]
pub mod cohort;
pub mod columnar;
pub mod data;
mod linear;
pub mod metrics;
pub mod net;
pub mod postgres;
pub mod schema;
pub mod stream;
pub mod train;

pub use burn::prelude::Device;

/// The CPU device used by default: Burn's pure-Rust Flex backend with autodiff.
pub fn default_device() -> burn::prelude::Device {
    burn::prelude::Device::flex().autodiff()
}
