//! Who a client is: the identity a request's credentials establish.
//! [`token`]: Distribution-compatible Bearer tokens (`auth.token`).
pub mod token;
