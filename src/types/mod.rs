pub mod encrypted;
pub mod role_ref;
