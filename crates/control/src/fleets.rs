//! Hathora's FleetsV2 and NodesV1, an org's view of the nodes. Nodes are the operator's and
//! serve every org, so each org sees the same nodes. An org's fleets are its default fleet
//! (`defaultFleetId`), the fleets it created, and any fleet a node joined (`lodge agent
//! --fleet`). Lodge does not provision machines: a fleet's shape, autoscaler threshold and
//! per-region `nodeBaseline` are kept and shown as set, and its metrics are what its nodes
//! offer and what their processes requested, now.

use lodge_model::{Fleet, Node, NodeStatus, Region};

use crate::fleet::DEFAULT_FLEET;
use crate::{Caller, Control, Error, Result};

/// Hathora's amd64 node shapes: `(id, cores, GB)`.
pub const NODE_SHAPES: &[(&str, u32, u32)] = &[
    ("shape-amd64-4-8", 4, 8),
    ("shape-amd64-8-16", 8, 16),
    ("shape-amd64-16-32", 16, 32),
    ("shape-amd64-32-64", 32, 64),
    ("shape-amd64-64-128", 64, 128),
    ("shape-amd64-4-16", 4, 16),
    ("shape-amd64-8-32", 8, 32),
    ("shape-amd64-16-64", 16, 64),
    ("shape-amd64-32-128", 32, 128),
];

/// The most nodes a region's baseline may ask for.
pub const MAX_BASELINE: u32 = 1000;

/// A fleet's current figures (GetFleetMetrics): cores its nodes offer and cores its processes
/// requested.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FleetFigures {
    pub provisioned_cpu: f64,
    pub utilized_cpu: f64,
}

fn virtual_fleet(org_id: &str, fleet_id: &str) -> Fleet {
    Fleet {
        fleet_id: fleet_id.to_string(),
        org_id: org_id.to_string(),
        name: fleet_id.to_string(),
        node_shape_id: NODE_SHAPES[0].0.to_string(),
        scale_up_threshold: 100,
        baselines: Default::default(),
        created_at: 0,
    }
}

fn check_threshold(t: i64) -> Result<()> {
    if (1..=100).contains(&t) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "autoscalerConfig.scaleUpThreshold must be 1 to 100, got {t}"
        )))
    }
}

fn check_shape(id: &str) -> Result<()> {
    if NODE_SHAPES.iter().any(|(s, ..)| *s == id) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "nodeShapeId {id} is not a shape Lodge knows ({})",
            NODE_SHAPES
                .iter()
                .map(|(s, ..)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn check_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 {
        return Err(Error::Invalid("name must be 1 to 64 characters".into()));
    }
    Ok(name.to_string())
}

impl Control {
    /// The org's fleets: the default one, those it created, and those nodes joined.
    pub async fn fleets(&self, caller: &Caller, org_id: Option<&str>) -> Result<Vec<Fleet>> {
        caller.require("fleets:read")?;
        let org = self.org_of(caller, org_id)?;
        let mut out = self.store.fleets(&org).await?;
        let mut ids: Vec<String> = vec![DEFAULT_FLEET.to_string()];
        ids.extend(
            self.store
                .nodes()
                .await?
                .into_iter()
                .filter_map(|n| n.fleet_id),
        );
        for id in ids {
            if !out.iter().any(|f| f.fleet_id == id) {
                out.push(virtual_fleet(&org, &id));
            }
        }
        out.sort_by(|a, b| {
            (a.fleet_id != DEFAULT_FLEET, &a.name).cmp(&(b.fleet_id != DEFAULT_FLEET, &b.name))
        });
        Ok(out)
    }

    pub async fn fleet(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        fleet_id: &str,
    ) -> Result<Fleet> {
        self.fleets(caller, org_id)
            .await?
            .into_iter()
            .find(|f| f.fleet_id == fleet_id)
            .ok_or_else(|| Error::NotFound(format!("Fleet not found: {fleet_id}")))
    }

    pub async fn create_fleet(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        name: &str,
        node_shape_id: &str,
        scale_up_threshold: i64,
    ) -> Result<Fleet> {
        caller.require("fleets:read-write")?;
        let org = self.org_of(caller, org_id)?;
        let name = check_name(name)?;
        check_shape(node_shape_id)?;
        check_threshold(scale_up_threshold)?;
        if self
            .fleets(caller, Some(&org))
            .await?
            .iter()
            .any(|f| f.name == name)
        {
            return Err(Error::Invalid(format!(
                "a fleet named '{name}' already exists"
            )));
        }
        let fleet = Fleet {
            fleet_id: format!("fleet-{}", lodge_model::id::secret_hex()),
            org_id: org,
            name,
            node_shape_id: node_shape_id.to_string(),
            scale_up_threshold,
            baselines: Default::default(),
            created_at: self.now(),
        };
        self.store.put_fleet(&fleet).await?;
        Ok(fleet)
    }

    pub async fn update_fleet(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        fleet_id: &str,
        name: Option<&str>,
        node_shape_id: Option<&str>,
        scale_up_threshold: i64,
    ) -> Result<()> {
        caller.require("fleets:read-write")?;
        let mut fleet = self.fleet(caller, org_id, fleet_id).await?;
        check_threshold(scale_up_threshold)?;
        if let Some(shape) = node_shape_id {
            check_shape(shape)?;
            fleet.node_shape_id = shape.to_string();
        }
        if let Some(name) = name {
            fleet.name = check_name(name)?;
        }
        fleet.scale_up_threshold = scale_up_threshold;
        self.store.put_fleet(&fleet).await?;
        Ok(())
    }

    /// UpdateFleetRegion: the region's `nodeBaseline`, kept and shown (machines are not
    /// provisioned; join nodes with `lodge agent`).
    pub async fn update_fleet_region(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        fleet_id: &str,
        region: Region,
        node_baseline: i64,
    ) -> Result<()> {
        caller.require("fleets:read-write")?;
        let mut fleet = self.fleet(caller, org_id, fleet_id).await?;
        let baseline = u32::try_from(node_baseline)
            .ok()
            .filter(|b| *b <= MAX_BASELINE)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "nodeBaseline must be 0 to {MAX_BASELINE}, got {node_baseline}"
                ))
            })?;
        fleet.baselines.insert(region, baseline);
        self.store.put_fleet(&fleet).await?;
        let have = self
            .fleet_nodes(caller, fleet_id, Some(region))
            .await?
            .len();
        if (have as u32) < baseline {
            tracing::warn!(%fleet_id, %region, baseline, have, "fewer nodes than the fleet's baseline: join more with lodge agent");
        }
        Ok(())
    }

    /// The nodes of a fleet (NodesV1): `running` and `draining` ones, in `region` if given.
    pub async fn fleet_nodes(
        &self,
        caller: &Caller,
        fleet_id: &str,
        region: Option<Region>,
    ) -> Result<Vec<Node>> {
        self.fleet(caller, None, fleet_id).await?;
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.fleet_id.as_deref().unwrap_or(DEFAULT_FLEET) == fleet_id)
            .filter(|n| n.status != NodeStatus::Stopped)
            .filter(|n| region.is_none_or(|r| n.serves(r)))
            .collect())
    }

    /// One node (NodesV1 GetNode).
    pub async fn fleet_node(&self, caller: &Caller, node_id: &str) -> Result<Node> {
        caller.require("fleets:read")?;
        self.store
            .node(node_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("Node not found: {node_id}")))
    }

    /// What a fleet's nodes (in `region`, if given) offer and what their live processes
    /// requested, now.
    pub async fn fleet_figures(
        &self,
        caller: &Caller,
        org_id: Option<&str>,
        fleet_id: &str,
        region: Option<Region>,
    ) -> Result<FleetFigures> {
        self.org_of(caller, org_id)?;
        // fleet_nodes answers 404 for a fleet the org does not have.
        let nodes = self.fleet_nodes(caller, fleet_id, region).await?;
        let usage = self.store.node_usage().await?;
        let mut f = FleetFigures::default();
        for n in &nodes {
            f.provisioned_cpu += n.cpu;
            f.utilized_cpu += usage
                .iter()
                .find(|u| u.node_id == n.node_id)
                .map_or(0.0, |u| u.cpu);
        }
        Ok(f)
    }
}
