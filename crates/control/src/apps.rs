//! Applications.

use lodge_model::wire::{
    ApplicationOut, ApplicationsPage, CreateAppConfig, DeploymentWithBuild, PatchAppConfig,
};
use lodge_model::{id, validate, App};
use serde_json::Value;

use crate::{Caller, Control, Error, Result};

fn check_auth_config(v: &Value) -> Result<()> {
    if !v.is_object() {
        return Err(Error::Invalid("authConfiguration must be an object".into()));
    }
    if let Some(g) = v.get("google") {
        if g.get("clientId").and_then(Value::as_str).is_none() {
            return Err(Error::Invalid(
                "authConfiguration.google.clientId must be a string".into(),
            ));
        }
    }
    Ok(())
}

impl Control {
    fn check_service_config(&self, v: &Option<Value>) -> Result<()> {
        let Some(v) = v else {
            return Ok(());
        };
        let cfg = lodge_model::warm::ServiceConfig::parse(v).map_err(Error::Invalid)?;
        let system = self.cfg.max_processes_per_app;
        for r in &cfg.regions {
            let most = u64::from(r.min.max(r.target.unwrap_or(0)));
            if most > system {
                return Err(Error::Invalid(format!(
                    "serviceConfig.staticProcessAllocation ({}): {most} processes is more than \
                     one app may have on this instance (--max-processes-per-app {system})",
                    r.region
                )));
            }
        }
        Ok(())
    }

    /// An app as GetApp shows it: `serviceConfig` with each region's target and maximum.
    pub(crate) fn app_out(&self, app: &App) -> ApplicationOut {
        let mut out = ApplicationOut::from(app);
        if let Some(v) = &out.service_config {
            let system = self.cfg.max_processes_per_app.min(u64::from(u32::MAX)) as u32;
            out.service_config = Some(lodge_model::warm::echo(v, system, |r| {
                self.warm_target(&app.app_id, r)
            }));
        }
        out
    }
}

impl Control {
    pub async fn create_app(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        p: CreateAppConfig,
    ) -> Result<ApplicationOut> {
        let org = self.org_of(caller, org_id)?;
        validate::app_name(&p.app_name).map_err(Error::Invalid)?;
        check_auth_config(&p.auth_configuration)?;
        self.check_service_config(&p.service_config)?;
        let app = App {
            app_id: id::app_id(),
            app_name: p.app_name,
            app_secret: id::app_secret(),
            org_id: org,
            created_by: caller.name.clone(),
            created_at: self.now(),
            deleted_at: None,
            deleted_by: None,
            auth_configuration: p.auth_configuration,
            service_config: p.service_config.filter(|v| !v.is_null()),
        };
        self.store.insert_app(&app).await?;
        self.nudge_warm();
        Ok(self.app_out(&app))
    }

    pub async fn get_apps(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
    ) -> Result<ApplicationsPage> {
        let org = self.org_of(caller, org_id)?;
        let mut applications = Vec::new();
        for app in self.store.apps(&org).await? {
            let mut out = self.app_out(&app);
            if let Some(d) = self
                .store
                .deployments(&app.app_id)
                .await?
                .into_iter()
                .next()
            {
                if let Some(b) = self.store.build(&d.build_id).await? {
                    out.deployment = Some(DeploymentWithBuild {
                        deployment: (&d).into(),
                        build: (&b).into(),
                    });
                }
            }
            applications.push(out);
        }
        Ok(ApplicationsPage { applications })
    }

    pub async fn get_app(&self, caller: &Caller, app_id: &str) -> Result<ApplicationOut> {
        Ok(self.app_out(&self.app_of(caller, app_id).await?))
    }

    /// UpdateApp replaces every field; PatchApp only those given.
    pub async fn update_app(
        &self,
        caller: &Caller,
        app_id: &str,
        p: PatchAppConfig,
        replace: bool,
    ) -> Result<ApplicationOut> {
        let mut app = self.app_of(caller, app_id).await?;
        if replace && (p.app_name.is_none() || p.auth_configuration.is_none()) {
            return Err(Error::Invalid(
                "appName and authConfiguration are required".into(),
            ));
        }
        if let Some(name) = p.app_name {
            validate::app_name(&name).map_err(Error::Invalid)?;
            app.app_name = name;
        }
        if let Some(auth) = p.auth_configuration {
            check_auth_config(&auth)?;
            app.auth_configuration = auth;
        }
        self.check_service_config(&p.service_config)?;
        if replace || p.service_config.is_some() {
            app.service_config = p.service_config.filter(|v| !v.is_null());
        }
        self.store.update_app(&app).await?;
        self.nudge_warm();
        Ok(self.app_out(&app))
    }

    pub async fn delete_app(&self, caller: &Caller, app_id: &str) -> Result<()> {
        let mut app = self.app_of(caller, app_id).await?;
        app.deleted_at = Some(self.now());
        app.deleted_by = Some(caller.name.clone());
        self.store.update_app(&app).await?;
        self.nudge_warm();
        Ok(())
    }
}
