//! Reads struct member offsets from the kernel's BTF, for the fields whose
//! place depends on the kernel configuration (Rust eBPF programs have no
//! CO-RE field relocations, so the loader passes offsets as globals).
use std::path::Path;

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no member {member} in struct {strukt}")]
    NotFound { strukt: String, member: String },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// (name_off, type id, bit offset) for structs and unions.
    members: Vec<(u32, u32, u32)>,
}

/// Parsed type table of a BTF blob.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u32_at = |off: usize| -> Result<u32, BtfError> {
            data.get(off..off + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != 0xeb9f {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = hdr_len + type_off;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("strings out of bounds"))?
            .to_vec();
        // Type ids start at 1; index 0 is the void type.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            members: Vec::new(),
        }];
        let mut off = types_start;
        while off < types_start + type_len {
            let name_off = u32_at(off)?;
            let info = u32_at(off + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            off += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        members.push((u32_at(m)?, u32_at(m + 4)?, u32_at(m + 8)?));
                    }
                    vlen * 12
                }
                6 => vlen * 8,   // ENUM
                13 => vlen * 8,  // FUNC_PROTO
                14 => 4,         // VAR
                15 => vlen * 12, // DATASEC
                17 => 4,         // DECL_TAG
                19 => vlen * 12, // ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown kind")),
            };
            off += extra;
            types.push(Type {
                name_off,
                kind,
                kind_flag,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    /// The type id of the function `name` (a kfunc, an iterator's target),
    /// when the kernel has it.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name.as_bytes())
            .map(|i| i as u32)
    }

    /// Byte offset of `member` in `struct strukt`, looking into anonymous
    /// unions and structs.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::NotFound {
            strukt: strukt.into(),
            member: member.into(),
        };
        let t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == strukt.as_bytes())
            .ok_or_else(not_found)?;
        self.find_in(t, member.as_bytes(), 0)
            .map(|bits| bits / 8)
            .ok_or_else(not_found)
    }

    /// Byte offset of `inner` in the struct-typed member `outer` of
    /// `struct strukt` (e.g. `icsk_ack.lrcvtime`, whose struct has no
    /// name).
    pub fn nested_offset(&self, strukt: &str, outer: &str, inner: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::NotFound {
            strukt: strukt.into(),
            member: format!("{outer}.{inner}"),
        };
        let t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == strukt.as_bytes())
            .ok_or_else(not_found)?;
        let &(_, type_id, offset) = t
            .members
            .iter()
            .find(|(name, _, _)| self.name(*name) == outer.as_bytes())
            .ok_or_else(not_found)?;
        let bits = if t.kind_flag {
            offset & 0xff_ffff
        } else {
            offset
        };
        let inner_t = self
            .types
            .get(type_id as usize)
            .filter(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION))
            .ok_or_else(not_found)?;
        self.find_in(inner_t, inner.as_bytes(), bits)
            .map(|b| b / 8)
            .ok_or_else(not_found)
    }

    fn find_in(&self, t: &Type, member: &[u8], base_bits: u32) -> Option<u32> {
        for &(name_off, type_id, offset) in &t.members {
            let bits = base_bits
                + if t.kind_flag {
                    offset & 0xff_ffff
                } else {
                    offset
                };
            let name = self.name(name_off);
            if name == member {
                return Some(bits);
            }
            if name.is_empty() {
                let inner = self.types.get(type_id as usize)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some(found) = self.find_in(inner, member, bits) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sock_common_offsets_in_kernel_btf() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        // Stable fields at known places prove the walk is right.
        assert_eq!(btf.member_offset("sock_common", "skc_daddr").unwrap(), 0);
        assert_eq!(
            btf.member_offset("sock_common", "skc_rcv_saddr").unwrap(),
            4
        );
        assert_eq!(btf.member_offset("sock_common", "skc_dport").unwrap(), 12);
        assert_eq!(btf.member_offset("sock_common", "skc_num").unwrap(), 14);
        assert_eq!(btf.member_offset("sock_common", "skc_family").unwrap(), 16);
        let d = btf.member_offset("sock_common", "skc_v6_daddr").unwrap();
        let s = btf
            .member_offset("sock_common", "skc_v6_rcv_saddr")
            .unwrap();
        assert_eq!(s, d + 16);
        assert!(btf.member_offset("sock_common", "no_such_field").is_err());
    }

    #[test]
    fn finds_a_member_of_an_unnamed_struct_member() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let ack = btf
            .member_offset("inet_connection_sock", "icsk_ack")
            .unwrap();
        let lrcv = btf
            .nested_offset("inet_connection_sock", "icsk_ack", "lrcvtime")
            .unwrap();
        // `lrcvtime` lies inside `icsk_ack`, a few words in.
        assert!(lrcv > ack && lrcv < ack + 64, "{ack} {lrcv}");
        assert!(btf
            .nested_offset("inet_connection_sock", "icsk_ack", "nope")
            .is_err());
        assert!(btf
            .nested_offset("inet_connection_sock", "nope", "lrcvtime")
            .is_err());
    }

    #[test]
    fn finds_functions_in_kernel_btf() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let id = btf.func_id("bpf_iter_tcp").expect("iter/tcp (5.9+)");
        assert!(id > 0);
        assert_ne!(btf.func_id("tcp_v4_connect"), Some(id));
        assert_eq!(btf.func_id("no_such_function_here"), None);
    }
}
