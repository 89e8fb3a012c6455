//! The pod annotations a workload owner sets to steer injection, parsed and validated
//! before anything is changed: a typo must be refused, not silently ignored.

use std::net::IpAddr;

use serde_json::Value;

use super::InjectError;

/// `"false"` (or `"disabled"`) leaves the pod without a sidecar.
pub const INJECT: &str = "tessera.dev/inject";
/// Inbound ports the proxy does not capture (comma-separated).
pub const EXCLUDE_INBOUND_PORTS: &str = "tessera.dev/exclude-inbound-ports";
/// Outbound ports the proxy does not capture (comma-separated).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "tessera.dev/exclude-outbound-ports";
/// Outbound destinations the proxy does not capture (comma-separated CIDRs).
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "tessera.dev/exclude-outbound-cidrs";

/// Whether the pod asked for a sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectChoice {
    /// No annotation, or `"true"`/`"enabled"`.
    Inject,
    /// `"false"`/`"disabled"`.
    OptOut,
}

/// Traffic the pod keeps out of the proxy, as its annotations say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub inbound_ports: Vec<u16>,
    /// `None`: annotation absent, so the init container gets no flag at all.
    pub outbound_ports: Option<Vec<u16>>,
    pub outbound_cidrs: Option<Vec<Cidr>>,
}

/// An IPv4 or IPv6 network, `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{prefix:?} is not a prefix length (0-{max})"))?;
        Ok(Self { address, prefix })
    }
}

/// The pod's annotations, read from its (template) metadata.
pub struct Annotations<'a>(Option<&'a serde_json::Map<String, Value>>);

impl<'a> Annotations<'a> {
    pub fn of(metadata: Option<&'a Value>) -> Self {
        Self(
            metadata
                .and_then(|m| m.get("annotations"))
                .and_then(Value::as_object),
        )
    }

    fn get(&self, name: &'static str) -> Result<Option<&'a str>, InjectError> {
        match self.0.and_then(|a| a.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.trim())),
            // Kubernetes refuses non-string annotations; a YAML file may still hold one.
            Some(other) => Err(invalid(name, &other.to_string(), "must be a string")),
        }
    }

    pub fn inject_choice(&self) -> Result<InjectChoice, InjectError> {
        match self.get(INJECT)? {
            None | Some("true" | "enabled") => Ok(InjectChoice::Inject),
            Some("false" | "disabled") => Ok(InjectChoice::OptOut),
            Some(other) => Err(invalid(INJECT, other, "must be \"true\" or \"false\"")),
        }
    }

    pub fn exclusions(&self) -> Result<Exclusions, InjectError> {
        Ok(Exclusions {
            inbound_ports: self
                .list(EXCLUDE_INBOUND_PORTS, parse_port)?
                .unwrap_or_default(),
            outbound_ports: self.list(EXCLUDE_OUTBOUND_PORTS, parse_port)?,
            outbound_cidrs: self.list(EXCLUDE_OUTBOUND_CIDRS, str::parse)?,
        })
    }

    /// A comma-separated list; an empty value is an empty list.
    fn list<T>(
        &self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Vec<T>>, InjectError> {
        let Some(value) = self.get(name)? else {
            return Ok(None);
        };
        if value.is_empty() {
            return Ok(Some(Vec::new()));
        }
        value
            .split(',')
            .map(|item| parse(item.trim()).map_err(|reason| invalid(name, value, &reason)))
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{text:?} is not a port number (1-65535)"))
}

fn invalid(annotation: &'static str, value: &str, reason: &str) -> InjectError {
    InjectError::InvalidAnnotation {
        annotation,
        // Bounded: the value ends up in an API error and a log line.
        value: value.chars().take(256).collect(),
        reason: reason.to_string(),
    }
}

/// Joins values as the init container's flags expect them.
pub fn join<T: ToString>(values: impl IntoIterator<Item = T>) -> String {
    values
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn annotated(pairs: &[(&str, &str)]) -> Value {
        let map: serde_json::Map<String, Value> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        json!({ "annotations": map })
    }

    #[test]
    fn parses_exclusion_lists() {
        let metadata = annotated(&[
            (EXCLUDE_INBOUND_PORTS, "8081, 9090"),
            (EXCLUDE_OUTBOUND_PORTS, ""),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,fd00::/8"),
        ]);
        let exclusions = Annotations::of(Some(&metadata)).exclusions().unwrap();
        assert_eq!(exclusions.inbound_ports, vec![8081, 9090]);
        assert_eq!(exclusions.outbound_ports, Some(vec![]));
        assert_eq!(
            join(exclusions.outbound_cidrs.unwrap()),
            "10.0.0.0/8,fd00::/8"
        );
        let none = Annotations::of(None).exclusions().unwrap();
        assert_eq!(none, Exclusions::default());
    }

    #[test]
    fn refuses_bad_values_naming_annotation_and_value() {
        for (name, value, reason) in [
            (EXCLUDE_INBOUND_PORTS, "80,http", "\"http\" is not a port"),
            (EXCLUDE_INBOUND_PORTS, "80,,81", "\"\" is not a port"),
            (EXCLUDE_OUTBOUND_PORTS, "0", "\"0\" is not a port"),
            (EXCLUDE_OUTBOUND_PORTS, "65536", "\"65536\" is not a port"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0", "not a CIDR"),
            (
                EXCLUDE_OUTBOUND_CIDRS,
                "10.0.0.0/33",
                "prefix length (0-32)",
            ),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0/8", "not an IP address"),
            (INJECT, "yes please", "must be \"true\" or \"false\""),
        ] {
            let metadata = annotated(&[(name, value)]);
            let annotations = Annotations::of(Some(&metadata));
            let error = annotations
                .exclusions()
                .and_then(|_| annotations.inject_choice())
                .unwrap_err()
                .to_string();
            assert!(error.contains(name), "{error}");
            assert!(error.contains(&format!("{value:?}")), "{error}");
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn reads_the_opt_out() {
        let metadata = annotated(&[(INJECT, "false")]);
        assert_eq!(
            Annotations::of(Some(&metadata)).inject_choice().unwrap(),
            InjectChoice::OptOut
        );
        assert_eq!(
            Annotations::of(None).inject_choice().unwrap(),
            InjectChoice::Inject
        );
        let numeric = json!({ "annotations": { INJECT: false } });
        assert!(Annotations::of(Some(&numeric)).inject_choice().is_err());
    }
}
