//! Country per network from a MaxMind database (GeoLite2/GeoIP2 or the
//! same format with a top-level `country_code`).

use std::{collections::HashMap, net::IpAddr, path::Path};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use maxminddb::PathElement;

use super::model::GeoField;

/// Every network of a database with a country, in address order.
#[derive(Debug, Default)]
pub struct GeoTable {
    /// Country codes; the networks refer to them by index.
    pub codes: Vec<String>,
    pub v4: Vec<(Ipv4Net, u16)>,
    pub v6: Vec<(Ipv6Net, u16)>,
    /// Networks read, with or without a country.
    pub networks_read: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: maxminddb::MaxMindDbError },
    #[error("reading {path}: {source}")]
    Read { path: String, source: maxminddb::MaxMindDbError },
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

pub fn read(path: &Path, field: GeoField) -> Result<GeoTable, GeoError> {
    let display = path.display().to_string();
    let reader = maxminddb::Reader::open_readfile(path).map_err(|source| GeoError::Open { path: display.clone(), source })?;
    let key_path: &[PathElement<'_>] = match field {
        GeoField::CountryIsoCode => &[PathElement::Key("country"), PathElement::Key("iso_code")],
        GeoField::CountryCode => &[PathElement::Key("country_code")],
    };
    let mut table = GeoTable::default();
    let mut by_offset: HashMap<usize, Option<u16>> = HashMap::new();
    let mut by_code: HashMap<String, u16> = HashMap::new();
    let networks = reader.networks(Default::default()).map_err(|source| GeoError::Read { path: display.clone(), source })?;
    for item in networks {
        let item = item.map_err(|source| GeoError::Read { path: display.clone(), source })?;
        table.networks_read += 1;
        let Some(offset) = item.offset() else { continue };
        let code = match by_offset.get(&offset) {
            Some(c) => *c,
            None => {
                let decoded: Option<String> =
                    item.decode_path(key_path).map_err(|source| GeoError::Read { path: display.clone(), source })?;
                let c = decoded.map(|code| {
                    let code = code.to_ascii_uppercase();
                    let next = by_code.len() as u16;
                    *by_code.entry(code).or_insert(next)
                });
                by_offset.insert(offset, c);
                c
            }
        };
        let Some(code) = code else { continue };
        let net = item.network().map_err(|source| GeoError::Read { path: display.clone(), source })?;
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
