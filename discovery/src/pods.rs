//! How the store keeps a Pod: the waypoint watches every Pod in the cluster (a client's
//! workload labels for metrics, an endpoint's service account), so a Pod must cost little.
//!
//! A [`PodRecord`] holds only what differs from Pod to Pod (name, IPs); what the Pods of one
//! workload share (namespace, the labels kept, owner, service account) is one [`PodShape`],
//! interned in [`Shapes`]: the replicas of a ReplicaSet have the same labels
//! (`pod-template-hash` included), owner and service account. A `policy::resources::Pod` is
//! made back from the record only where one is needed (a compile, an endpoint update, a
//! connection's source lookup), which compiles already paid for as a clone of the stored Pod.
//!
//! Bounded: a shape lives while a Pod uses it; the store gives a shape back when the last
//! Pod with it goes ([`Shapes::release`]) and sweeps after every re-list ([`Shapes::sweep`]).

use std::collections::HashSet;
use std::sync::Arc;

use policy::resources::{Labels, ObjectMeta, OwnerReference, Pod, PodIp, PodSpec, PodStatus};

/// What the Pods of one workload share.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PodShape {
    namespace: String,
    labels: Labels,
    owner_references: Vec<OwnerReference>,
    service_account_name: Option<String>,
}

/// One Pod as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    name: Box<str>,
    shape: Arc<PodShape>,
    pod_ip: Option<Box<str>>,
    /// `status.podIPs`, except when it is exactly `[podIP]` (the usual single-stack Pod),
    /// which `ips_are_pod_ip` says instead of a second copy.
    pod_ips: Box<[Box<str>]>,
    ips_are_pod_ip: bool,
}

/// The interned shapes.
#[derive(Debug, Default)]
pub struct Shapes(HashSet<Arc<PodShape>>);

impl Shapes {
    fn intern(&mut self, shape: PodShape) -> Arc<PodShape> {
        if let Some(s) = self.0.get(&shape) {
            return s.clone();
        }
        let s = Arc::new(shape);
        self.0.insert(s.clone());
        s
    }

    /// A record is being dropped: forget its shape if no other Pod uses it.
    pub fn release(&mut self, record: PodRecord) {
        let shape = record.shape;
        // This record's reference and the set's: nobody else has it.
        if Arc::strong_count(&shape) == 2 {
            self.0.remove(&*shape);
        }
    }

    /// Forget every shape no Pod uses (after a re-list replaced the whole store).
    pub fn sweep(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }

    /// Shapes held now.
    #[allow(clippy::len_without_is_empty)] // a gauge, never tested for emptiness
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl PodRecord {
    /// Keep `pod` (already reduced by the decoder: labels the waypoint reads, no annotations).
    pub fn new(pod: Pod, shapes: &mut Shapes) -> PodRecord {
        let Pod {
            metadata,
            spec,
            status,
        } = pod;
        let ips_are_pod_ip = match (&status.pod_ip, status.pod_ips.as_slice()) {
            (Some(ip), [only]) => *ip == only.ip,
            _ => false,
        };
        let pod_ips = if ips_are_pod_ip {
            Box::default()
        } else {
            status
                .pod_ips
                .into_iter()
                .map(|i| i.ip.into_boxed_str())
                .collect()
        };
        PodRecord {
            name: metadata.name.into_boxed_str(),
            shape: shapes.intern(PodShape {
                namespace: metadata.namespace,
                labels: metadata.labels,
                owner_references: metadata.owner_references,
                service_account_name: spec.service_account_name,
            }),
            pod_ip: status.pod_ip.map(String::into_boxed_str),
            pod_ips,
            ips_are_pod_ip,
        }
    }

    /// The Pod as the decoder produced it.
    pub fn to_pod(&self) -> Pod {
        let s = &*self.shape;
        let pod_ips = if self.ips_are_pod_ip {
            self.pod_ip
                .iter()
                .map(|ip| PodIp { ip: ip.to_string() })
                .collect()
        } else {
            self.pod_ips
                .iter()
                .map(|ip| PodIp { ip: ip.to_string() })
                .collect()
        };
        Pod {
            metadata: ObjectMeta {
                name: self.name.to_string(),
                namespace: s.namespace.clone(),
                labels: s.labels.clone(),
                owner_references: s.owner_references.clone(),
                ..ObjectMeta::default()
            },
            spec: PodSpec {
                service_account_name: s.service_account_name.clone(),
            },
            status: PodStatus {
                pod_ip: self.pod_ip.as_deref().map(str::to_string),
                pod_ips,
            },
        }
    }

    /// `status.podIP` then `status.podIPs`, as written (the Pod's IPs for the address index).
    pub fn ips(&self) -> impl Iterator<Item = &str> {
        let listed: &[Box<str>] = if self.ips_are_pod_ip {
            &[]
        } else {
            &self.pod_ips
        };
        self.pod_ip
            .as_deref()
            .into_iter()
            .chain(listed.iter().map(|s| &**s))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        let loaded = policy::parse_manifests(yaml, "t.yaml").unwrap();
        match loaded.resources.into_iter().next().unwrap() {
            policy::resources::Resource::Pod(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_record_gives_back_the_pod_and_replicas_share_one_shape() {
        let mut shapes = Shapes::default();
        let yaml = |name: &str, ips: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {{app: web, pod-template-hash: abc}}\n  ownerReferences: [{{kind: ReplicaSet, name: web-abc}}]\nspec: {{serviceAccountName: web}}\nstatus: {ips}\n"
            )
        };
        let a = pod(&yaml(
            "web-abc-1",
            "{podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}]}",
        ));
        let b = pod(&yaml(
            "web-abc-2",
            "{podIP: 10.0.0.2, podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}",
        ));
        let c = pod(&yaml("web-abc-3", "{}"));
        let ra = PodRecord::new(a.clone(), &mut shapes);
        let rb = PodRecord::new(b.clone(), &mut shapes);
        let rc = PodRecord::new(c.clone(), &mut shapes);
        assert_eq!(ra.to_pod(), a);
        assert_eq!(rb.to_pod(), b);
        assert_eq!(rc.to_pod(), c);
        assert_eq!(ra.ips().collect::<Vec<_>>(), ["10.0.0.1"]);
        assert_eq!(
            rb.ips().collect::<Vec<_>>(),
            ["10.0.0.2", "10.0.0.2", "fd00::2"]
        );
        assert_eq!(shapes.len(), 1, "three replicas, one shape");
        // Another workload's Pod: a second shape, forgotten when its Pod goes.
        let other = pod(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: ns, labels: {app: db}}\nspec: {serviceAccountName: db}\n",
        );
        let rd = PodRecord::new(other, &mut shapes);
        assert_eq!(shapes.len(), 2);
        shapes.release(rd);
        assert_eq!(shapes.len(), 1);
        shapes.release(ra);
        shapes.release(rb);
        assert_eq!(shapes.len(), 1, "web-abc-3 still uses it");
        drop(rc);
        shapes.sweep();
        assert_eq!(shapes.len(), 0);
    }
}
