//! Deployments: immutable runtime configurations of an app.

use std::collections::BTreeSet;

use lodge_model::wire::{DeploymentConfigV3, DeploymentV3, DeploymentsV3Page};
use lodge_model::{id, validate, BuildStatus, ContainerPort, Deployment};

use crate::{Caller, Control, Error, Result};

/// Default page size: large, because SDK versions without paging see only the first page.
pub const PAGE_SIZE: usize = 100;

#[derive(Debug, Clone, Default)]
pub struct DeploymentFilter {
    pub deployment_tag: Option<String>,
    pub build_tag: Option<String>,
    pub next_page_token: Option<String>,
    /// Lodge extension; defaults to [`PAGE_SIZE`].
    pub page_size: Option<usize>,
}

fn port(name: &str, port: u32, field: &str) -> Result<u16> {
    validate::port_name(name).map_err(Error::Invalid)?;
    match u16::try_from(port) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(Error::Invalid(format!(
            "{field} must be 1 to 65535, got {port}"
        ))),
    }
}

impl Control {
    pub async fn create_deployment(
        &self,
        caller: &Caller,
        app_id: &str,
        c: DeploymentConfigV3,
    ) -> Result<DeploymentV3> {
        let app = self.app_of(caller, app_id).await?;
        if !(1..=10_000).contains(&c.rooms_per_process) {
            return Err(Error::Invalid(format!(
                "roomsPerProcess must be 1 to 10000, got {}",
                c.rooms_per_process
            )));
        }
        let default_port = ContainerPort {
            name: "default".into(),
            port: port("default", c.container_port, "containerPort")?,
            transport_type: c.transport_type,
        };
        let mut names = BTreeSet::from(["default".to_string()]);
        let mut additional = Vec::new();
        if c.additional_container_ports.len() > 16 {
            return Err(Error::Invalid("at most 16 additionalContainerPorts".into()));
        }
        for p in &c.additional_container_ports {
            let number = port(&p.name, p.port, "additionalContainerPorts.port")?;
            if !names.insert(p.name.clone()) {
                return Err(Error::Invalid(format!(
                    "port name '{}' is used twice",
                    p.name
                )));
            }
            if number == default_port.port {
                return Err(Error::Invalid(format!("port {number} is used twice")));
            }
            additional.push(ContainerPort {
                name: p.name.clone(),
                port: number,
                transport_type: p.transport_type,
            });
        }
        if c.env.len() > 100 {
            return Err(Error::Invalid("at most 100 env entries".into()));
        }
        for e in &c.env {
            validate::env_name(&e.name).map_err(Error::Invalid)?;
            validate::max_len("env value", &e.value, 5000).map_err(Error::Invalid)?;
        }
        if !(c.requested_cpu.is_finite() && c.requested_cpu > 0.0 && c.requested_cpu <= 64.0) {
            return Err(Error::Invalid(format!(
                "requestedCPU must be above 0 and at most 64, got {}",
                c.requested_cpu
            )));
        }
        if !(c.requested_memory_mb.is_finite()
            && (16.0..=1_048_576.0).contains(&c.requested_memory_mb))
        {
            return Err(Error::Invalid(format!(
                "requestedMemoryMB must be 16 to 1048576, got {}",
                c.requested_memory_mb
            )));
        }
        if let Some(g) = c.requested_gpu {
            if g != 0.0 {
                return Err(Error::Invalid(
                    "this Lodge has no GPUs; requestedGPU must be 0".into(),
                ));
            }
        }
        if let Some(t) = &c.deployment_tag {
            validate::max_len("deploymentTag", t, 1000).map_err(Error::Invalid)?;
        }
        let build = match self.store.build(&c.build_id).await? {
            Some(b) if b.org_id == app.org_id && b.deleted_at.is_none() => b,
            _ => return Err(Error::NotFound(format!("Build not found: {}", c.build_id))),
        };
        if build.status != BuildStatus::Succeeded {
            return Err(Error::BadRequest(format!(
                "build {} has status {}; only succeeded builds can be deployed",
                build.build_id, build.status
            )));
        }
        let d = Deployment {
            deployment_id: id::deployment_id(),
            app_id: app.app_id,
            build_id: build.build_id,
            build_tag: build.build_tag,
            created_by: caller.name.clone(),
            created_at: self.now(),
            idle_timeout_enabled: c.idle_timeout_enabled,
            env: c.env,
            rooms_per_process: c.rooms_per_process,
            default_container_port: default_port,
            additional_container_ports: additional,
            requested_cpu: c.requested_cpu,
            requested_memory_mb: c.requested_memory_mb,
            requested_gpu: c.requested_gpu,
            deployment_tag: c.deployment_tag,
            fleet_id: c.fleet_id,
        };
        self.store.insert_deployment(&d).await?;
        self.nudge_warm();
        self.prefetch_build(&d.build_id, crate::rooms::need(&d))
            .await;
        Ok((&d).into())
    }

    pub async fn get_deployments(
        &self,
        caller: &Caller,
        app_id: &str,
        f: DeploymentFilter,
    ) -> Result<DeploymentsV3Page> {
        let app = self.app_of(caller, app_id).await?;
        if f.page_size.is_some_and(|n| !(1..=1000).contains(&n)) {
            return Err(Error::Invalid("pageSize must be 1 to 1000".into()));
        }
        let offset: usize = match &f.next_page_token {
            None => 0,
            Some(t) => t
                .parse()
                .map_err(|_| Error::Invalid(format!("invalid nextPageToken '{t}'")))?,
        };
        let all: Vec<Deployment> = self
            .store
            .deployments(&app.app_id)
            .await?
            .into_iter()
            .filter(|d| {
                f.deployment_tag
                    .as_ref()
                    .is_none_or(|t| d.deployment_tag.as_ref() == Some(t))
            })
            .filter(|d| {
                f.build_tag
                    .as_ref()
                    .is_none_or(|t| d.build_tag.as_ref() == Some(t))
            })
            .collect();
        let page: Vec<DeploymentV3> = all
            .iter()
            .skip(offset)
            .take(f.page_size.unwrap_or(PAGE_SIZE))
            .map(Into::into)
            .collect();
        let next = offset + page.len();
        Ok(DeploymentsV3Page {
            deployments: page,
            next_page_token: (next < all.len()).then(|| next.to_string()),
        })
    }

    pub async fn latest_deployment(&self, caller: &Caller, app_id: &str) -> Result<Deployment> {
        let app = self.app_of(caller, app_id).await?;
        self.store
            .deployments(&app.app_id)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotFound(format!("No deployment found for app {app_id}")))
    }

    pub async fn get_deployment(
        &self,
        caller: &Caller,
        app_id: &str,
        deployment_id: &str,
    ) -> Result<Deployment> {
        let app = self.app_of(caller, app_id).await?;
        match self.store.deployment(deployment_id).await? {
            Some(d) if d.app_id == app.app_id => Ok(d),
            _ => Err(Error::NotFound(format!(
                "Deployment not found: {deployment_id}"
            ))),
        }
    }
}
