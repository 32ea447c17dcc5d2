//! The CSI Identity and Node services over gRPC (tonic), on a Unix socket: parse the
//! request, call [`NodeCore`], map its error to the spec's status code. Requests are
//! never printed whole (they carry secrets); one span per call names the volume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::node::{Access, Capability, Code, CsiError, NodeCore};
use crate::agent::protocol::StageSecrets;
use crate::csi_proto as pb;
use pb::controller_server::{Controller, ControllerServer};
use pb::identity_server::{Identity, IdentityServer};
use pb::node_server::{Node, NodeServer};

/// The driver name (the CSIDriver object, every PV's `spec.csi.driver`).
pub const DRIVER_NAME: &str = tidepool_api::volume::CSI_DRIVER;

fn status(e: CsiError) -> Status {
    let code = match e.code {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Aborted => tonic::Code::Aborted,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::Internal => tonic::Code::Internal,
    };
    Status::new(code, e.message)
}

fn capability(c: Option<&pb::VolumeCapability>) -> Result<Option<Capability>, Status> {
    use pb::volume_capability::access_mode::Mode;
    let Some(c) = c else { return Ok(None) };
    let mount = match &c.access_type {
        Some(pb::volume_capability::AccessType::Mount(_)) => true,
        Some(pb::volume_capability::AccessType::Block(_)) => false,
        None => {
            return Err(Status::invalid_argument(
                "volume_capability.access_type is required (mount)",
            ));
        }
    };
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("volume_capability.access_mode is required"))?
        .mode;
    let access = match Mode::try_from(mode).unwrap_or(Mode::Unknown) {
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Access::ReadOnly,
        Mode::Unknown => {
            return Err(Status::invalid_argument(
                "volume_capability.access_mode.mode is UNKNOWN",
            ));
        }
        _ => Access::ReadWrite,
    };
    Ok(Some(Capability { mount, access }))
}

/// Runs a blocking node operation (mounts, the agent socket) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("node operation failed: {e}")))?
        .map_err(status)
}

pub struct IdentityService {
    core: Arc<NodeCore>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        // Node-only: no controller service, no topology constraints.
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let core = self.core.clone();
        let ready = tokio::task::spawn_blocking(move || core.agent_ready())
            .await
            .unwrap_or(false);
        Ok(Response::new(pb::ProbeResponse { ready: Some(ready) }))
    }
}

/// Only `ControllerGetCapabilities`, for conformance tools (see proto/csi.proto):
/// the plugin advertises no Controller service.
pub struct ControllerService;

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type, rpc};
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![pb::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::Unknown as i32,
                })),
            }],
        }))
    }
}

pub struct NodeService {
    core: Arc<NodeCore>,
}

fn path(s: &str) -> PathBuf {
    PathBuf::from(s)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeStageVolume", volume_id = %r.volume_id);
        let _e = span.enter();
        let cap = capability(r.volume_capability.as_ref())?;
        let core = self.core.clone();
        let ctx: BTreeMap<String, String> = r.volume_context.into_iter().collect();
        let secrets = StageSecrets(r.secrets.into_iter().collect());
        let (id, staging) = (r.volume_id, path(&r.staging_target_path));
        blocking(move || core.stage(&id, &staging, cap.as_ref(), &ctx, secrets)).await?;
        tracing::info!("staged");
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeUnstageVolume", volume_id = %r.volume_id);
        let _e = span.enter();
        let core = self.core.clone();
        blocking(move || core.unstage(&r.volume_id, Path::new(&r.staging_target_path))).await?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodePublishVolume", volume_id = %r.volume_id);
        let _e = span.enter();
        let cap = capability(r.volume_capability.as_ref())?;
        let core = self.core.clone();
        blocking(move || {
            core.publish(
                &r.volume_id,
                Path::new(&r.staging_target_path),
                Path::new(&r.target_path),
                cap.as_ref(),
                r.readonly,
            )
        })
        .await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("NodeUnpublishVolume", volume_id = %r.volume_id);
        let _e = span.enter();
        let core = self.core.clone();
        blocking(move || core.unpublish(&r.volume_id, Path::new(&r.target_path))).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let core = self.core.clone();
        let s = blocking(move || core.stats(&r.volume_id, Path::new(&r.volume_path))).await?;
        let mut usage = Vec::new();
        if let Some(st) = &s.stats {
            usage.push(pb::VolumeUsage {
                total: st.bytes_total as i64,
                used: st.bytes_cached as i64,
                available: st.bytes_total.saturating_sub(st.bytes_cached) as i64,
                unit: pb::volume_usage::Unit::Bytes as i32,
            });
            usage.push(pb::VolumeUsage {
                total: st.objects as i64,
                used: st.objects as i64,
                available: 0,
                unit: pb::volume_usage::Unit::Inodes as i32,
            });
        }
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(pb::VolumeCondition {
                abnormal: s.abnormal.is_some(),
                message: s.abnormal.unwrap_or_else(|| "serving".to_owned()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        _: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Tidepool volumes have no size to expand (EXPAND_VOLUME is not advertised)",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc};
        let caps = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::VolumeCondition,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.core.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// Serves the Identity and Node services (and `ControllerGetCapabilities`) on
/// `listener` until `shutdown` resolves.
pub async fn serve(
    core: Arc<NodeCore>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService { core: core.clone() }))
        .add_service(NodeServer::new(NodeService { core }))
        .add_service(ControllerServer::new(ControllerService))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
