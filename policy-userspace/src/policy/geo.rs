//! Country per network from a MaxMind database (GeoLite2/GeoIP2 or the
//! same format with a top-level `country_code`).

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use maxminddb::{PathElement, WithinOptions};
use policy_common::MAX_COUNTRIES;

use super::{
    input::{self, InputError, InputKind, Limits},
    model::GeoField,
};

/// Reading a database stops and refuses it after this long: the network
/// bound already limits the work, this is the backstop for the rest.
pub const READ_DEADLINE: Duration = Duration::from_secs(60);
/// The clock is read once per this many networks.
const NETWORKS_PER_CLOCK_READ: u64 = 65_536;

/// Every network of a database with a country, in address order.
#[derive(Default, PartialEq)]
pub struct GeoTable {
    /// Country codes; the networks refer to them by index.
    pub codes: Vec<String>,
    pub v4: Vec<(Ipv4Net, u16)>,
    pub v6: Vec<(Ipv6Net, u16)>,
    /// Networks read, with or without a country.
    pub networks_read: usize,
}

/// Not the networks: a table holds a million.
impl fmt::Debug for GeoTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GeoTable {{ {} codes, {} IPv4 and {} IPv6 networks }}", self.codes.len(), self.v4.len(), self.v6.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("cannot open {} as a MaxMind database: {source}", path.display())]
    Open { path: PathBuf, source: maxminddb::MaxMindDbError },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: maxminddb::MaxMindDbError },
    #[error("{} holds more than {limit} networks (real databases hold about a million); refused. If it is genuine, raise `limits: {{geo_networks: ...}}` in the policy or --max-geo-networks", path.display())]
    TooManyNetworks { path: PathBuf, limit: u64 },
    #[error("reading {} took longer than {} s ({networks} networks read); refused", path.display(), READ_DEADLINE.as_secs())]
    TooSlow { path: PathBuf, networks: u64 },
    #[error("{} names more than {} countries; refused", path.display(), MAX_COUNTRIES - 1)]
    TooManyCountries { path: PathBuf },
}

/// IPv4 networks of an IPv6 database live under `::/96`.
fn to_ipnet(net: IpAddr, len: u8) -> Option<IpNet> {
    match net {
        IpAddr::V4(a) => Ipv4Net::new(a, len).ok().map(IpNet::V4),
        IpAddr::V6(a) => {
            let octets = a.octets();
            if len >= 96 && octets[..12].iter().all(|b| *b == 0) {
                let v4 = std::net::Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
                Ipv4Net::new(v4, len - 96).ok().map(IpNet::V4)
            } else {
                Ipv6Net::new(a, len).ok().map(IpNet::V6)
            }
        }
    }
}

/// Reads a database through the bounded reader, within `limits`.
pub fn read(path: &Path, field: GeoField, limits: &Limits) -> Result<GeoTable, GeoError> {
    let bytes = input::read_bounded(path, limits.geo_database_bytes, InputKind::GeoDatabase)?;
    let reader = maxminddb::Reader::from_source(bytes).map_err(|source| GeoError::Open { path: path.to_owned(), source })?;
    read_networks(&reader, path, field, limits.geo_networks, READ_DEADLINE)
}

fn read_networks(
    reader: &maxminddb::Reader<Vec<u8>>,
    path: &Path,
    field: GeoField,
    max_networks: u64,
    deadline: Duration,
) -> Result<GeoTable, GeoError> {
    let started = Instant::now();
    let read_error = |source| GeoError::Read { path: path.to_owned(), source };
    let key_path: &[PathElement<'_>] = match field {
        GeoField::CountryIsoCode => &[PathElement::Key("country"), PathElement::Key("iso_code")],
        GeoField::CountryCode => &[PathElement::Key("country_code")],
    };
    let mut table = GeoTable::default();
    let mut by_offset: HashMap<usize, Option<u16>> = HashMap::new();
    let mut by_code: HashMap<String, u16> = HashMap::new();
    // Leaves without data are yielded too, so that every step of the walk
    // is counted: a tree of empty leaves is as long to walk as a full one.
    let networks = reader.networks(WithinOptions::default().include_networks_without_data()).map_err(read_error)?;
    let mut visited = 0u64;
    for item in networks {
        visited += 1;
        if visited > max_networks {
            return Err(GeoError::TooManyNetworks { path: path.to_owned(), limit: max_networks });
        }
        if visited.is_multiple_of(NETWORKS_PER_CLOCK_READ) && started.elapsed() > deadline {
            return Err(GeoError::TooSlow { path: path.to_owned(), networks: visited });
        }
        let item = item.map_err(read_error)?;
        let Some(offset) = item.offset() else { continue };
        table.networks_read += 1;
        let code = match by_offset.get(&offset) {
            Some(c) => *c,
            None => {
                let decoded: Option<String> = item.decode_path(key_path).map_err(read_error)?;
                let c = match decoded {
                    None => None,
                    Some(code) => {
                        let code = code.to_ascii_uppercase();
                        let next = by_code.len();
                        if next >= MAX_COUNTRIES - 1 && !by_code.contains_key(&code) {
                            return Err(GeoError::TooManyCountries { path: path.to_owned() });
                        }
                        Some(*by_code.entry(code).or_insert(next as u16))
                    }
                };
                by_offset.insert(offset, c);
                c
            }
        };
        let Some(code) = code else { continue };
        let net = item.network().map_err(read_error)?;
        match to_ipnet(net.ip(), net.prefix()) {
            Some(IpNet::V4(n)) => table.v4.push((n, code)),
            Some(IpNet::V6(n)) => table.v6.push((n, code)),
            None => {}
        }
    }
    let mut codes = vec![String::new(); by_code.len()];
    for (code, i) in by_code {
        codes[i as usize] = code;
    }
    table.codes = codes;
    table.v4.sort_by_key(|(n, _)| (u32::from(n.network()), n.prefix_len()));
    table.v6.sort_by_key(|(n, _)| (u128::from(n.network()), n.prefix_len()));
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/crafted_mmdb.rs"));

    fn reader(depth: u32) -> maxminddb::Reader<Vec<u8>> {
        maxminddb::Reader::from_source(self_similar_mmdb(depth)).unwrap()
    }

    #[test]
    fn a_crafted_tree_reads_all_its_networks_within_the_bound() {
        let t = read_networks(&reader(12), Path::new("x.mmdb"), GeoField::CountryIsoCode, 4096, READ_DEADLINE).unwrap();
        assert_eq!((t.networks_read, t.v4.len(), t.codes.as_slice()), (4096, 4096, &["US".to_owned()][..]));
        assert_eq!(t.v4[1].0, "0.16.0.0/12".parse().unwrap());
    }

    #[test]
    fn a_tree_of_two_to_the_32_networks_is_refused_at_the_bound() {
        let e = read_networks(&reader(32), Path::new("/x/crafted.mmdb"), GeoField::CountryIsoCode, 100_000, READ_DEADLINE).unwrap_err();
        assert!(matches!(e, GeoError::TooManyNetworks { limit: 100_000, .. }), "{e}");
        assert!(e.to_string().starts_with("/x/crafted.mmdb holds more than 100000 networks"), "{e}");
    }

    #[test]
    fn reading_past_the_deadline_is_refused() {
        let e = read_networks(&reader(32), Path::new("/x/slow.mmdb"), GeoField::CountryIsoCode, u64::MAX, Duration::ZERO).unwrap_err();
        assert!(matches!(e, GeoError::TooSlow { networks: NETWORKS_PER_CLOCK_READ, .. }), "{e}");
        assert!(e.to_string().contains("/x/slow.mmdb took longer than 60 s"), "{e}");
    }
}
