//! The CSI node plugin (`tidepool csi`): Identity and Node services over a Unix socket.
//!
//! Thin by design: it validates, mounts and hands connections to the node agent; all
//! file-system logic lives in the agent. [`node`] is the logic (kernel- and gRPC-free,
//! over a [`mounter::Mounter`] and an agent link), [`mounter`] the mount operations.

pub mod grpc;
pub mod mounter;
pub mod node;
