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

fn check_service_config(v: &Option<Value>) -> Result<()> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(o)) => match o.get("staticProcessAllocation") {
            Some(Value::Array(_)) => Ok(()),
            _ => Err(Error::Invalid(
                "serviceConfig.staticProcessAllocation must be a list".into(),
            )),
        },
        Some(_) => Err(Error::Invalid("serviceConfig must be an object".into())),
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
        check_service_config(&p.service_config)?;
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
        Ok((&app).into())
    }

    pub async fn get_apps(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
    ) -> Result<ApplicationsPage> {
        let org = self.org_of(caller, org_id)?;
        let mut applications = Vec::new();
        for app in self.store.apps(&org).await? {
            let mut out = ApplicationOut::from(&app);
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
        Ok((&self.app_of(caller, app_id).await?).into())
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
        check_service_config(&p.service_config)?;
        if replace || p.service_config.is_some() {
            app.service_config = p.service_config.filter(|v| !v.is_null());
        }
        self.store.update_app(&app).await?;
        Ok((&app).into())
    }

    pub async fn delete_app(&self, caller: &Caller, app_id: &str) -> Result<()> {
        let mut app = self.app_of(caller, app_id).await?;
        app.deleted_at = Some(self.now());
        app.deleted_by = Some(caller.name.clone());
        self.store.update_app(&app).await?;
        Ok(())
    }
}
