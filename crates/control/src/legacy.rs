//! The deprecated v1/v2 endpoints shipped games and editor plugins still call, mapped onto the
//! same objects as v3. Builds and deployments get per-app integer ids on first sight (in
//! creation order for those created through these endpoints), kept in the store so every
//! replica and every restart shows the same numbers.

use lodge_model::legacy::{
    BuildLegacy, BuildWithMultipartUrlsLegacy, BuildWithUploadUrl, DeploymentConfigV1,
    DeploymentConfigV2, DeploymentV1, DeploymentV2, DeploymentWithBuildLegacy, KeyValue,
    ProcessCounters, ProcessV1, ProcessV2, ProcessWithRooms,
};
use lodge_model::wire::{ApplicationOut, CreateMultipartBuildParams, DeploymentConfigV3, RoomOut};
use lodge_model::{Build, Deployment, Process, ProcessStatus, Region, UploadSession};
use lodge_store::ProcessQuery;
use serde::Serialize;

use crate::{Caller, Control, Error, ProcessFilter, Result, UploadTarget};

const BUILD: &str = "build";
const DEPLOYMENT: &str = "deployment";

/// A v1 app listing entry.
#[derive(Debug, Clone, Serialize)]
pub struct ApplicationV1 {
    #[serde(flatten)]
    pub app: ApplicationOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentWithBuildLegacy>,
}

/// How a legacy build is created: plain, with a presigned POST form, or with multipart URLs.
pub enum LegacyUpload {
    None,
    Form,
    Multipart(f64),
}

/// A legacy build creation answer.
pub enum CreatedLegacyBuild {
    Plain(BuildLegacy),
    Form(BuildWithUploadUrl),
    Multipart(BuildWithMultipartUrlsLegacy),
}

fn parse_num(s: &str, what: &str) -> Result<i64> {
    s.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::Invalid(format!("{what} must be a positive integer, got '{s}'")))
}

impl Control {
    async fn number(&self, app_id: &str, kind: &str, id: &str) -> Result<i64> {
        Ok(self.store.legacy_number(app_id, kind, id).await?)
    }

    async fn by_number(&self, app_id: &str, kind: &str, num: &str) -> Result<String> {
        let what = if kind == BUILD {
            "buildId"
        } else {
            "deploymentId"
        };
        let n = parse_num(num, what)?;
        self.store.legacy_id(app_id, kind, n).await?.ok_or_else(|| {
            let name = if kind == BUILD { "Build" } else { "Deployment" };
            Error::NotFound(format!("{name} not found: {n}"))
        })
    }

    // --- apps --------------------------------------------------------------------------------

    pub async fn apps_v1(&self, caller: &Caller) -> Result<Vec<ApplicationV1>> {
        let mut out = Vec::new();
        for app in self.store.apps(&caller.org_id).await? {
            let deployment = match self
                .store
                .deployments(&app.app_id)
                .await?
                .into_iter()
                .next()
            {
                Some(d) => match self.store.build(&d.build_id).await? {
                    Some(b) => Some(DeploymentWithBuildLegacy {
                        deployment: self.deployment_v2(&d).await?,
                        build: self.build_legacy(&app.app_id, &b).await?,
                    }),
                    None => None,
                },
                None => None,
            };
            out.push(ApplicationV1 {
                app: (&app).into(),
                deployment,
            });
        }
        Ok(out)
    }

    // --- builds ------------------------------------------------------------------------------

    async fn build_legacy(&self, app_id: &str, b: &Build) -> Result<BuildLegacy> {
        let n = self.number(app_id, BUILD, &b.build_id).await?;
        Ok(BuildLegacy::of(b, n, app_id))
    }

    /// The build behind a legacy number of the app.
    pub async fn legacy_build(&self, caller: &Caller, app_id: &str, num: &str) -> Result<Build> {
        let app = self.app_of(caller, app_id).await?;
        let id = self.by_number(&app.app_id, BUILD, num).await?;
        match self.store.build(&id).await? {
            Some(b) if b.deleted_at.is_none() => Ok(b),
            _ => Err(Error::NotFound(format!("Build not found: {num}"))),
        }
    }

    pub async fn create_build_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
        build_tag: Option<String>,
        upload: LegacyUpload,
        target: UploadTarget<'_>,
    ) -> Result<CreatedLegacyBuild> {
        let app = self.app_of(caller, app_id).await?;
        let created = match upload {
            LegacyUpload::Multipart(size) => {
                let params = CreateMultipartBuildParams {
                    build_size_in_bytes: size,
                    build_id: None,
                    build_tag,
                };
                let c = self
                    .create_build(caller, Some(&app.org_id), params, target)
                    .await?;
                let b = self
                    .store
                    .build(&c.build.build_id)
                    .await?
                    .ok_or_else(|| Error::Internal("build vanished".into()))?;
                CreatedLegacyBuild::Multipart(BuildWithMultipartUrlsLegacy {
                    build: self.build_legacy(&app.app_id, &b).await?,
                    upload_parts: c.upload_parts,
                    max_chunk_size: c.max_chunk_size,
                    complete_upload_post_request_url: c.complete_upload_post_request_url,
                })
            }
            LegacyUpload::Form => {
                let session = UploadSession {
                    size: 0,
                    max_chunk_size: self.cfg.max_build_bytes,
                    parts: 0,
                    secret: lodge_model::id::secret_hex(),
                    completed: false,
                };
                let b = self
                    .new_build(caller, app.org_id.clone(), None, build_tag, Some(session))
                    .await?;
                let secret = b
                    .upload
                    .as_ref()
                    .map(|u| u.secret.clone())
                    .unwrap_or_default();
                let base = target.base_url.trim_end_matches('/');
                CreatedLegacyBuild::Form(BuildWithUploadUrl {
                    build: self.build_legacy(&app.app_id, &b).await?,
                    upload_url: format!("{base}/uploads/{}/form?signature={secret}", b.build_id),
                    upload_body_params: vec![KeyValue {
                        key: "key".into(),
                        value: b.build_id.clone(),
                    }],
                })
            }
            LegacyUpload::None => {
                let b = self
                    .new_build(caller, app.org_id.clone(), None, build_tag, None)
                    .await?;
                CreatedLegacyBuild::Plain(self.build_legacy(&app.app_id, &b).await?)
            }
        };
        Ok(created)
    }

    /// Builds created for the app through the legacy endpoints or deployed by it, newest first.
    pub async fn builds_legacy(&self, caller: &Caller, app_id: &str) -> Result<Vec<BuildLegacy>> {
        let app = self.app_of(caller, app_id).await?;
        for d in self.store.deployments(&app.app_id).await?.iter().rev() {
            self.number(&app.app_id, BUILD, &d.build_id).await?;
        }
        let mut out = Vec::new();
        for (n, id) in self.store.legacy_entries(&app.app_id, BUILD).await? {
            if let Some(b) = self.store.build(&id).await? {
                if b.deleted_at.is_none() {
                    out.push(BuildLegacy::of(&b, n, &app.app_id));
                }
            }
        }
        Ok(out)
    }

    pub async fn build_info_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
        num: &str,
    ) -> Result<BuildLegacy> {
        let b = self.legacy_build(caller, app_id, num).await?;
        self.build_legacy(app_id, &b).await
    }

    pub async fn delete_build_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
        num: &str,
    ) -> Result<()> {
        let b = self.legacy_build(caller, app_id, num).await?;
        self.delete_build(caller, Some(&b.org_id), &b.build_id)
            .await
    }

    /// Where an uploaded archive goes before RunBuild: the build's `archive` file.
    pub fn archive_path(&self, build_id: &str) -> std::path::PathBuf {
        self.cfg
            .data_dir
            .join("builds")
            .join(build_id)
            .join("archive")
    }

    /// A build that still takes an upload through the presigned POST form.
    pub async fn form_upload_target(
        &self,
        build_id: &str,
        signature: &str,
    ) -> Result<std::path::PathBuf> {
        match self.store.build(build_id).await? {
            Some(b) if b.deleted_at.is_none() => match &b.upload {
                Some(u) if u.parts == 0 && crate::tokens::same(&u.secret, signature) => {
                    if b.status != lodge_model::BuildStatus::Created {
                        return Err(Error::BadRequest(format!(
                            "build {build_id} no longer accepts uploads"
                        )));
                    }
                    Ok(self.archive_path(build_id))
                }
                _ => Err(Error::Unauthorized("invalid upload signature".into())),
            },
            _ => Err(Error::NotFound(format!("Build not found: {build_id}"))),
        }
    }

    // --- deployments -------------------------------------------------------------------------

    async fn deployment_v2(&self, d: &Deployment) -> Result<DeploymentV2> {
        let n = self.number(&d.app_id, DEPLOYMENT, &d.deployment_id).await?;
        let b = self.number(&d.app_id, BUILD, &d.build_id).await?;
        Ok(DeploymentV2::of(d, n, b))
    }

    async fn deployment_v1(&self, d: &Deployment) -> Result<DeploymentV1> {
        let n = self.number(&d.app_id, DEPLOYMENT, &d.deployment_id).await?;
        let b = self.number(&d.app_id, BUILD, &d.build_id).await?;
        Ok(DeploymentV1::of(d, n, b))
    }

    /// Number the app's deployments oldest first, so numbers follow creation order.
    async fn number_deployments(&self, app_id: &str) -> Result<Vec<Deployment>> {
        let all = self.store.deployments(app_id).await?;
        for d in all.iter().rev() {
            self.number(app_id, DEPLOYMENT, &d.deployment_id).await?;
        }
        Ok(all)
    }

    pub async fn create_deployment_v2(
        &self,
        caller: &Caller,
        app_id: &str,
        build_num: &str,
        c: DeploymentConfigV2,
    ) -> Result<DeploymentV2> {
        let b = self.legacy_build(caller, app_id, build_num).await?;
        self.number_deployments(app_id).await?;
        let v3 = DeploymentConfigV3 {
            build_id: b.build_id,
            idle_timeout_enabled: c.idle_timeout_enabled,
            env: c.env,
            rooms_per_process: c.rooms_per_process,
            transport_type: c.transport_type,
            container_port: c.container_port,
            additional_container_ports: c.additional_container_ports,
            requested_cpu: c.requested_cpu,
            requested_memory_mb: c.requested_memory_mb,
            requested_gpu: None,
            deployment_tag: None,
            fleet_id: None,
        };
        let d = self.create_deployment(caller, app_id, v3).await?;
        let d = self.stored_deployment(&d.deployment_id).await?;
        self.deployment_v2(&d).await
    }

    pub async fn create_deployment_v1(
        &self,
        caller: &Caller,
        app_id: &str,
        build_num: &str,
        c: DeploymentConfigV1,
    ) -> Result<DeploymentV1> {
        let (cpu, memory) = c.plan_name.resources();
        let v2 = DeploymentConfigV2 {
            idle_timeout_enabled: c.idle_timeout_enabled,
            env: c.env,
            rooms_per_process: c.rooms_per_process,
            transport_type: c.transport_type,
            container_port: c.container_port,
            additional_container_ports: c.additional_container_ports,
            requested_cpu: cpu,
            requested_memory_mb: memory,
        };
        let d = self
            .create_deployment_v2(caller, app_id, build_num, v2)
            .await?;
        let d = self
            .store
            .legacy_id(app_id, DEPLOYMENT, d.deployment_id)
            .await?
            .ok_or_else(|| Error::Internal("deployment number vanished".into()))?;
        let d = self.stored_deployment(&d).await?;
        self.deployment_v1(&d).await
    }

    async fn stored_deployment(&self, id: &str) -> Result<Deployment> {
        self.store
            .deployment(id)
            .await?
            .ok_or_else(|| Error::Internal(format!("deployment {id} vanished")))
    }

    /// The app's deployments, newest first, for both legacy versions.
    pub async fn deployments_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
    ) -> Result<Vec<Deployment>> {
        let app = self.app_of(caller, app_id).await?;
        self.number_deployments(&app.app_id).await
    }

    pub async fn deployment_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
        num: Option<&str>,
    ) -> Result<Deployment> {
        let all = self.deployments_legacy(caller, app_id).await?;
        let Some(num) = num else {
            return all
                .into_iter()
                .next()
                .ok_or_else(|| Error::NotFound(format!("No deployment found for app {app_id}")));
        };
        let id = self.by_number(app_id, DEPLOYMENT, num).await?;
        all.into_iter()
            .find(|d| d.deployment_id == id)
            .ok_or_else(|| Error::NotFound(format!("Deployment not found: {num}")))
    }

    pub async fn deployments_v2(&self, list: &[Deployment]) -> Result<Vec<DeploymentV2>> {
        let mut out = Vec::with_capacity(list.len());
        for d in list {
            out.push(self.deployment_v2(d).await?);
        }
        Ok(out)
    }

    pub async fn deployments_v1(&self, list: &[Deployment]) -> Result<Vec<DeploymentV1>> {
        let mut out = Vec::with_capacity(list.len());
        for d in list {
            out.push(self.deployment_v1(d).await?);
        }
        Ok(out)
    }

    // --- processes ---------------------------------------------------------------------------

    pub async fn process_v2(&self, p: &Process) -> Result<ProcessV2> {
        let n = self.number(&p.app_id, DEPLOYMENT, &p.deployment_id).await?;
        Ok(ProcessV2::of(p, n))
    }

    fn counters(&self, process_id: &str) -> ProcessCounters {
        self.agents()
            .iter()
            .find_map(|a| a.stats(process_id))
            .map(|s| ProcessCounters {
                active_connections: s.active_connections,
                egressed_bytes: s.bytes_out,
            })
            .unwrap_or_default()
    }

    pub async fn process_v1(&self, p: &Process) -> Result<ProcessV1> {
        let n = self.number(&p.app_id, DEPLOYMENT, &p.deployment_id).await?;
        Ok(ProcessV1::of(
            p,
            n,
            self.counters(&p.process_id),
            self.now(),
        ))
    }

    pub async fn process_info_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
        process_id: &str,
    ) -> Result<Process> {
        let app = self.app_of(caller, app_id).await?;
        self.process_of(&app.app_id, process_id).await
    }

    /// Processes for the v1 and v2 listings, newest first.
    pub async fn processes_legacy(
        &self,
        caller: &Caller,
        app_id: &str,
        f: ProcessFilter,
        limit: Option<u32>,
    ) -> Result<Vec<Process>> {
        let app = self.app_of(caller, app_id).await?;
        let q = ProcessQuery {
            app_id: Some(app.app_id),
            statuses: f.statuses,
            regions: f.regions,
            created_before: f.before,
            limit,
            ..Default::default()
        };
        Ok(self.store.processes(&q).await?)
    }

    /// v1 running processes with their rooms.
    pub async fn running_processes_v1(
        &self,
        caller: &Caller,
        app_id: &str,
        region: Option<Region>,
    ) -> Result<Vec<ProcessWithRooms>> {
        let f = ProcessFilter {
            statuses: vec![ProcessStatus::Running],
            regions: region.into_iter().collect(),
            before: None,
        };
        let mut out = Vec::new();
        for p in self.processes_legacy(caller, app_id, f, None).await? {
            let rooms: Vec<RoomOut> = self
                .store
                .rooms_of_process(&p.process_id, true)
                .await?
                .iter()
                .map(RoomOut::without_allocations)
                .collect();
            out.push(ProcessWithRooms {
                process: self.process_v1(&p).await?,
                total_rooms: rooms.len() as u32,
                rooms,
            });
        }
        Ok(out)
    }

    pub async fn stopped_processes_v1(
        &self,
        caller: &Caller,
        app_id: &str,
        region: Option<Region>,
    ) -> Result<Vec<ProcessV1>> {
        let f = ProcessFilter {
            statuses: vec![ProcessStatus::Stopped, ProcessStatus::Failed],
            regions: region.into_iter().collect(),
            before: None,
        };
        let mut out = Vec::new();
        for p in self.processes_legacy(caller, app_id, f, Some(100)).await? {
            out.push(self.process_v1(&p).await?);
        }
        Ok(out)
    }
}
