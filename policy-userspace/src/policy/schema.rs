//! The policy's JSON Schema, for editors that validate YAML with one.

use serde_json::{json, Value};

fn action() -> Value {
    json!({"type": "string", "enum": ["allow", "deny"]})
}

fn cidr() -> Value {
    json!({"type": "string", "description": "CIDR or single address, IPv4 or IPv6, host bits clear", "examples": ["192.0.2.0/24", "2001:db8::/32"]})
}

fn ports_list() -> Value {
    json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 1,
           "description": "guarded ports the rule applies to; all when absent"})
}

fn rule() -> Value {
    json!({"oneOf": [cidr(), {
        "type": "object", "additionalProperties": false, "required": ["cidr"],
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9_.:/-]+$"},
            "cidr": cidr(),
            "side": {"type": "string", "enum": ["peer", "local"], "default": "peer"},
            "ports": ports_list(),
            "comment": {"type": "string"}
        }
    }]})
}

fn list_file() -> Value {
    json!({"oneOf": [{"type": "string", "description": "path, relative to the policy file"}, {
        "type": "object", "additionalProperties": false, "required": ["file"],
        "properties": {
            "id": {"type": "string"}, "file": {"type": "string"},
            "side": {"type": "string", "enum": ["peer", "local"]}, "ports": ports_list(), "comment": {"type": "string"}
        }
    }]})
}

fn duration() -> Value {
    json!({"type": "string", "pattern": "^[0-9]+[smhd]$", "examples": ["30s", "15m", "24h", "7d"]})
}

fn countries() -> Value {
    json!({"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z]{2}$"}})
}

fn direction() -> Value {
    json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "mode": {"type": "string", "enum": ["enforce", "monitor"]},
            "enforce_from": {"type": "string", "format": "date", "description": "in monitor mode: the day (00:00 UTC) this direction starts to enforce"},
            "default": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": action()},
            "allow": {"type": "array", "items": rule()},
            "deny": {"type": "array", "items": rule()},
            "exemptions": {"type": "array", "items": {
                "type": "object", "additionalProperties": false, "required": ["cidr", "until"],
                "properties": {
                    "id": {"type": "string"}, "cidr": cidr(), "ports": ports_list(),
                    "side": {"type": "string", "enum": ["peer", "local"], "default": "local"},
                    "until": {"type": "string", "format": "date", "description": "last day (UTC) the exemption applies"},
                    "comment": {"type": "string"}
                }
            }},
            "allow_files": {"type": "array", "items": list_file()},
            "deny_files": {"type": "array", "items": list_file()},
            "rate_limit": {
                "type": "object", "additionalProperties": false, "required": ["new_per_minute"],
                "properties": {
                    "new_per_minute": {"type": "integer", "minimum": 1, "maximum": 60000},
                    "burst": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "ban_above_per_minute": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "ban": duration(),
                    "escalate": {"type": "object", "additionalProperties": false, "properties": {
                        "factor": {"type": "integer", "minimum": 1, "maximum": 16}, "max": duration()
                    }}
                }
            },
            "geo": {
                "type": "object", "additionalProperties": false, "required": ["database"],
                "properties": {
                    "database": {"type": "string"},
                    "field": {"type": "string", "enum": ["country.iso_code", "country_code"], "default": "country.iso_code"},
                    "block": countries(),
                    "allow_only": countries(),
                    "unknown": action()
                },
                "oneOf": [{"required": ["block"]}, {"required": ["allow_only"]}]
            },
            "smtp_commands": {"type": "object", "additionalProperties": false, "properties": {
                "block": {"type": "array", "items": {"type": "string", "enum": ["VRFY", "EXPN", "vrfy", "expn"]}},
                "fragments": action()
            }},
            "malformed": action(),
            "tenant_suspect": {"type": "object", "additionalProperties": false,
                "description": "egress only: report a source behind a tenant interface whose blocked new connections go over `blocked` in `window` (a tenant_suspect event and gauge), and with `quarantine` ban it on every guarded port that long",
                "properties": {
                    "blocked": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 50},
                    "window": {"type": "string", "default": "5m"},
                    "quarantine": {"type": "string"}
                }},
            "established": {"type": "string", "enum": ["reset", "drop"], "default": "reset",
                            "description": "what a segment of an open connection the policy denies gets besides the drop: a TCP reset to its sender, or nothing"}
        }
    })
}

fn size() -> Value {
    json!({"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[0-9]+ ?([KMG]i?B|[kK]B|B)?$"}],
           "examples": [67108864, "64MiB", "500kB"]})
}

fn limits() -> Value {
    json!({
        "type": "object", "additionalProperties": false,
        "description": "how much is read from the files the policy names; overrides --max-list-bytes, --max-geo-bytes and --max-geo-networks",
        "properties": {
            "list_file_bytes": size(),
            "geo_database_bytes": size(),
            "geo_networks": {"type": "integer", "minimum": 1}
        }
    })
}

pub fn schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "smtpguard policy",
        "type": "object",
        "additionalProperties": false,
        "required": ["version"],
        "properties": {
            "version": {"const": 1},
            "mode": {"type": "string", "enum": ["enforce", "monitor"], "default": "enforce"},
            "enforce_from": {"type": "string", "format": "date", "description": "in monitor mode: the day (00:00 UTC) both directions start to enforce"},
            "ports": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "maxProperties": policy_common::MAX_PORTS,
                      "additionalProperties": {"type": "string", "enum": ["smtp", "smtps", "submission", "other"]}},
            "events": {"type": "object", "additionalProperties": false, "properties": {
                "drop_sample_one_in": {"type": "integer", "minimum": 0}, "per_second": {"type": "integer", "minimum": 0}
            }},
            "limits": limits(),
            "ingress": direction(),
            "egress": direction()
        }
    })
}
