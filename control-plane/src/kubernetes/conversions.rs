//! What a load converted each cluster object to, kept for the next load to reuse.
//!
//! Every watch event reloads the whole configuration, and in a cluster pod status
//! updates keep events coming: converting every stored object again each time costs a
//! large share of a reload, for objects that almost all did not change. The file mode
//! parses only the files whose content changed ([`ParsedFiles`]); this is its cluster
//! counterpart. A conversion is reused only while every object it read is at the
//! version it read: the same uid (a deleted and recreated object has a new one) and the
//! same resourceVersion (every write gives a new one). An object without both (never
//! one served by an API server) is converted every time.
//!
//! [`ParsedFiles`]: tessera_mesh::resources::ParsedFiles

use std::borrow::Cow;
use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The version of one Kubernetes object a conversion read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    uid: String,
    resource_version: String,
}

impl Version {
    /// `None` for an object lacking a uid or a resourceVersion.
    pub fn of(metadata: &ObjectMeta) -> Option<Self> {
        Some(Self {
            uid: metadata.uid.clone()?,
            resource_version: metadata.resource_version.clone()?,
        })
    }

    /// Whether `metadata` is this version of this object (compared without copying).
    pub fn is(&self, metadata: &ObjectMeta) -> bool {
        metadata.uid.as_deref() == Some(self.uid.as_str())
            && metadata.resource_version.as_deref() == Some(self.resource_version.as_str())
    }
}

/// The conversions of one kind of object, by the converted object's uid, each with the
/// inputs `I` it was made from. Holds only the objects the last load asked for, so a
/// deleted object's conversion goes with the load after its deletion.
#[derive(Debug)]
pub struct Conversions<I, T> {
    by_uid: HashMap<String, Conversion<I, T>>,
}

#[derive(Debug)]
struct Conversion<I, T> {
    inputs: I,
    output: T,
}

impl<I, T> Default for Conversions<I, T> {
    fn default() -> Self {
        Self {
            by_uid: HashMap::new(),
        }
    }
}

impl<I, T> Conversions<I, T> {
    /// Starts a load: what it asks for is kept, the rest dropped when it ends.
    pub fn load(&mut self) -> Load<'_, I, T> {
        let last = std::mem::take(&mut self.by_uid);
        Load { kept: self, last }
    }

    /// How many objects' conversions are kept.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.by_uid.len()
    }
}

/// One load's pass over the objects: the last load's conversions, to take from.
pub struct Load<'a, I, T> {
    kept: &'a mut Conversions<I, T>,
    last: HashMap<String, Conversion<I, T>>,
}

impl<I, T: Clone> Load<'_, I, T> {
    /// The conversion of the object `uid`: the last load's when `unchanged` holds for its
    /// inputs, else `convert`'s, which names the inputs it read (`None`: one had no
    /// version, so the conversion cannot be told current later and is not kept).
    pub fn get(
        &mut self,
        uid: Option<&str>,
        unchanged: impl FnOnce(&I) -> bool,
        convert: impl FnOnce() -> (Option<I>, T),
    ) -> Cow<'_, T> {
        if let Some((uid, last)) = uid.and_then(|uid| self.last.remove_entry(uid))
            && unchanged(&last.inputs)
        {
            return Cow::Borrowed(self.keep(uid, last));
        }
        let (inputs, output) = convert();
        match (uid, inputs) {
            (Some(uid), Some(inputs)) => {
                Cow::Borrowed(self.keep(uid.to_string(), Conversion { inputs, output }))
            }
            _ => Cow::Owned(output),
        }
    }

    fn keep(&mut self, uid: String, conversion: Conversion<I, T>) -> &T {
        let kept = self.kept.by_uid.entry(uid).insert_entry(conversion);
        &kept.into_mut().output
    }
}
