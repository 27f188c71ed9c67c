//! The decodebench.v1 gRPC protocol: the generated wire types and client/server stubs, and the one
//! module ([`convert`]) that turns them into the plain domain types of `decodebench-kernels` and
//! back. Everything past the network edge works on the domain types.

pub mod convert;

/// Generated from `proto/decodebench/v1/decodebench.proto`.
#[allow(clippy::all, missing_docs)]
pub mod wire {
    tonic::include_proto!("decodebench.v1");
}

/// Version of the wire protocol. Agents and coordinators refuse to talk across versions; bump it on
/// any incompatible change to the `.proto`.
pub const PROTOCOL_VERSION: u32 = 1;

/// decodebench's own version, reported by agents at registration and recorded with results.
pub const DECODEBENCH_VERSION: &str = env!("CARGO_PKG_VERSION");

pub use convert::ConvertError;

/// `head` followed by the messages of `source` and its causes, `head: cause: root`, leaving out a
/// cause whose text the line already holds (many errors put their source's message in their own).
/// tonic's errors say only "transport error" at the top; the reason (a TLS alert, a DNS failure)
/// is in the chain. Used wherever an error is shown to the user.
pub fn error_chain(head: String, source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = head;
    let mut source = source;
    while let Some(e) = source {
        let part = e.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}
